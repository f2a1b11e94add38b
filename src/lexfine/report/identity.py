"""Which runs may be compared: a run's training identity, split into sweep axes and everything else.

A report compares runs that differ only on the **sweep axes** (`SWEEP_AXES`: the learning rate, the LoRA rank
and the method) and on the seed. Everything else that changes what is trained — the model and its
architecture, the data and `data.loss_on`, LoRA alpha/dropout/target modules, the global batch (per-device batch
x accumulation x processes), max length, epochs, schedule, ... — must be equal, or the runs land in different
**comparison groups** and are never averaged or ranked against each other.

The identity is the run's config with what does not change the training left out (config.ID_EXCLUDE: output
dir, evaluation, launch, logging and speed knobs), plus the global batch (launch is excluded from the run id,
but batch x accumulation x processes is what the optimizer sees). Full fine-tunes carry no LoRA keys; they join
every LoRA group whose other keys they share.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

SWEEP_AXES = ("train.lr", "lora.r", "method")
"""Keys a comparison group may vary: the report's grid analyses run over them. The seed varies between
replicates; any other difference makes another group."""


def _drop(tree: dict, exclude: dict) -> None:
    for key, sub in exclude.items():
        if sub is True:
            tree.pop(key, None)
        elif isinstance(tree.get(key), dict):
            for k in sub:
                tree[key].pop(k, None)


def training_identity(cfg: dict) -> dict[str, Any]:
    """The keys that change what is trained (config dict as read from a run's config.yaml), seed included."""
    from lexfine.config import ID_EXCLUDE

    tree = copy.deepcopy(cfg)
    launch = tree.get("launch") or {}
    train = tree.get("train") or {}
    try:
        global_batch = int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1)) * int(
            launch.get("num_processes", 1))
    except (TypeError, ValueError):
        global_batch = None
    _drop(tree, ID_EXCLUDE)
    tree.pop("name", None)
    tree.pop("launch", None)  # the hardware, whatever the run id keeps of it: the global batch below stands for it
    if tree.get("method") == "full":
        tree.pop("lora", None)
    if isinstance(tree.get("train"), dict):
        # batch x accumulation x processes with one product trains the same: the product is the identity
        tree["train"].pop("batch_size", None)
        tree["train"].pop("grad_accum", None)
        tree["train"]["global_batch"] = global_batch
    return tree


def _hash(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:8]


def group_identity(cfg: dict) -> tuple[dict, dict | None]:
    """(shared identity without sweep axes and seed, LoRA keys other than the rank or None for full FT)."""
    tree = training_identity(cfg)
    tree.pop("method", None)
    lora = tree.pop("lora", None)
    if isinstance(tree.get("train"), dict):
        tree["train"].pop("lr", None)
        tree["train"].pop("seed", None)
    if isinstance(lora, dict):
        lora = {k: v for k, v in lora.items() if k != "r"}
    return tree, lora


def group_key(cfg: dict) -> tuple[str, str | None]:
    shared, lora = group_identity(cfg)
    return _hash(shared), (_hash(lora) if lora is not None else None)


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: for naming what differs between two groups."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def differences(trees: list[dict]) -> list[dict[str, Any]]:
    """For each tree, the flattened keys whose values are not the same in every tree."""
    flats = [flat(t) for t in trees]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    return [{k: f.get(k) for k in varying} for f in flats]
