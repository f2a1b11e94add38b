"""Check a LoRA adapter directory before PEFT loads it.

PEFT falls back to the Hugging Face hub when a local adapter has no weights file ("Repo id must be in the form
'repo_name'...") and lets a safetensors error from a truncated or empty file through as a traceback. A run's
adapter is copied, synced and moved between clusters: a one-line error naming the file and the fix is due.
"""

from __future__ import annotations

import json
from pathlib import Path

from lexfine.errors import ModelError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RETRAIN = "copy the adapter again from where it was trained, or retrain the run (`lexfine train --force`)"


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The adapter's weights file, after checking that the config is a JSON object and the weights are complete.
    Raises ModelError (one line) otherwise."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ModelError(f"adapter directory {str(d)!r} does not exist; train the run to the end first")
    try:
        cfg = json.loads((d / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {str(d / CONFIG)!r} ({' '.join(str(e).split())[:120]}); {RETRAIN}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{str(d / CONFIG)!r} is not a JSON object; {RETRAIN}")
    found = [d / w for w in WEIGHTS if (d / w).is_file()]
    if not found:
        raise ModelError(f"adapter directory {str(d)!r} has no weights file ({' or '.join(WEIGHTS)}); {RETRAIN}")
    weights = found[0]
    if weights.stat().st_size == 0:
        raise ModelError(f"adapter weights {str(weights)!r} are empty (0 bytes); {RETRAIN}")
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt") as f:  # reads the header; checks the file covers every tensor
                if not list(f.keys()):
                    raise ModelError(f"adapter weights {str(weights)!r} hold no tensors; {RETRAIN}")
        except ModelError:
            raise
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise ModelError(f"adapter weights {str(weights)!r} are truncated or corrupt "
                             f"({' '.join(str(e).split())[:120]}); {RETRAIN}") from None
    return weights
