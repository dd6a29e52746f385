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

Prefill attention (paged_attention) gathers each sequence's K/V through its
block table and runs torch's scaled_dot_product_attention with a bottom-right
causal mask: one host sync per call (query_start_loc/context_lens to the host).
"""
from __future__ import annotations

import math
import threading
from pathlib import Path

import cupy as cp
import numpy as np
import torch

from ops import reference
from ops.prefill_attention import flash_available, flash_varlen_prefill, sdpa_per_sequence
from ops.reference import rope_cos_sin_cache  # noqa: F401  (same API as ops.reference)

_DIR = Path(__file__).resolve().parent
_OPTIONS = ("-std=c++17",)
_CTYPE = {torch.bfloat16: "bf16_t", torch.float16: "fp16_t"}
_HALF = (torch.bfloat16, torch.float16)

_lock = threading.Lock()
_sources: dict[str, str] = {}
_kernels: dict[tuple, object] = {}
_sm_counts: dict[int, int] = {}
_capable: dict[int, bool] = {}

# Decode kernel configuration (warps per CTA, cp.async pipeline stages per warp).
# The K1 benchmark sweeps these (see benchmarks/k1_paged_attention.py).
DECODE_NUM_WARPS = 4
DECODE_STAGES = 3
# Split the context (flash decoding) only when the unsplit grid has fewer CTAs
# than SPLIT_BELOW_CTAS_PER_SM per SM (one CTA streams ~50 GB/s on an H100, so
# ~SMs/2 CTAs already come close to the memory bandwidth), into about
# SPLIT_TARGET_CTAS_PER_SM CTAs per SM, each partition at least
# MIN_PARTITION_TOKENS long. Measured on an H100 (benchmarks/k1_paged_attention.py
# --sweep, split check): B=1 ctx 4096 2.9x faster with 16 parts than unsplit,
# B=4 ctx 8192 1.6x with 4 parts; 96+ CTAs unsplit beat every split.
SPLIT_BELOW_CTAS_PER_SM = 0.5
SPLIT_TARGET_CTAS_PER_SM = 1.0
MIN_PARTITION_TOKENS = 256


# --------------------------------------------------------------------------- plumbing


def _kernel(fname: str, expr: str, dev: int, smem: int = 0):
    """The compiled kernel `expr` (a template instance) of ops/<fname>, loaded on
    device dev and allowed at least `smem` bytes of dynamic shared memory, as a
    cupy.cuda.Function (launched directly: see _launch)."""
    key = (dev, fname, expr)
    hit = _kernels.get(key)
    if hit is not None and hit[2] >= smem:
        return hit[1]
    with _lock:
        hit = _kernels.get(key)
        with cp.cuda.Device(dev):
            if hit is None:
                src = _sources.get(fname)
                if src is None:
                    src = _sources[fname] = (_DIR / fname).read_text()
                mod = cp.RawModule(code=src, options=_OPTIONS, name_expressions=(expr,))
                raw = mod.get_function(expr)
                hit = (raw, raw.kernel, 48 * 1024)  # .kernel compiles and loads it on dev
            raw, fn, allowed = hit
            if smem > allowed:
                raw.max_dynamic_shared_size_bytes = smem
                allowed = smem
        _kernels[key] = (raw, fn, allowed)
    return fn


class _StreamRef:
    """What cupy.cuda.Function takes as a stream: anything with the handle in .ptr."""
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(dev: int) -> _StreamRef:
    """torch's current stream on dev (the capture stream inside torch.cuda.graph)."""
    if _raw_stream is not None:
        return _StreamRef(_raw_stream(dev))
    return _StreamRef(torch.cuda.current_stream(dev).cuda_stream)


