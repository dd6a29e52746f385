"""CuPy raw-kernel implementations of the ops API (same names and signatures as
ops/reference.py); ops.dispatch returns this module for CUDA tensors.

Kernels live in ops/*.cu, are compiled with NVRTC through cupy.RawModule on
first use (one module per template instance and device, cached here and in
CuPy's on-disk cache) and launched on torch's current stream, with raw device
pointers: no copies between torch and CuPy, no allocation through CuPy's pool
(outputs and scratch are torch tensors) and no host synchronisation (except
in prefill paged_attention, and in decode when max_context_len is None), so a
decode step's ops work inside torch CUDA-graph capture. Call each op once
before capturing (the first call compiles).

Unsupported but valid inputs fall back to ops.reference, which runs the same
math in plain torch on the GPU: float32 tensors (every op except
reshape_and_cache, a plain copy), dtype mixes the kernels do not handle, and
for decode attention head dims other than 64/128, block sizes that are not a
multiple of 16, non-contiguous or unaligned KV caches and GPUs older than
sm_80. `fallback_reason(op, ...)` says why an attention call would fall back.
Inputs with strides a kernel does not take are copied first (.contiguous()).
Inconsistent shapes raise ValueError.

The attention ops live in ops/cupy_attention.py and are re-exported here;
prefill attention (paged_attention) gathers K/V through the block tables (flash
varlen, or SDPA per sequence): one host sync per call, none when the model runner
planned the gather on the host (ops/prefill_attention.py). The launch plumbing is
ops/cupy_runtime.py.
"""
from __future__ import annotations

import numpy as np
import torch

from ops import reference
from ops.cupy_decode import linear_add, norm_gate_up_silu, norm_qkv_rope_cache  # noqa: F401
from ops.cupy_attention import (_check_caches, decode_partitions, fallback_reason, paged_attention,
                                paged_attention_decode)
from ops.cupy_runtime import (_CTYPE, _HALF, _aligned, _check_device, _dev, _i32, _i64,
                               _kernel, _launch, _p, _round32, _rows_view, _sm_count)
from ops.reference import linear, rope_cos_sin_cache  # noqa: F401  (same API as ops.reference)


# --------------------------------------------------------------------------- norms, MLP


def _norm_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if x.dtype not in _HALF:
        return f"dtype {x.dtype} (kernels take bf16/fp16)"
    if weight.dtype not in (x.dtype, torch.float32):
        return f"weight dtype {weight.dtype} differs from input {x.dtype}"
    return None


