"""Prefill attention on GPU: all prefill chunks of a step in one varlen flash call.

The chunks' K/V (cached prefix + this step's tokens, already written to the
paged cache) are gathered into one packed [total_k, Hk, D] tensor (when no chunk has
cached context, the step's own K/V rows are that tensor: nothing is gathered), then
FlashAttention-2's varlen kernel (shipped inside torch as
aten._flash_attention_forward) attends each chunk's queries to its keys. With
seqlen_q < seqlen_k its causal mask is bottom-right aligned, which is exactly
"row i of a q_len-row chunk sits at position ctx - q_len + i"; it takes GQA
natively (Hk divides Hq).

The model runner plans the gather on the host once per step (`plan_prefill`: the
cumulative lengths, which cache slots, the maxima), so the layers never sync with the
host; `flash_varlen_prefill` without a plan derives it on the device (one sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ops.dispatch import ops_for

_FLASH_DTYPES = (torch.bfloat16, torch.float16)


def flash_supported(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    return (device.type == "cuda" and dtype in _FLASH_DTYPES and head_dim % 8 == 0
            and head_dim <= 256 and hasattr(torch.ops.aten, "_flash_attention_forward"))


def flash_available(query: torch.Tensor) -> bool:
    return flash_supported(query.dtype, query.shape[-1], query.device)


@dataclass
class PrefillPlan:
    """The prefill chunks of one step, for flash_prefill: P chunks, K keys in all."""

    cu_q: torch.Tensor  # [P + 1] int32: chunk p's queries are rows [cu_q[p], cu_q[p+1])
    cu_k: torch.Tensor  # [P + 1] int32: chunk p's keys are packed rows [cu_k[p], cu_k[p+1])
    # [K] int64: the cache slot of each packed key; None when no chunk has cached context
    # (cu_k == cu_q): then the keys are the step's own K/V rows, and nothing is gathered.
    kv_slots: torch.Tensor | None
    max_q: int
    max_k: int


def plan_prefill(q_lens: list[int], context_lens: list[int], tables: list[list[int]],
                 block_size: int) -> list[np.ndarray]:
    """Host arrays of a PrefillPlan: [cu_q, cu_k], then kv_slots if a chunk has cached context."""
    cu = lambda lens: np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    arrays = [cu(q_lens), cu(context_lens)]
    if list(q_lens) == list(context_lens):
        return arrays
    pos = [np.arange(c, dtype=np.int64) for c in context_lens]
    blocks = [np.asarray(t, dtype=np.int64)[p // block_size] for t, p in zip(tables, pos)]
    return arrays + [np.concatenate(blocks) * block_size + np.concatenate(pos) % block_size]


def flash_prefill(query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
                  key_cache: torch.Tensor, value_cache: torch.Tensor, plan: PrefillPlan,
                  scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """query [T, Hq, D] and key/value [T, Hk, D]: the chunks' rows this step, in plan order
    (already in the cache) -> [T, Hq, D] (into out when given); no host sync. Strided token
    rows (views into the fused qkv output) are read in place."""
    if plan.kv_slots is None:
        if key is None or value is None:
            raise ValueError("a plan without kv_slots attends to the step's own K/V: pass key and value")
        k, v = key, value
    else:
        k, v = ops_for(query).gather_cache(key_cache, value_cache, plan.kv_slots)  # [K, Hk, D]
    if query.stride(-1) != 1:
        query = query.contiguous()
    o = torch.ops.aten._flash_attention_forward(query, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k,
                                                0.0, True, False, scale=scale)[0]
    # (torch's _flash_attention_forward_no_dropout_inplace is this same copy: no gain.)
    return o if out is None else out.copy_(o)


def context_slots(block_tables: torch.Tensor, context_lens: torch.Tensor, cu_k: torch.Tensor,
                  total_k: int, block_size: int) -> torch.Tensor:
    """[total_k] int64: the cache slots of positions [0, ctx_b) of every sequence b, packed
    in order (plan_prefill's kv_slots, derived on the device)."""
    seq = torch.repeat_interleave(torch.arange(context_lens.shape[0], device=cu_k.device),
                                  context_lens.long(), output_size=total_k)  # [total_k]
    pos = torch.arange(total_k, device=cu_k.device) - cu_k[:-1].long()[seq]
    return block_tables.long()[seq, pos // block_size] * block_size + pos % block_size


def flash_varlen_prefill(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                         context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Same contract as ops.reference.paged_attention; query [T, Hq, D] -> [T, Hq, D]."""
    cu_k = torch.zeros(context_lens.shape[0] + 1, dtype=torch.int32, device=query.device)
    torch.cumsum(context_lens, 0, out=cu_k[1:])
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    host = torch.stack([cu_k[-1], context_lens.max(), q_lens.max()]).tolist()  # the one sync
    total_k, max_k, max_q = (int(x) for x in host)
    slots = context_slots(block_tables, context_lens, cu_k, total_k, key_cache.shape[2])
    plan = PrefillPlan(query_start_loc.to(torch.int32), cu_k, slots, max_q, max_k)
    return flash_prefill(query, None, None, key_cache, value_cache, plan, scale)


def _gather_sequence(cache: torch.Tensor, blocks: torch.Tensor, ctx: int) -> torch.Tensor:
    """[Hk, ctx, D]: the first ctx positions of a sequence whose blocks are `blocks`."""
    g = cache[blocks]  # [n, Hk, bs, D]
    return g.transpose(0, 1).flatten(1, 2)[:, :ctx]


def sdpa_per_sequence(query, key_cache, value_cache, block_tables, query_start_loc,
                       context_lens, scale) -> torch.Tensor:
    """The fallback (no flash kernel for this dtype/shape): one torch SDPA per sequence
    over its gathered K/V, bottom-right causal."""
    bsz = block_tables.shape[0]
    t, hq, d = query.shape
    hk, bs = key_cache.shape[1], key_cache.shape[2]
    group = hq // hk
    out = torch.empty((t, hq, d), dtype=query.dtype, device=query.device)
    # One host sync for both.
    host = torch.cat([query_start_loc.to(torch.int64), context_lens.to(torch.int64)]).tolist()
    starts, ctxs = host[:bsz + 1], host[bsz + 1:]
    for b, ctx in enumerate(ctxs):
        s, e = starts[b], starts[b + 1]
        q_len = e - s
        if q_len == 0:
            continue
        if q_len > ctx:
            raise ValueError(f"sequence {b}: {q_len} query rows but context length {ctx}")
        blocks = block_tables[b, :-(-ctx // bs)].long()
        k = _gather_sequence(key_cache, blocks, ctx)[None]    # [1, Hk, ctx, D]
        v = _gather_sequence(value_cache, blocks, ctx)[None]
        q = query[s:e].transpose(0, 1)[None]         # [1, Hq, q_len, D]
        if q_len == ctx:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                               enable_gqa=group > 1)
        else:
            if group > 1:  # explicit masks rule out the GQA-aware kernels: expand K/V
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            q_pos = torch.arange(ctx - q_len, ctx, device=query.device)
            mask = torch.arange(ctx, device=query.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[s:e] = o[0].transpose(0, 1)
    return out


__all__ = ["PrefillPlan", "flash_available", "flash_supported", "flash_prefill", "flash_varlen_prefill",
           "context_slots", "plan_prefill", "sdpa_per_sequence"]
