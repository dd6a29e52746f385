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

from ops import reference
from ops.dispatch import ops_for

logger = logging.getLogger("raytp.parallel")

_custom_all_reduce = None  # a SymmMemAllReduce once init_custom_all_reduce succeeded
_fused_all_reduce_norm = None  # a FusedAllReduceRMSNorm, likewise


def init_distributed(backend: str, init_method: str, world_size: int, rank: int,
                     timeout_s: float = 600.0) -> None:
    """Join the TP group ("gloo" on CPU, "nccl" on GPU; init_method e.g.
    "tcp://10.0.0.1:29500"). On GPU, select the device before calling."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process")
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size,
                            rank=rank, timeout=datetime.timedelta(seconds=timeout_s))


def init_custom_all_reduce(device: torch.device, dtype: torch.dtype) -> bool:
    """Route small all-reduces of `dtype` through symmetric memory, and fuse those before
    a norm with it (see workers/communicator.py). Collective: each part is used only
    if every rank set it up, else all keep NCCL for it. True if any part is on."""
    global _custom_all_reduce, _fused_all_reduce_norm
    if tp_size() == 1:
        return False
    from workers.communicator import FusedAllReduceRMSNorm, SymmMemAllReduce, unavailable_reason
    group = dist.group.WORLD.group_name
    plain, reason = _try(lambda: SymmMemAllReduce(group, device, dtype), unavailable_reason(device, dtype))
    fused_reason = unavailable_reason(device) or (None if _cupy_kernels(device, dtype)
                                                  else f"no CuPy kernels for {dtype}")
    fused, fused_reason = _try(lambda: FusedAllReduceRMSNorm(group, device, dtype), fused_reason)
    ok = torch.tensor([plain is not None, fused is not None], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    _custom_all_reduce = plain if ok[0].item() else None
    _fused_all_reduce_norm = fused if ok[1].item() else None
    logger.info("rank %d: all-reduce: %s; before norms: %s", tp_rank(),
                "symmetric memory when small" if _custom_all_reduce else f"NCCL ({reason or 'a peer cannot'})",
                "fused kernel when small" if _fused_all_reduce_norm else f"NCCL ({fused_reason or 'a peer cannot'})")
    return _custom_all_reduce is not None or _fused_all_reduce_norm is not None


def _try(make, reason: str | None):
    """(make(), None), or (None, why not) when reason is given or make() raises."""
    if reason is not None:
        return None, reason
    try:
        return make(), None
    except Exception as e:  # peer access refused, no allocator, no compiler, ...
        return None, f"{type(e).__name__}: {e}"


def _cupy_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16) and ops_for(torch.empty(0, device=device)) is not reference


def destroy_distributed() -> None:
    global _custom_all_reduce, _fused_all_reduce_norm
    _custom_all_reduce = _fused_all_reduce_norm = None
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


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: this rank's partial sums (a row-parallel layer's output before its all-reduce).
    Returns (rms_norm(sum_ranks(x) + residual), sum_ranks(x) + residual): one fused
    kernel when the custom all-reduce is on and x is small, else all_reduce then
    ops' fused_add_rms_norm."""
    if tp_size() > 1:
        fused = _fused_all_reduce_norm
        if fused is not None and fused.fits(x, residual, weight):
            return fused(x, residual, weight, eps)
        x = all_reduce(x)
    return ops_for(x).fused_add_rms_norm(x, residual, weight, eps)


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
           "all_reduce_add_rms_norm", "all_gather_last_dim", "broadcast_from_rank0"]