def _rms_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({h},)")
    _check_device(x, weight)
    x2, xs = _rows_view(x)
    weight = weight.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    fused = residual is not None
    if fused:
        r2, rs = _rows_view(residual)
        res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    else:
        r2, rs, res_out = x2, xs, out
    n = x2.shape[0]
    if n and h:
        vec = 8 if (h % 8 == 0 and xs % 8 == 0 and rs % 8 == 0 and _aligned(x2) and _aligned(r2)) else 1
        wt = _CTYPE[x.dtype] if weight.dtype == x.dtype else "float"
        expr = f"rms_norm_kernel<{_CTYPE[x.dtype]}, {wt}, {vec}, {'true' if fused else 'false'}>"
        dev = _dev(x)
        threads = _round32(-(-h // vec), 1024)
        _launch(_kernel("layernorm.cu", expr, dev), dev, (n,), (threads,),
                (_p(out), _p(res_out), _p(x2), _p(r2), _p(weight), _i64(xs), _i64(rs),
                 _i32(h), np.float32(eps)))
    out = out.view(x.shape)
    return (out, res_out.view(x.shape)) if fused else out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H], weight [H] -> [T, H]."""
    if _norm_reason(x, weight):
        return reference.rms_norm(x, weight, eps)
    return _rms_launch(x, None, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_new = x + residual; returns (rms_norm(residual_new), residual_new)."""
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    if _norm_reason(x, weight) or residual.dtype != x.dtype:
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    _check_device(x, residual)
    return _rms_launch(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I] laid out as (gate | up) -> silu(gate) * up [T, I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dim {x.shape[-1]} of silu_and_mul input is odd")
    if x.dtype not in _HALF:
        return reference.silu_and_mul(x)
    inter = x.shape[-1] // 2
    x2, xs = _rows_view(x)
    n = x2.shape[0]
    out = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    if n and inter:
        vec = 8 if (inter % 8 == 0 and xs % 8 == 0 and _aligned(x2)) else 1
        dev = _dev(x)
        k = _kernel("activation.cu", f"silu_and_mul_kernel<{_CTYPE[x.dtype]}, {vec}>", dev)
        _launch(k, dev, (n, -(-inter // (vec * 256))), (256,),
                (_p(out), _p(x2), _i64(xs), _i32(inter)))
    return out.view(*x.shape[:-1], inter)


# --------------------------------------------------------------------------- LoRA

LORA_KERNEL_MAX_ROWS = 16  # above, the dense masked GEMMs (ops.reference) read each slot once


def lora_apply(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor,
               onehot: torch.Tensor, width: int) -> torch.Tensor:
    """ops.reference.lora_apply; for up to LORA_KERNEL_MAX_ROWS rows two kernels (ops/lora.cu)
    that read only each row's slot, instead of three GEMM-sized launches over every slot."""
    num_rows, k = x.shape
    n = out.shape[1]
    if a.shape[1] != k or bt.shape != (a.shape[0], n) or out.shape[0] != num_rows or slots.shape != (num_rows,):
        raise ValueError(f"lora_apply shapes: out {tuple(out.shape)}, x {tuple(x.shape)}, a {tuple(a.shape)}, "
                         f"bt {tuple(bt.shape)}, slots {tuple(slots.shape)}")
    if (num_rows > LORA_KERNEL_MAX_ROWS or x.dtype not in _HALF or not (x.dtype == a.dtype == bt.dtype == out.dtype)
            or slots.dtype != torch.int64 or k % 8 or width % 8 or a.shape[0] % width
            or not all(t.is_contiguous() and _aligned(t) for t in (x, a, bt, out, slots))):
        return reference.lora_apply(out, x, a, bt, slots, onehot, width)
    if num_rows == 0:
        return out
    _check_device(out, x, a, bt, slots)
    dev, ct = _dev(x), _CTYPE[x.dtype]
    h = torch.empty((num_rows, width), dtype=torch.float32, device=x.device)
    _launch(_kernel("lora.cu", f"lora_shrink_kernel<{ct}>", dev), dev, (num_rows, width), (256,),
            (_p(h), _p(x), _p(a), _p(slots), _i32(k), _i32(width)))
    _launch(_kernel("lora.cu", f"lora_expand_kernel<{ct}>", dev), dev, (num_rows, -(-n // 128)), (128,),
            (_p(out), _p(h), _p(bt), _p(slots), _i32(n), _i32(width)))
    return out


# --------------------------------------------------------------------------- sampling


ARGMAX_CHUNK = 4096  # elements per CTA of the first pass (a multiple of 4)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [S, V] float32 -> int64 [S]: the greedy tokens (ops/argmax.cu)."""
    if (logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1
            or not 0 < logits.shape[1] < 2 ** 31 or logits.shape[0] > 65535):
        return reference.argmax(logits)  # (which raises on rows of width 0, as torch does)
    rows, width = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        stride = logits.stride(0) if rows > 1 else width
        vec = 4 if width % 4 == 0 and stride % 4 == 0 and _aligned(logits) else 1
        chunks = -(-width // ARGMAX_CHUNK)
        part_v = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device)
        part_i = torch.empty((rows, chunks), dtype=torch.int32, device=logits.device)
        dev = _dev(logits)
        k = _kernel("argmax.cu", f"argmax_chunks_kernel<{vec}>", dev)
        _launch(k, dev, (chunks, rows), (256,), (_p(part_v), _p(part_i), _p(logits), _i64(stride), _i32(width),
                                                 _i32(ARGMAX_CHUNK)))
        k = _kernel("argmax.cu", "argmax_rows_kernel<32>", dev)
        _launch(k, dev, (rows,), (32,), (_p(out), _p(part_v), _p(part_i), _i32(chunks)))
    return out


# --------------------------------------------------------------------------- rotary


def _heads_view(t: torch.Tensor) -> torch.Tensor:
    """[T, H, D] with heads contiguous inside a token (strides (s, D, 1)), else a copy."""
    if t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        return t.contiguous()
    return t


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding, in place on query/key (strided token rows are
    fine); returns (query, key) (copies if their heads were not contiguous)."""
    if query.dim() != 3 or key.dim() != 3 or query.shape[0] != key.shape[0] \
            or query.shape[2] != key.shape[2]:
        raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)}: want [T, H, D]")
    t, hq, d = query.shape
    hk = key.shape[1]
    if positions.shape != (t,):
        raise ValueError(f"positions shape {tuple(positions.shape)} != ({t},)")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != d:
        raise ValueError(f"cos_sin_cache {tuple(cos_sin_cache.shape)} is not [P, {d}]")
    if query.dtype not in _HALF or key.dtype != query.dtype or d % 2 \
            or cos_sin_cache.dtype not in (torch.float32, query.dtype):
        return reference.rotary_embedding(positions, query, key, cos_sin_cache)
    _check_device(positions, query, key, cos_sin_cache)
    query, key = _heads_view(query), _heads_view(key)
    if t == 0:
        return query, key
    positions = positions.to(torch.int64).contiguous()
    cos_sin_cache = cos_sin_cache.contiguous()
    ct = "float" if cos_sin_cache.dtype == torch.float32 else _CTYPE[query.dtype]
    dev = _dev(query)
    qs = query.stride(0) if t > 1 else hq * d
    ks = key.stride(0) if t > 1 else hk * d
    # 16-byte vectors where every row (and the cache's) starts 16-byte aligned.
    vec = 8 if (d // 2) % 8 == 0 and (qs * 2) % 16 == 0 and (ks * 2) % 16 == 0 \
        and all(_aligned(x) for x in (query, key, cos_sin_cache)) else 1
    k = _kernel("rotary.cu", f"rotary_embedding_kernel<{_CTYPE[query.dtype]}, {ct}, {vec}>", dev)
    items = (hq + hk) * d // 2 // vec
    threads = _round32(items, 256)
    # Enough CTAs to cover the SMs for a small batch; one CTA per token for a big one.
    splits = max(1, min(-(-items // threads), _sm_count(dev) // t))
    _launch(k, dev, (t, splits), (threads,),
            (_p(query), _p(key), _p(positions), _p(cos_sin_cache), _i64(qs), _i64(ks),
             _i32(hq), _i32(hk), _i32(d)))
    return query, key


# --------------------------------------------------------------------------- paged KV cache


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hk, D] into the caches at slot_mapping [T]; slots < 0 are skipped."""
    _check_caches(key_cache, value_cache)
    _, hk, bs, d = key_cache.shape
    if key.dim() != 3 or key.shape != value.shape or key.shape[1:] != (hk, d):
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)}: want [T, {hk}, {d}]")
    t = key.shape[0]
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping shape {tuple(slot_mapping.shape)} != ({t},)")
    esize = key_cache.element_size()
    if (key.dtype != key_cache.dtype or value.dtype != key_cache.dtype
            or value_cache.dtype != key_cache.dtype or esize not in (2, 4)
            or not key_cache.is_contiguous() or not value_cache.is_contiguous()):
        return reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    _check_device(key, value, key_cache, value_cache, slot_mapping)
    if t == 0:
        return None
    key, value = _heads_view(key), _heads_view(value)
    ks = key.stride(0) if t > 1 else hk * d
    vs = value.stride(0) if t > 1 else hk * d
    word, wsize = _cache_word(d * esize, esize, (ks * esize, vs * esize), (key, value, key_cache, value_cache))
    args = (_p(key), _p(value), _p(key_cache), _p(value_cache), _p(slot_mapping.to(torch.int64).contiguous()),
            _i64(ks * esize // wsize), _i64(vs * esize // wsize))
    _launch_cache_copy("reshape_and_cache_kernel", word, _dev(key), t, args, hk, bs, d * esize // wsize)
    return None


def _cache_word(row_bytes: int, esize: int, strides: tuple[int, ...], tensors: tuple) -> tuple[str, int]:
    """The word the cache copies move: 16 bytes where every head row starts 16-byte aligned
    (row size, token strides in bytes, base pointers), else one element."""
    if row_bytes % 16 == 0 and all(s % 16 == 0 for s in strides) and all(_aligned(x) for x in tensors):
        return "uint4", 16
    return ("unsigned short", 2) if esize == 2 else ("unsigned int", 4)


def _launch_cache_copy(name: str, word: str, dev: int, rows: int, args: tuple, hk: int, block_size: int,
                       words_per_head: int) -> None:
    """One CTA per packed row, one thread per word of its Hk head rows (ops/cache_kernels.cu)."""
    k = _kernel("cache_kernels.cu", f"{name}<{word}>", dev)
    _launch(k, dev, (rows,), (_round32(hk * words_per_head, 256),),
            (*args, _i32(hk), _i32(block_size), _i32(words_per_head)))


def gather_cache(key_cache: torch.Tensor, value_cache: torch.Tensor,
                 slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache rows of slots [K] (each in [0, num_blocks * block_size): the caller's plan,
    unchecked, as reshape_and_cache's) -> (key, value), each [K, Hk, D] contiguous."""
    _check_caches(key_cache, value_cache)
    _, hk, bs, d = key_cache.shape
    if slots.dim() != 1:
        raise ValueError(f"slots shape {tuple(slots.shape)}: want [K]")
    esize = key_cache.element_size()
    if (value_cache.dtype != key_cache.dtype or esize not in (2, 4)
            or not key_cache.is_contiguous() or not value_cache.is_contiguous()):
        return reference.gather_cache(key_cache, value_cache, slots)
    _check_device(key_cache, value_cache, slots)
    n = slots.shape[0]
    key = torch.empty((n, hk, d), dtype=key_cache.dtype, device=key_cache.device)
    value = torch.empty_like(key)
    if n == 0:
        return key, value
    word, wsize = _cache_word(d * esize, esize, (), (key_cache, value_cache))
    args = (_p(key_cache), _p(value_cache), _p(key), _p(value), _p(slots.to(torch.int64).contiguous()))
    _launch_cache_copy("gather_cache_kernel", word, _dev(key_cache), n, args, hk, bs, d * esize // wsize)
    return key, value


__all__ = ["argmax", "linear", "norm_qkv_rope_cache", "linear_add", "norm_gate_up_silu", "rms_norm",
           "fused_add_rms_norm", "silu_and_mul", "rope_cos_sin_cache", "rotary_embedding",
           "reshape_and_cache", "gather_cache", "paged_attention", "paged_attention_decode",
           "fallback_reason", "decode_partitions"]
