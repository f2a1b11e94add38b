"""SLURM profiles: the cluster side of `lexfine sweep submit` (account, partition, time, nodes, GPUs, container).

    # lexfine sweep submit SWEEP --slurm-profile configs/slurm/cscs_alps.yaml
    account: a-xyz
    partition: normal
    time: "12:00:00"
    nodes: 1
    gpus_per_node: 4

Required: account, partition (null allowed: "cluster default"), time, nodes, gpus_per_node. Keys may be written
with dashes (gpus-per-node); a few common spellings are accepted (gpus, extra_sbatch, container: {image, mounts}).
A missing or unknown field, or a value that cannot go into a script safely, is a one-line error.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lexfine.config import load_yaml
from lexfine.errors import ConfigError

TOKEN_RE = re.compile(r"[^\s'\"`$\\;|&<>()#]+")  # what a #SBATCH value may be
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class EvalJob(_Strict):
    time: str | None = None
    """Time limit of the evaluation job (default: the training time)."""
    partition: str | None = None
    """Partition of the evaluation job (default: the training partition)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs of the evaluation job, one node (default: the profile's gpus_per_node)."""
    sbatch_extra: list[str] | None = None
    """Extra #SBATCH lines of the evaluation job (default: the profile's)."""


class SlurmProfile(_Strict):
    # Required: a profile without them is refused (null is allowed for account/partition: "use the default").
    account: str | None
    """Account to charge (#SBATCH --account); null: the cluster default."""
    partition: str | None
    """Partition (#SBATCH --partition); null: the cluster default."""
    time: str
    """Time limit per job, e.g. 12:00:00. Preemption-safe: the job checkpoints and requeues before it."""
    nodes: int = Field(ge=1)
    """Nodes per training job (a sweep variant may set launch.num_machines to change it for its runs)."""
    gpus_per_node: int = Field(ge=0)
    """GPUs per node: one training process per GPU."""
    cpus_per_task: int | None = Field(None, ge=1)
    """CPUs for the one launcher task per node (#SBATCH/srun --cpus-per-task)."""
    mem: str | None = None
    """Memory per node (#SBATCH --mem), e.g. 460G; 0 means all of it."""
    gpu_directive: Literal["gpus-per-node", "gres"] = "gpus-per-node"
    """How to ask for GPUs: --gpus-per-node=G or --gres=gpu:G."""
    environment: str | None = None
    """CSCS Container Engine: an EDF file or name, passed as `srun --environment=...` (see launch/edf/)."""
    container_image: str | None = None
    """Pyxis/enroot: `srun --container-image=...` (a .sqsh file or registry reference)."""
    container_mounts: list[str] = Field(default_factory=list)
    """Pyxis/enroot: `srun --container-mounts=SRC:DST,...`."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run before training/evaluation on the first node (module load, source .venv/bin/activate)."""
    env: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Environment variables exported for every process (NCCL_*, HF_HOME, ...)."""
    sbatch_extra: list[str] = Field(default_factory=list)
    """Extra #SBATCH lines, e.g. --constraint=gpu, --exclusive, --qos=normal."""
    srun_extra: list[str] = Field(default_factory=list)
    """Extra srun arguments, one per item, e.g. --mpi=pmi2."""
    launcher: Literal["accelerate", "torchrun"] = "accelerate"
    """Per-node launcher when a run has several processes."""
    main_process_port: int | Literal["auto"] = "auto"
    """Rendezvous port; auto: 20000 + job id % 20000 (two jobs sharing a node do not collide)."""
    signal: str | None = "USR1@120"
    """#SBATCH --signal: warn the trainer this many seconds before the time limit (null: off)."""
    requeue: bool = True
    """#SBATCH --requeue, and requeue the job after a preemption checkpoint."""
    python: str = "python"
    """Python inside the job's environment. An absolute path (e.g. /scratch/me/venv/bin/python) also picks the
    `accelerate` / `torchrun` beside it, so the jobs need no activated environment."""
    lexfine: str = "lexfine"
    """The lexfine command inside the job's environment (evaluation jobs)."""
    workdir: str | None = None
    """Working directory of the jobs (default: the directory `submit` runs in)."""
    qos: str | None = None
    """#SBATCH --qos."""
    constraint: str | None = None
    """#SBATCH --constraint, e.g. gpu."""
    exclusive: bool = False
    """#SBATCH --exclusive (whole nodes)."""
    eval: EvalJob = Field(default_factory=EvalJob)
    """Overrides for the dependent evaluation job."""


ALIASES = {
    "gpus": "gpus_per_node", "gpus_per_task": "gpus_per_node", "ntasks_per_node": "gpus_per_node",
    "num_nodes": "nodes", "time_limit": "time", "walltime": "time", "cpus": "cpus_per_task",
    "extra_sbatch": "sbatch_extra", "sbatch_lines": "sbatch_extra", "extra_sbatch_lines": "sbatch_extra",
    "sbatch_options": "sbatch_extra", "extra": "sbatch_extra", "extra_srun": "srun_extra",
    "srun_options": "srun_extra", "edf": "environment", "image": "container_image", "mounts": "container_mounts",
    "setup_lines": "setup", "exports": "env", "port": "main_process_port",
}


def _scalars(data: dict, where: str = "") -> dict:
    """YAML turns `mem: 0` into a number (fine: SLURM takes it) and an unquoted `time: 12:00:00` into 43200 (not
    fine: SLURM would read minutes)."""
    out = dict(data)
    if isinstance(out.get("mem"), int) and not isinstance(out.get("mem"), bool):
        out["mem"] = str(out["mem"])
    t = out.get("time")
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        raise ConfigError(f"{where}time: {t!r} is a number; write the limit in quotes, e.g. time: \"12:00:00\" "
                          "(unquoted, YAML reads 12:00:00 as 43200)")
    return out


def _normalize(data: dict) -> dict:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = str(k).strip().replace("-", "_").lower()
        key = ALIASES.get(key, key)
        if key == "container" and isinstance(v, dict):
            for ck, cv in v.items():
                ck = str(ck).replace("-", "_").lower()
                out[{"image": "container_image", "mounts": "container_mounts", "edf": "environment"}.get(ck, ck)] = cv
            continue
        if key == "container":
            key = "container_image"
        if key in ("sbatch_extra", "srun_extra", "setup", "container_mounts") and isinstance(v, str):
            v = [v]
        if key == "eval" and isinstance(v, dict):
            v = _scalars({ALIASES.get(str(ek).replace("-", "_"), str(ek).replace("-", "_")): ev for ek, ev in v.items()},
                         "eval.")
        out[key] = v
    return _scalars(out)


def find_profile(path: str | Path) -> Path:
    """A path, or the name of a shipped profile (cscs_alps -> configs/slurm/cscs_alps.yaml)."""
    p = Path(path)
    if not p.is_file() and p.suffix == "" and (Path("configs/slurm") / f"{p}.yaml").is_file():
        return Path("configs/slurm") / f"{p}.yaml"
    return p


def load_profile(path: str | Path) -> SlurmProfile:
    path = find_profile(path)
    try:
        data = _normalize(load_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"slurm profile {str(path)!r}: {e}") from None
    try:
        prof = SlurmProfile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            doc = SlurmProfile.model_fields[key].description if key in SlurmProfile.model_fields else ""
            first_sentence = re.split(r"\.\s+(?=[A-Z])", doc or "")[0].rstrip(".")
            msg = f"missing required field {key!r} ({first_sentence})"
        elif err["type"] == "extra_forbidden":
            msg = f"unknown field {key!r}; allowed: {', '.join(SlurmProfile.model_fields)}"
        else:
            msg = f"bad value for {key!r}: {err.get('input')!r} ({err['msg']})"
        raise ConfigError(f"slurm profile {str(path)!r}: {msg}") from None
    _check_profile(prof, str(path))
    return prof


def _check_profile(p: SlurmProfile, where: str) -> None:
    tokens = {"account": p.account, "partition": p.partition, "time": p.time, "mem": p.mem, "signal": p.signal,
              "eval.time": p.eval.time, "eval.partition": p.eval.partition, "qos": p.qos,
              "constraint": p.constraint}
    for key, value in tokens.items():
        if value is not None and not TOKEN_RE.fullmatch(str(value)):
            raise ConfigError(f"slurm profile {where!r}: {key} {value!r} must be one word without quotes or shell characters")
    for line in [*p.sbatch_extra, *(p.eval.sbatch_extra or []), *p.srun_extra]:
        if any(c in line for c in "\n\r\x00"):
            raise ConfigError(f"slurm profile {where!r}: {line!r} holds a line break; give one option per item")
    # Split into words (lexfine) or pasted into the batch script as shell (the rest): an unbalanced quote would
    # only fail inside the job, hours later.
    shell = [("lexfine", p.lexfine, False)]
    shell += [("setup", line, True) for line in p.setup]
    shell += [(key, line, False) for key, lines in (("sbatch_extra", [*p.sbatch_extra, *(p.eval.sbatch_extra or [])]),
                                                     ("srun_extra", p.srun_extra)) for line in lines]
    for key, value, comments in shell:
        try:
            shlex.split(value, comments=comments)
        except ValueError as e:
            raise ConfigError(f"slurm profile {where!r}: {key} {value!r} has an unbalanced quote or a trailing "
                              f"backslash ({str(e).lower()}); close the quote") from None
    for key in p.env:
        if not ENV_KEY_RE.fullmatch(key):
            raise ConfigError(f"slurm profile {where!r}: env name {key!r} is not a valid variable name")
