"""Launcher of the fused all-reduce + residual add + RMSNorm (ops/all_reduce.cu).

The buffers it reduces through are symmetric memory that workers/communicator.py
sets up; this module only checks inputs and launches, on torch's current stream
(CUDA-graph capturable, no host sync). The single-process math is
ops/reference.py's all_reduce_rms_norm.
"""
from __future__ import annotations

import numpy as np
import torch

from ops.cupy_runtime import (_CTYPE, _HALF, _aligned, _check_device, _dev, _i32, _i64, _kernel, _launch, _p,
                              _round32)

MAX_RANKS = 8  # AR_MAX_RANKS in all_reduce.cu
MAX_CTAS = 1024  # AR_MAX_CTAS
FLAG_WORDS = MAX_CTAS * MAX_RANKS  # 64-bit flags each rank's flag area holds


def unsupported_reason(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why these inputs cannot take the kernel (the caller reduces otherwise), or None."""
    if x.dtype not in _HALF:
        return f"dtype {x.dtype} (the kernel takes bf16/fp16)"
    if residual.dtype != x.dtype or weight.dtype not in (x.dtype, torch.float32):
        return "residual/weight dtypes differ from the input's"
    if x.dim() != 2 or x.shape != residual.shape or weight.shape != (x.shape[1],):
        return f"shapes x {tuple(x.shape)}, residual {tuple(residual.shape)}, weight {tuple(weight.shape)}"
    if x.shape[1] % 8 or not (x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous()):
        return "hidden size not a multiple of 8, or non-contiguous inputs"
    if not (_aligned(x) and _aligned(residual)):
        return "inputs not 16-byte aligned"
    return None


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        buffer_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, epochs: torch.Tensor,
                        half_numel: int, rank: int, world: int, max_ctas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] this rank's partial sums; returns (rms_norm(sum_ranks(x) + residual),
    sum_ranks(x) + residual). buffer_ptrs / flag_ptrs: int64 [world] device tensors of
    every rank's symmetric buffer (two halves of half_numel elements, each >= x) and
    flag area (FLAG_WORDS int64, zero at first); epochs: this rank's int64 [MAX_CTAS]
    barrier epochs, zero at first."""
    reason = unsupported_reason(x, residual, weight)
    if reason:
        raise ValueError(f"all_reduce_rms_norm: {reason}")
    if not 2 <= world <= MAX_RANKS or not 0 <= rank < world:
        raise ValueError(f"rank {rank} / world {world} outside [0, {MAX_RANKS})")
    if buffer_ptrs.shape != (world,) or flag_ptrs.shape != (world,) or epochs.shape != (MAX_CTAS,) \
            or epochs.dtype != torch.int64:
        raise ValueError("buffer_ptrs / flag_ptrs need one pointer per rank, epochs MAX_CTAS int64 slots")
    _check_device(x, residual, weight, buffer_ptrs, flag_ptrs, epochs)
    if x.numel() > half_numel or half_numel % 8:
        raise ValueError(f"{x.numel()} elements do not fit a buffer half of {half_numel}")
    rows, hidden = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x)
    if rows:
        dev = _dev(x)
        wt = _CTYPE[x.dtype] if weight.dtype == x.dtype else "float"
        fn = _kernel("layernorm.cu+all_reduce.cu", f"all_reduce_rms_norm_kernel<{_CTYPE[x.dtype]}, {wt}>", dev)
        grid = min(rows, max_ctas, MAX_CTAS)
        _launch(fn, dev, (grid,), (_round32(hidden // 8, 1024),),
                (_p(out), _p(residual_out), _p(x), _p(residual), _p(weight), _p(buffer_ptrs), _p(flag_ptrs),
                 _p(epochs), _i64(half_numel), _i32(rank), _i32(world), _i32(rows), _i32(hidden),
                 np.float32(eps)))
    return out, residual_out


__all__ = ["all_reduce_rms_norm", "unsupported_reason", "FLAG_WORDS", "MAX_CTAS", "MAX_RANKS"]
