"""Data-parallel plumbing for runs started by ``torchrun`` (gloo on CPU, NCCL on GPUs).

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; a plain ``python`` run has none
and trains in one process. Only rank 0 writes checkpoints and reports progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def current() -> DistInfo:
    """The process group this process belongs to (a single process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (no-op without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return current()


def all_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum a few numbers over all ranks (float64; identity in a single process)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def state_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, to check that replicas hold the same weights."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas_equal(module: torch.nn.Module, info: DistInfo) -> None:
    """Raise unless every rank ends with bit-identical weights (DDP's promise, verified)."""
    if not info.enabled:
        return
    digests: list[str | None] = [None] * info.world
    dist.all_gather_object(digests, state_digest(module))
    if len(set(digests)) != 1:
        raise RuntimeError(f"data-parallel replicas diverged: weight digests per rank {digests}")
