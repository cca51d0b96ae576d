"""Multi-process data-parallel training: process-group set-up and the few collectives training needs.

A run is distributed when torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) is set,
or when main.py gets the original's ``--world_size N --rank i`` (``multiproc.py`` passes them, with
``MASTER_ADDR``/``MASTER_PORT``). Every helper here also works, as a no-op, in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .errors import UsageError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 alone logs and writes checkpoints, metrics and plots."""
    return get_rank() == 0


def default_backend(use_cuda: bool) -> str:
    """nccl for GPUs, gloo on CPU (the original defaulted to gloo everywhere)."""
    return "nccl" if use_cuda else "gloo"


def setup(
    world_size: int = 1, rank: int = -1, backend: str | None = None, force_cpu: bool = False
) -> torch.device:
    """Join the process group when this is one process of a distributed run; return its device.

    torchrun's environment wins over the flags. The device is ``cuda:LOCAL_RANK`` (LOCAL_RANK
    defaults to the rank modulo the visible GPUs) when CUDA is used, else the CPU.
    """
    use_cuda = torch.cuda.is_available() and not force_cpu
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif world_size > 1 and not 0 <= rank < world_size:
        raise UsageError(f"--world_size {world_size} needs a --rank from 0 to {world_size - 1} (got {rank})")
    if world_size <= 1:
        return torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        backend or default_backend(use_cuda),
        rank=rank,
        world_size=world_size,
        device_id=device if use_cuda else None,
    )
    return device


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


@contextmanager
def process_group(
    world_size: int = 1, rank: int = -1, backend: str | None = None, force_cpu: bool = False
) -> Iterator[torch.device]:
    """``setup`` for the ``with`` block (its device), ``cleanup`` after it, however it ends."""
    device = setup(world_size, rank, backend, force_cpu)
    try:
        yield device
    finally:
        cleanup()


def all_sum(*values: float) -> list[float]:
    """Each value summed over all processes (nccl reduces GPU tensors only, gloo CPU ones)."""
    if not is_distributed():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def all_gather(obj) -> list:
    """``obj`` of every process, in rank order (any picklable object; one collective)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's ``obj`` on every process (e.g. a seed picked at random)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), then the others (which reuse it)."""
    if not is_main_process():
        dist.barrier()
    yield
    if is_distributed() and is_main_process():
        dist.barrier()


def check_replicas_identical(model: torch.nn.Module) -> None:
    """Raise if any process's parameters differ from rank 0's (they must, after data-parallel steps)."""
    if not is_distributed():
        return
    differ = 0.0
    for param in model.parameters():
        reference = param.detach().clone()
        dist.broadcast(reference, src=0)
        differ += float(not torch.equal(reference, param.detach()))
    (mismatches,) = all_sum(differ)
    if mismatches:
        raise RuntimeError(f"distributed replicas diverged: {int(mismatches)} parameter tensor(s) differ")
