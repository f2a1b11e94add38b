"""Data-parallel evaluation: each process scores a disjoint shard, rank 0 gathers and writes.

Started by `accelerate launch -m lexfine.eval ...` (or torchrun), every process holds a full model copy. Cases are
dealt round-robin after sorting by length, so shards are equally long and equally expensive. Processes need not
run in lock-step (each holds a full model), they only meet to gather. Run as one plain process, this is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int
    world: int
    device: object  # torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device=None) -> DistInfo:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            from accelerate import PartialState

            state = PartialState()  # initialises the NCCL process group and pins this process's GPU
            if state.num_processes == world:
                return DistInfo(state.process_index, state.num_processes, device or state.device)
            torch.cuda.set_device(local)
        if not torch.distributed.is_initialized():
            # On CPU, accelerate sees one process unless told it is a MULTI_CPU job; a torchrun/accelerate launch
            # environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) is all that init_process_group needs.
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank = 0
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        else:
            device = torch.device("cpu")
    return DistInfo(rank, world, device)


def shard(lengths: list[int], info: DistInfo) -> list[int]:
    """This process's case indices (longest first, dealt round-robin)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return order[info.rank :: info.world]


def gather(results: dict[int, object], info: DistInfo) -> dict[int, object]:
    """Merge every process's {case index: result}; each case was scored by exactly one process."""
    if info.world == 1:
        return results
    import torch

    parts: list = [None] * info.world
    torch.distributed.all_gather_object(parts, results)
    merged: dict[int, object] = {}
    for part in parts:
        overlap = merged.keys() & part.keys()
        assert not overlap, f"cases scored twice: {sorted(overlap)[:5]}"
        merged.update(part)
    return merged


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch

        torch.distributed.barrier()


def finish() -> None:
    """Orderly end of a data-parallel launch: every rank waits for the others, then leaves the process group.
    (A rank that exits while another still holds its gloo connections can be aborted: SIGABRT at exit.)"""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
