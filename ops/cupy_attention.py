"""CuPy paged attention: decode (GQA-aware, split context + reduce for long contexts, or a
cluster merge at batch 1 on sm_90; ops/paged_attention.cu) and prefill chunks over cached
context (flash varlen or SDPA over the gathered K/V, ops/prefill_attention.py). Same API
as ops/reference.py."""
from __future__ import annotations

import math

import numpy as np
import torch

from ops import reference
from ops.prefill_attention import flash_available, flash_varlen_prefill, sdpa_per_sequence
from ops.cupy_runtime import (_CTYPE, _HALF, _aligned, _capability, _capability_ok, _check_device, _dev, _i32,
                               _i64, _kernel, _launch, _p, _sm_count)

# Decode kernel configuration (warps per CTA, cp.async pipeline stages per warp).
# The K1 benchmark sweeps these (see benchmarks/k1_paged_attention.py).
DECODE_NUM_WARPS = 4
DECODE_STAGES = 3
# Split the context (flash decoding) only when the unsplit grid has fewer CTAs
# than SPLIT_BELOW_CTAS_PER_SM per SM (one CTA streams ~50 GB/s on an H100, so
# ~SMs/2 CTAs already come close to the memory bandwidth), into about
# SPLIT_TARGET_CTAS_PER_SM CTAs per SM, each partition at least
# MIN_PARTITION_TOKENS long at the bound max_context_len (a shorter context is cut
# into as many, shorter partitions: the kernel splits each sequence's own context).
# Measured on an H100 (benchmarks/k1_paged_attention.py
# --sweep, split check): B=1 ctx 4096 2.9x faster with 16 parts than unsplit,
# B=4 ctx 8192 1.6x with 4 parts; 96+ CTAs unsplit beat every split.
SPLIT_BELOW_CTAS_PER_SM = 0.5
SPLIT_TARGET_CTAS_PER_SM = 1.0
MIN_PARTITION_TOKENS = 256
# On sm_90, a split of one sequence into at most 8 partitions (a portable cluster) merges
# them inside a thread-block cluster: no reduce kernel, no round trip of the partials
# through memory. Measured on an H200 (32 layers' attention in one CUDA graph, 8 kv heads,
# group 4, 2048-token graph bound): batch 1 at context 576 0.247 -> 0.211 ms, at 1500
# 0.261 -> 0.228; batch 4 at 576 0.345 -> 0.361, so batches above 1 keep the reduce kernel.
CLUSTER_MERGE = True
_SOURCE = "warp_ptx.cu+paged_attention.cu+paged_attention_reduce.cu"  # the kernels, behind their PTX wrappers


def _check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} / value_cache "
                         f"{tuple(value_cache.shape)}: want equal [num_blocks, Hk, block_size, D]")


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
                      block_size: int, num_sms: int) -> int:
    """Context partitions of the decode grid: split only when the unsplit grid is too
    small to fill the GPU. The kernel cuts each sequence's own context into that many
    (ops/paged_attention.cu), so a bound far above the contexts costs only empty CTAs."""
    base = batch * num_kv_heads * -(-group // 16)
    if base >= SPLIT_BELOW_CTAS_PER_SM * num_sms or max_context_len < 2 * MIN_PARTITION_TOKENS:
        return 1
    parts = max(2, int(SPLIT_TARGET_CTAS_PER_SM * num_sms / base + 0.5))
    return min(parts, max_context_len // MIN_PARTITION_TOKENS, -(-max_context_len // block_size))


def paged_attention_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, max_context_len: int | None = None,
                           enable_pdl: bool = False, num_parts: int | None = None) -> torch.Tensor:
    """Decode only: query [B, Hq, D], one token per sequence -> [B, Hq, D].

    max_context_len is an upper bound on context_lens (it sizes the split grid;
    a CUDA graph passes max_model_len); None computes it (one host sync).
    enable_pdl (see ops/reference.py): on sm_90 the kernel reads the rest of the cache
    while the kernel before it (qkv, which triggers early) finishes.
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
        parts = decode_partitions(bsz, hk, group, max_context_len, bs, _sm_count(dev))
    else:
        parts = max(1, min(num_parts, -(-max_context_len // bs)))
    shared = (_p(query), _p(key_cache), _p(value_cache), _p(block_tables), _p(context_lens), _i32(hk),
              _i32(group), _i32(n_sub), _i32(max_blocks), _i64(q_stride), np.float32(scale * math.log2(math.e)))
    _launch_decode(out, shared, context_lens, hk * n_sub, parts, bs, max_blocks, enable_pdl)
    return out


def _launch_decode(out: torch.Tensor, shared: tuple, context_lens: torch.Tensor, heads_grid: int, parts: int,
                   bs: int, max_blocks: int, enable_pdl: bool) -> None:
    """The decode kernel over a [heads_grid, batch, parts] grid (shared: the arguments every
    variant takes, after its outputs); a split that no cluster merges gets the reduce kernel."""
    bsz, hq, d = out.shape
    dev, ct = _dev(out), _CTYPE[out.dtype]
    nw, st = DECODE_NUM_WARPS, DECODE_STAGES
    smem = max(nw * st * 2 * 16 * d * 2, nw * 16 * (d + 4) * 4 + nw * 16 * 2 * 4)
    no_parts = (np.uint64(0),) * 3
    name = f"paged_attention_decode_kernel<{ct}, {d}, {bs}, {nw}, {st}>"
    cl = _cluster_size(parts, dev) if bsz == 1 and parts > 1 else 0
    if parts == 1 or cl:  # one kernel writes `out` (a cluster's padding partitions hold no context)
        if cl:
            name = f"paged_attention_decode_cluster_kernel<{ct}, {d}, {bs}, {nw}, {st}, {cl}>"
            smem += (16 * d + 32) * 4  # the CTA's partition result, read by its peers
        _launch(_kernel(_SOURCE, name, dev, smem), dev, (heads_grid, bsz, max(1, cl)), (nw * 32,),
                (_p(out), *no_parts, *shared), smem, pdl=enable_pdl)
        return
    part_out = torch.empty((bsz, hq, parts, d), dtype=torch.float32, device=out.device)
    part_ms = torch.empty((2, bsz, hq, parts), dtype=torch.float32, device=out.device)
    _launch(_kernel(_SOURCE, name, dev, smem), dev, (heads_grid, bsz, parts), (nw * 32,),
            (_p(out), _p(part_out), _p(part_ms[0]), _p(part_ms[1]), *shared), smem, pdl=enable_pdl)
    r = _kernel(_SOURCE, f"paged_attention_reduce_kernel<{ct}, {d}>", dev, parts * 4)
    _launch(r, dev, (hq, bsz), (128,),
            (_p(out), _p(part_out), _p(part_ms[0]), _p(part_ms[1]), _p(context_lens),
             _i32(parts), _i32(bs), _i32(max_blocks * bs)), parts * 4)


def _cluster_size(parts: int, dev: int) -> int:
    """The cluster that merges `parts` partitions (a power of two, at most 8), or 0: the
    reduce kernel merges them."""
    if not CLUSTER_MERGE or parts > 8 or _capability(dev) < (9, 0):
        return 0
    return 1 << (parts - 1).bit_length()


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


__all__ = ["paged_attention", "paged_attention_decode", "fallback_reason", "decode_partitions"]
