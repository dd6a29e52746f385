"""Launchers of the fused decode GEMVs (ops/decode_gemv.cu): norm_qkv_rope_cache,
linear_add and norm_gate_up_silu with ops/reference.py's signatures. Inputs the
kernels do not take (float32, more than FUSED_MAX_TOKENS rows, odd shapes) run the
reference composition, which on a GPU is the unfused kernels and cuBLAS. No host
syncs: capturable in CUDA graphs once compiled (the first call compiles).
"""
from __future__ import annotations

import numpy as np
import torch

from ops import reference
from ops.cupy_runtime import (_CTYPE, _HALF, _aligned, _capability_ok, _check_device, _dev, _i32, _i64,
                               _kernel, _launch, _p, _sm_count)

FUSED_MAX_TOKENS = 8
# Loads in flight per weight row and lane, and the grid cap (benchmarks/decode_step.py).
UNROLL = 2
CTAS_PER_SM = 8
_THREADS = 128
_Y_ADD, _Y_SILU, _Y_QKV = 0, 1, 2
_NULL = np.uint64(0)


def gemv_reason(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> str | None:
    """Why x @ weight^T (with `others`: biases, norm weights, residuals of x's dtype) cannot
    take the kernels (None: it can)."""
    ts = [t for t in others if t is not None]
    if x.dtype not in _HALF or any(t.dtype != x.dtype for t in (weight, *ts)):
        return f"dtypes {x.dtype}/{weight.dtype} (the kernels take bf16/fp16, all alike)"
    if x.dim() != 2 or not 1 <= x.shape[0] <= FUSED_MAX_TOKENS or weight.dim() != 2:
        return f"x {tuple(x.shape)}: the kernels take [M, K] with 1 <= M <= {FUSED_MAX_TOKENS}"
    if x.shape[1] != weight.shape[1] or x.shape[1] % 8 or weight.shape[0] % 2:
        return f"x {tuple(x.shape)} / weight {tuple(weight.shape)}: K a multiple of 8, N even"
    if not (x.is_contiguous() and weight.is_contiguous() and all(t.is_contiguous() for t in ts)):
        return "non-contiguous inputs"
    if not (_aligned(x) and _aligned(weight)):
        return "inputs not 16-byte aligned"
    if not _capability_ok(_dev(x)):
        return "GPU older than sm_80"
    return None


def _launch_gemv(y, x, weight, bias, norm_weight, eps, ymode, pairs, residual=None, qkv=()) -> None:
    """pairs: (period, stride, offset): warp g owns weight rows n and n + offset with
    n = (g // period) * stride + g % period. qkv: the Y_QKV extras, in the kernel's order."""
    m, k = x.shape
    n = weight.shape[0]
    for vec, size, what in ((bias, n, "bias"), (norm_weight, k, "norm weight")):
        if vec is not None and vec.shape != (size,):
            raise ValueError(f"{what} shape {tuple(vec.shape)} != ({size},)")
    dev = _dev(x)
    xnorm = "true" if norm_weight is not None else "false"
    expr = f"decode_gemv_kernel<{_CTYPE[x.dtype]}, {m}, {xnorm}, {ymode}, {UNROLL}>"
    fn = _kernel("decode_gemv.cu", expr, dev)
    ptr = lambda t: _p(t) if t is not None else _NULL
    extra = qkv or (_NULL, _NULL, _NULL, _NULL, _NULL, _i32(0), _i32(0), _i32(0), _i32(0), _i32(0))
    # Every warp gets the same number of pairs, the fewest the cap allows: a grid where some
    # warps walk one pair more than others ends on a tail with a fraction of the loads in
    # flight (gate_up, 14336 pairs, 32 layers on an H200: 2.04 ms at the cap's 1056 CTAs,
    # 1.97 at 896, 4 pairs for every warp).
    warps = _THREADS // 32
    per_warp = -(-(n // 2) // (warps * CTAS_PER_SM * _sm_count(dev)))
    ctas = -(-(n // 2) // (warps * per_warp))
    _launch(fn, dev, (ctas,), (_THREADS,),
            (_p(y), _p(x), _i64(k), ptr(norm_weight), np.float32(eps), _p(weight), ptr(bias), _i32(n), _i32(k),
             *(_i32(v) for v in pairs), ptr(residual), *extra))


def norm_qkv_rope_cache(x, norm_weight, eps, qkv_weight, qkv_bias, positions, cos_sin_cache,
                        key_cache, value_cache, slot_mapping, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """rms_norm -> qkv_proj -> RoPE -> k/v into the cache, one kernel: x [M, H] -> q [M, Hq, D]."""
    d = key_cache.shape[-1]
    q_size, kv_size = num_heads * d, num_kv_heads * d
    if qkv_weight.shape[0] != q_size + 2 * kv_size or key_cache.shape[1] != num_kv_heads:
        raise ValueError(f"qkv weight {tuple(qkv_weight.shape)} / cache {tuple(key_cache.shape)} do not match "
                         f"{num_heads} heads, {num_kv_heads} kv heads of dim {d}")
    m = x.shape[0]
    if (gemv_reason(x, qkv_weight, norm_weight, qkv_bias, key_cache, value_cache) or d % 2
            or cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous()
            or positions.shape != (m,) or slot_mapping.shape != (m,)
            or positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64):
        return reference.norm_qkv_rope_cache(x, norm_weight, eps, qkv_weight, qkv_bias, positions, cos_sin_cache,
                                             key_cache, value_cache, slot_mapping, num_heads, num_kv_heads)
    _check_device(x, qkv_weight, key_cache, value_cache, positions, slot_mapping, cos_sin_cache)
    q = torch.empty((m, num_heads, d), dtype=x.dtype, device=x.device)
    qkv = (_p(positions.contiguous()), _p(cos_sin_cache), _p(key_cache), _p(value_cache),
           _p(slot_mapping.contiguous()), _i32(q_size), _i32(kv_size), _i32(d), _i32(num_kv_heads),
           _i32(key_cache.shape[2]))
    _launch_gemv(q, x, qkv_weight, qkv_bias, norm_weight, eps, _Y_QKV, (d // 2, d, d // 2), qkv=qkv)
    return q


def linear_add(x, weight, bias, residual) -> torch.Tensor:
    """residual + x @ weight^T (+ bias), one kernel: the next residual stream [M, N]."""
    if residual.shape != (x.shape[0], weight.shape[0]) or gemv_reason(x, weight, bias, residual):
        return reference.linear_add(x, weight, bias, residual)
    _check_device(x, weight, residual)
    y = torch.empty_like(residual)
    _launch_gemv(y, x, weight, bias, None, 0.0, _Y_ADD, (1, 2, 1), residual=residual)
    return y


def norm_gate_up_silu(x, norm_weight, eps, gate_up_weight) -> torch.Tensor:
    """silu_and_mul(gate_up_proj(rms_norm(x))), one kernel: x [M, H] -> [M, I]."""
    if gemv_reason(x, gate_up_weight, norm_weight):
        return reference.norm_gate_up_silu(x, norm_weight, eps, gate_up_weight)
    _check_device(x, gate_up_weight, norm_weight)
    inter = gate_up_weight.shape[0] // 2
    y = torch.empty((x.shape[0], inter), dtype=x.dtype, device=x.device)
    _launch_gemv(y, x, gate_up_weight, None, norm_weight, eps, _Y_SILU, (inter, 0, inter))
    return y


__all__ = ["norm_qkv_rope_cache", "linear_add", "norm_gate_up_silu", "gemv_reason", "FUSED_MAX_TOKENS"]
