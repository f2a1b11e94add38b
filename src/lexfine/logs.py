"""Logging for lexfine's entry points (`lexfine`, `python -m lexfine.train`, `python -m lexfine.eval`).

INFO and above, one line each. Import-time notes of optional packages are raised to errors only: transformers
imports torchao whenever it is installed (its quantizer registry), and torchao then reports C extensions built for
another torch version, or no Triton on a CPU, and torch deprecation notes about torchao's types: lines in every
command's output, about code lexfine does not call, which would bury a one-line error. Likewise PEFT's own use of
an attribute newer transformers deprecated (`is_gradient_checkpointing`), which warns whenever an adapter is loaded.
"""

from __future__ import annotations

import logging
import warnings

QUIET = ("torchao", "torch.utils._pytree")


def setup() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