def _launch(fn, dev: int, grid: tuple, block: tuple, args: tuple, smem: int = 0) -> None:
    """Launch on torch's current stream: one cuLaunchKernel, nothing else on the GPU."""
    stream = _current_stream(dev)
    if torch.cuda.current_device() == dev:
        fn(grid, block, args, smem, stream)
    else:
        with cp.cuda.Device(dev):
            fn(grid, block, args, smem, stream)


def _p(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _i32(x: int) -> np.int32:
    return np.int32(x)


def _i64(x: int) -> np.int64:
    return np.int64(x)


def _dev(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _sm_count(dev: int) -> int:
    n = _sm_counts.get(dev)
    if n is None:
        n = _sm_counts[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return n


def _capability_ok(dev: int) -> bool:
    ok = _capable.get(dev)
    if ok is None:
        ok = _capable[dev] = torch.cuda.get_device_capability(dev) >= (8, 0)
    return ok


def _round32(n: int, cap: int) -> int:
    """Threads for n work items: a multiple of 32 in [32, cap]."""
    return min(cap, max(32, -(-n // 32) * 32))


def _aligned(t: torch.Tensor, nbytes: int = 16) -> bool:
    return t.data_ptr() % nbytes == 0


def _rows_view(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [..., H] as [N, H] with unit last stride; returns (view or copy, row stride)."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h) if x.dim() != 2 else x
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < h):
        x2 = x2.contiguous()
    return x2, (x2.stride(0) if x2.shape[0] > 1 else h)


def _check_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    for t in ts:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")


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
    k = _kernel("rotary.cu", f"rotary_embedding_kernel<{_CTYPE[query.dtype]}, {ct}>", dev)
    items = (hq + hk) * d // 2
    threads = _round32(items, 256)
    # Enough CTAs to cover the SMs for a small batch; one CTA per token for a big one.
    splits = max(1, min(-(-items // threads), _sm_count(dev) // t))
    qs = query.stride(0) if t > 1 else hq * d
    ks = key.stride(0) if t > 1 else hk * d
    _launch(k, dev, (t, splits), (threads,),
            (_p(query), _p(key), _p(positions), _p(cos_sin_cache), _i64(qs), _i64(ks),
             _i32(hq), _i32(hk), _i32(d)))
    return query, key


# --------------------------------------------------------------------------- paged KV cache


def _check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} / value_cache "
                         f"{tuple(value_cache.shape)}: want equal [num_blocks, Hk, block_size, D]")


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
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    ks = key.stride(0) if t > 1 else hk * d
    vs = value.stride(0) if t > 1 else hk * d
    row_bytes = d * esize
    if (row_bytes % 16 == 0 and (ks * esize) % 16 == 0 and (vs * esize) % 16 == 0
            and all(_aligned(x) for x in (key, value, key_cache, value_cache))):
        word, wsize = "uint4", 16
    else:
        word, wsize = ("unsigned short", 2) if esize == 2 else ("unsigned int", 4)
    wph = row_bytes // wsize
    dev = _dev(key)
    k = _kernel("cache_kernels.cu", f"reshape_and_cache_kernel<{word}>", dev)
    threads = _round32(hk * wph, 256)
    _launch(k, dev, (t,), (threads,),
            (_p(key), _p(value), _p(key_cache), _p(value_cache), _p(slot_mapping),
             _i64(ks * esize // wsize), _i64(vs * esize // wsize), _i32(hk), _i32(bs), _i32(wph)))
    return None


# --------------------------------------------------------------------------- attention


def _attn_reason(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> str | None:
    if query.dtype not in _HALF:
        return f"dtype {query.dtype} (kernels take bf16/fp16)"
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        return f"cache dtype {key_cache.dtype} differs from query {query.dtype}"
    return None


def _decode_reason(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> str | None:
    r = _attn_reason(query, key_cache, value_cache)
    if r:
        return r
    d, bs = key_cache.shape[3], key_cache.shape[2]
    if d not in (64, 128):
        return f"head_dim {d} (decode kernel: 64 or 128)"
    if bs % 16:
        return f"block_size {bs} (decode kernel: a multiple of 16)"
    if not key_cache.is_contiguous() or not value_cache.is_contiguous():
        return "non-contiguous KV cache"
    if not (_aligned(key_cache) and _aligned(value_cache)):
        return "KV cache not 16-byte aligned"
    if not _capability_ok(_dev(query)):
        return "GPU older than sm_80"
    return None


def fallback_reason(op: str, *args) -> str | None:
    """Why `op(*args)` would run ops.reference instead of a kernel (None: it runs a kernel).
    Covers the attention ops, where the reasons are least obvious."""
    if op == "paged_attention_decode":
        return _decode_reason(args[0], args[1], args[2])
    if op == "paged_attention":
        return _attn_reason(args[0], args[1], args[2])
    raise ValueError(f"unknown op {op!r}")


def _check_attention(query, key_cache, value_cache, block_tables, context_lens) -> None:
    _check_caches(key_cache, value_cache)
    if query.dim() != 3 or query.shape[2] != key_cache.shape[3]:
        raise ValueError(f"query {tuple(query.shape)}: want [T, Hq, {key_cache.shape[3]}]")
    hq, hk = query.shape[1], key_cache.shape[1]
    if hq % hk:
        raise ValueError(f"num_heads {hq} is not a multiple of num_kv_heads {hk}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be [B, max_blocks] int32, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if context_lens.dim() != 1 or context_lens.dtype != torch.int32 \
            or context_lens.shape[0] != block_tables.shape[0]:
        raise ValueError(f"context_lens must be [{block_tables.shape[0]}] int32, got "
                         f"{tuple(context_lens.shape)} {context_lens.dtype}")
    _check_device(query, key_cache, value_cache, block_tables, context_lens)


def decode_partitions(batch: int, num_kv_heads: int, group: int, max_context_len: int,
                      block_size: int, num_sms: int) -> tuple[int, int]:
    """(num_parts, partition_blocks) of the decode grid: split the context only
    when the unsplit grid is too small to fill the GPU."""
    max_blocks_needed = max(1, -(-max_context_len // block_size))
    base = batch * num_kv_heads * -(-group // 16)
    if base >= SPLIT_BELOW_CTAS_PER_SM * num_sms or max_context_len < 2 * MIN_PARTITION_TOKENS:
        return 1, max_blocks_needed
    parts = max(2, int(SPLIT_TARGET_CTAS_PER_SM * num_sms / base + 0.5))
    parts = min(parts, max_context_len // MIN_PARTITION_TOKENS)
    pb = -(-max_blocks_needed // parts)
    return -(-max_blocks_needed // pb), pb


def paged_attention_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, max_context_len: int | None = None,
                           num_parts: int | None = None) -> torch.Tensor:
    """Decode only: query [B, Hq, D], one token per sequence -> [B, Hq, D].

    max_context_len is an upper bound on context_lens (it sizes the split grid;
    a CUDA graph passes max_model_len); None computes it (one host sync).
    num_parts (tests, benchmarks) forces the number of context partitions.
    """
    _check_attention(query, key_cache, value_cache, block_tables, context_lens)
    if query.shape[0] != block_tables.shape[0]:
        raise ValueError(f"query has {query.shape[0]} rows, block_tables {block_tables.shape[0]}")
    if _decode_reason(query, key_cache, value_cache):
        return reference.paged_attention_decode(query, key_cache, value_cache, block_tables,
                                                context_lens, scale, max_context_len)
    bsz, hq, d = query.shape
    _, hk, bs, _ = key_cache.shape
    out = torch.empty((bsz, hq, d), dtype=query.dtype, device=query.device)
    if bsz == 0:
        return out
    if max_context_len is None:
        max_context_len = int(context_lens.max())  # the one allowed host sync
    max_context_len = max(1, int(max_context_len))
    # 16-byte-aligned heads inside each query row (the kernel reads 4-byte pairs).
    if query.stride(2) != 1 or query.stride(1) != d or query.stride(0) % 2 or not _aligned(query, 4):
        query = query.contiguous()
    q_stride = query.stride(0) if bsz > 1 else hq * d
    if block_tables.stride(1) != 1 or (bsz > 1 and block_tables.stride(0) != block_tables.shape[1]):
        block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    max_blocks = block_tables.shape[1]
    group = hq // hk
    n_sub = -(-group // 16)
    dev = _dev(query)
    if num_parts is None:
        parts, pb = decode_partitions(bsz, hk, group, max_context_len, bs, _sm_count(dev))
    else:
        need = max(1, -(-max_context_len // bs))
        pb = -(-need // max(1, num_parts))
        parts = -(-need // pb)
    nw, st = DECODE_NUM_WARPS, DECODE_STAGES
    smem = max(nw * st * 2 * 16 * d * 2, nw * 16 * (d + 4) * 4 + nw * 16 * 2 * 4)
    ct = _CTYPE[query.dtype]
    k = _kernel("paged_attention.cu", f"paged_attention_decode_kernel<{ct}, {d}, {bs}, {nw}, {st}>",
                dev, smem)
    scale_log2 = np.float32(scale * math.log2(math.e))
    if parts == 1:
        _launch(k, dev, (hk * n_sub, bsz, 1), (nw * 32,),
                (_p(out), np.uint64(0), np.uint64(0), np.uint64(0), _p(query), _p(key_cache),
                 _p(value_cache), _p(block_tables), _p(context_lens), _i32(hk), _i32(group),
                 _i32(n_sub), _i32(max_blocks), _i64(q_stride), _i32(pb), scale_log2), smem)
        return out
    part_out = torch.empty((bsz, hq, parts, d), dtype=torch.float32, device=query.device)
    part_ms = torch.empty((2, bsz, hq, parts), dtype=torch.float32, device=query.device)
    _launch(k, dev, (hk * n_sub, bsz, parts), (nw * 32,),
            (_p(out), _p(part_out), _p(part_ms[0]), _p(part_ms[1]), _p(query), _p(key_cache),
             _p(value_cache), _p(block_tables), _p(context_lens), _i32(hk), _i32(group),
             _i32(n_sub), _i32(max_blocks), _i64(q_stride), _i32(pb), scale_log2), smem)
    r = _kernel("paged_attention.cu", f"paged_attention_reduce_kernel<{ct}, {d}>", dev, parts * 4)
    _launch(r, dev, (hq, bsz), (128,),
            (_p(out), _p(part_out), _p(part_ms[0]), _p(part_ms[1]), _p(context_lens),
             _i32(parts), _i32(pb * bs), _i32(max_blocks * bs)), parts * 4)
    return out


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                    context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Varlen causal attention over the paged cache (prefill chunks, cached prefixes):
    see ops/prefill_attention.py. One host sync."""
    _check_attention(query, key_cache, value_cache, block_tables, context_lens)
    bsz = block_tables.shape[0]
    if query_start_loc.shape != (bsz + 1,):
        raise ValueError(f"query_start_loc shape {tuple(query_start_loc.shape)} != ({bsz + 1},)")
    if _attn_reason(query, key_cache, value_cache):
        return reference.paged_attention(query, key_cache, value_cache, block_tables,
                                         query_start_loc, context_lens, scale)
    if flash_available(query):
        return flash_varlen_prefill(query, key_cache, value_cache, block_tables, query_start_loc,
                                    context_lens, scale)
    return sdpa_per_sequence(query, key_cache, value_cache, block_tables, query_start_loc,
                              context_lens, scale)


__all__ = ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope_cos_sin_cache",
           "rotary_embedding", "reshape_and_cache", "paged_attention", "paged_attention_decode",
           "fallback_reason", "decode_partitions"]
