"""`python -m lexfine.train CONFIG.yaml [key=value ...]`: what every launcher starts, once per process."""

from __future__ import annotations

import sys

from lexfine import compile_cache, logs
from lexfine.config import load_config
from lexfine.errors import EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_USER_ERROR, LexfineError, exit_code_for_status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lexfine.train CONFIG.yaml [key=value ...]")
        return 0 if argv else 2
    logs.setup()
    compile_cache.adopt()
    try:
        cfg = load_config(argv[0], argv[1:])
        from lexfine.train import run
        from lexfine.train.launch import pin_single_process

        pin_single_process(cfg.launch.num_processes)

        rd = run(cfg)
    except LexfineError as e:
        from lexfine.runlock import RunLockedError

        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_LOCKED if isinstance(e, RunLockedError) else EXIT_USER_ERROR)
    except KeyboardInterrupt as e:
        from lexfine.train.signals import Interrupted

        print(f"error: {e or 'interrupted'}; the run directory says what was kept", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(e, Interrupted) else 130
    print(rd.path)
    return exit_code_for_status(rd.status)


if __name__ == "__main__":
    sys.exit(main())
