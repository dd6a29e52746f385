"""The tensor-parallel group: thin wrappers on torch.distributed.

raytp runs tensor parallelism only, so the TP group is the default (world)
process group: one process per TP rank. Without an initialized group everything
behaves as TP=1, which lets the model run in a plain process (tests, tools).
"""
from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger("raytp.parallel")

_custom_all_reduce = None  # a SymmMemAllReduce once init_custom_all_reduce succeeded


def init_distributed(backend: str, init_method: str, world_size: int, rank: int,
                     timeout_s: float = 600.0) -> None:
    """Join the TP group ("gloo" on CPU, "nccl" on GPU; init_method e.g.
    "tcp://10.0.0.1:29500"). On GPU, select the device before calling."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process")
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size,
                            rank=rank, timeout=datetime.timedelta(seconds=timeout_s))


def init_custom_all_reduce(device: torch.device, dtype: torch.dtype) -> bool:
    """Route small all-reduces of `dtype` through symmetric memory (see
    workers/communicator.py). Collective: every rank agrees, else all keep NCCL."""
    global _custom_all_reduce
    if tp_size() == 1:
        return False
    from workers.communicator import SymmMemAllReduce, unavailable_reason
    reason = unavailable_reason(device, dtype)
    comm = None
    if reason is None:
        try:
            comm = SymmMemAllReduce(dist.group.WORLD.group_name, device, dtype)
        except Exception as e:  # peer access refused, allocator missing, ...
            reason = f"{type(e).__name__}: {e}"
    ok = torch.tensor([int(comm is not None)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    _custom_all_reduce = comm if ok.item() else None
    if _custom_all_reduce is None:
        logger.info("rank %d: all-reduce by NCCL only (%s)", tp_rank(), reason or "a peer cannot")
    else:
        logger.info("rank %d: custom all-reduce on (symmetric memory, up to %d KiB)",
                    tp_rank(), comm.max_bytes >> 10)
    return _custom_all_reduce is not None


def destroy_distributed() -> None:
    global _custom_all_reduce
    _custom_all_reduce = None
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the TP ranks: x itself (NCCL, in place) or a new tensor
    (custom all-reduce, small inputs). A no-op at TP=1."""
    if tp_size() == 1:
        return x
    if _custom_all_reduce is not None and _custom_all_reduce.fits(x):
        return _custom_all_reduce.all_reduce(x)
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., n * tp_size], rank 0's part first."""
    size = tp_size()
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x on every rank, in place, without syncing the host. A no-op at TP=1."""
    if tp_size() > 1:
        dist.broadcast(x, src=0)
    return x


__all__ = ["init_distributed", "init_custom_all_reduce", "destroy_distributed", "tp_rank", "tp_size", "all_reduce",
           "all_gather_last_dim", "broadcast_from_rank0"]
