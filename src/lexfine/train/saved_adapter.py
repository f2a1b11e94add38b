"""Check a saved LoRA adapter against the model that was trained.

A sharded save (ZeRO-3 without gathering, FSDP with the wrong state-dict type) can write an adapter with missing
modules or empty tensors, and a run whose updates never reached the saved weights leaves every lora_B at its zero
initialisation; a run that blew up saves NaN/inf weights. Each would only show much later as "fine-tuning did
nothing" (or as chance-level scores); lexfine checks right after saving.
"""

from __future__ import annotations

from pathlib import Path

from lexfine.errors import LexfineError

WEIGHTS = "adapter_model.safetensors"
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")  # names wrappers insert


def _plain(name: str) -> str:
    for w in WRAPPERS:
        name = name.replace(w, "")
    return name


def adapted_modules(model) -> set[str]:
    """Names of the modules that carry a LoRA adapter in the (PEFT-wrapped) model."""
    return {_plain(name) for name, m in model.named_modules() if len(getattr(m, "lora_A", None) or {}) > 0}


def check_saved_adapter(adapter_dir: str | Path, expected: set[str], trained: bool = True) -> dict:
    """Every expected module saved with non-empty, finite lora_A and lora_B; with `trained`, not every lora_B still
    zero. Returns a summary for the manifest; raises LexfineError naming what is wrong."""
    import torch
    from safetensors import safe_open

    path = Path(adapter_dir) / WEIGHTS
    if not path.is_file():
        raise LexfineError(f"saved adapter has no {WEIGHTS}: {path.parent}")
    saved: dict[str, set[str]] = {}
    empty, nonfinite, nonzero_b = [], [], 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if ".lora_" not in key:
                continue
            module, rest = key.split(".lora_", 1)
            module = _plain(module)
            saved.setdefault(module, set()).add(rest[0])  # "A" or "B"
            t = f.get_tensor(key)
            if t.numel() == 0:
                empty.append(key)
                continue
            if not bool(torch.isfinite(t).all()):
                nonfinite.append(key)
            elif rest.startswith("B") and bool(t.abs().sum() > 0):
                nonzero_b += 1
    complete = {m for m, kinds in saved.items() if kinds >= {"A", "B"}}
    missing = sorted(expected - complete)
    if missing or empty:
        detail = f"{len(missing)} of {len(expected)} adapted modules missing (first: {missing[0]})" if missing else ""
        if empty:
            detail += ("; " if detail else "") + f"{len(empty)} empty tensors (first: {empty[0]})"
        raise LexfineError(f"the saved adapter is incomplete: {detail} — a sharded save did not gather the weights")
    if nonfinite:
        raise LexfineError(f"the saved adapter holds NaN/inf weights in {len(nonfinite)} tensors (first: "
                           f"{nonfinite[0]}): training diverged; lower train.lr and train it again with --force")
    if trained and complete and nonzero_b == 0:
        raise LexfineError("every lora_B of the saved adapter is still zero: the training updates did not reach the "
                           "saved weights")
    return {"modules": len(complete), "lora_B_nonzero": nonzero_b}
