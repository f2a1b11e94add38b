"""`python -m lexfine.eval TARGET --task ...`: the eval command alone, for `accelerate launch -m lexfine.eval`
(one process per GPU, each scoring a shard; rank 0 writes)."""

import typer

from lexfine import compile_cache, logs
from lexfine.eval.cli import eval_command

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(eval_command)

if __name__ == "__main__":
    logs.setup()
    compile_cache.adopt()
    app()
