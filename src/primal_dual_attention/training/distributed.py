"""Process-group set-up for ``torchrun`` and the small collectives the engine needs.

``torchrun --nproc_per_node=N -m primal_dual_attention.cli train ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; the engine then wraps the model in
:class:`torch.nn.parallel.DistributedDataParallel`, gives each rank an equal slice of every
global batch, sums metrics across ranks and lets rank 0 alone write logs and checkpoints.
Attention-BN uses per-sequence statistics, so unlike a BatchNorm layer it needs no cross-rank
synchronisation: a sample's output never depends on the other samples of the batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from primal_dual_attention.training.config import check_device_name


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
        """This rank's slice (every ``world_size``-th sample) of a global batch, on its device."""
        out = []
        for t in tensors:
            if t is not None and self.distributed:
                t = t[self.rank :: self.world_size]
            out.append(None if t is None else t.to(self.device, non_blocking=True))
        return tuple(out)

    def sum(self, *values: float) -> list[float]:
        """Sum scalars over ranks (identity in a single process)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
        if not self.distributed:
            return [value]
        values: list[object] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def is_main_process() -> bool:
    """True outside ``torchrun`` and on its rank 0 (decides who prints)."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else the CPU; ``cuda`` -> the local
    one (``cuda:<LOCAL_RANK>`` under torchrun). A fixed index under torchrun is refused: it
    would put every rank on one GPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(check_device_name(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked for, but no CUDA device is available")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    if device.type == "cuda" and world_size > 1:
        raise ValueError(f"device={name!r} under torchrun (WORLD_SIZE={world_size}) would put every rank "
                         "on one GPU; use device 'cuda' or 'auto' (each rank takes its LOCAL_RANK's)")
    return device


def init(device: str = "auto") -> Context:
    """Join the process group that ``torchrun`` describes, or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank, world_size)
    if world_size <= 1:
        return Context(device=resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend=backend)
    return Context(dist.get_rank(), dist.get_world_size(), resolved)


@contextmanager
def session(device: str = "auto") -> Iterator[Context]:
    """The process group for one run: joined on entry and left on exit when this call joined it
    (a group the caller joined stays). torch asks that a group be destroyed before the process
    exits; gloo torn down at interpreter exit was seen to abort a rank after a finished run. On a
    normal exit the ranks first meet at a barrier, so that none closes its connections while a
    peer still finishes a collective; after an error the group is left at once, since a failed
    peer would never reach the barrier."""
    joined_before = dist.is_available() and dist.is_initialized()
    ctx = init(device)
    joins = ctx.distributed and not joined_before
    try:
        yield ctx
        if joins:  # not after an error: the exception skips it
            ctx.barrier()
    finally:  # also when a peer failed at the barrier
        if joins:
            dist.destroy_process_group()
