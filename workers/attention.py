"""Paged attention over one step's flattened batch, and the metadata describing it.

A step's batch is B sequences flattened to T tokens: the first `num_decodes`
sequences are decodes (one token each), the rest are prefill chunks (a cached
prefix may precede a chunk). The model runner builds one AttentionMetadata per
step; every layer reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ops.dispatch import ops_for
from ops.prefill_attention import PrefillPlan, flash_prefill


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token (block * block_size + offset); -1 = padding
    block_tables: torch.Tensor  # [B, max_blocks] int32: each sequence's blocks, in order
    context_lens: torch.Tensor  # [B] int32: K/V positions per sequence, this step's tokens included
    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b's tokens are rows [qsl[b], qsl[b+1])
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    max_query_len: int
    max_context_len: int  # an upper bound on context_lens (max_model_len on GPU)
    prefill: PrefillPlan | None = None  # GPU: the prefill chunks' flash plan (no host syncs)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


class Attention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends over the cache.

    Takes q/k/v with rotary already applied; holds no weights (the projections
    live in the model), so one class serves every layer and TP rank.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D].

        kv_cache is (key_cache, value_cache), each [num_blocks, Hk, block_size, D],
        or None for a cache-less run (memory profiling, tests): then every
        sequence must be all new tokens (context_lens == query lengths).
        """
        if kv_cache is None:
            return _attention_without_cache(q, k, v, meta, self.scale)
        ops_for(q).reshape_and_cache(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        return self.attend(q, kv_cache, meta, (k, v))

    def attend(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
               meta: AttentionMetadata, new_kv: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor:
        """q [T, Hq, D] over the cache, which already holds this step's K/V -> [T, Hq, D].
        new_kv: those K/V rows [T, Hk, D], which prefill chunks without cached context read
        in place (a decode-only step needs none)."""
        key_cache, value_cache = kv_cache
        ops = ops_for(q)
        nd = meta.num_decodes
        if nd == meta.num_seqs:  # decode-only step (the CUDA-graph case)
            # Of what attention reads, this layer's qkv wrote only q and each sequence's
            # newest K/V: the kernel may start on the rest of the cache while qkv runs.
            return ops.paged_attention_decode(q, key_cache, value_cache, meta.block_tables,
                                              meta.context_lens, self.scale, meta.max_context_len,
                                              enable_pdl=True)
        if nd == 0:
            return self._prefill(ops, q, key_cache, value_cache, meta, new_kv)
        # Mixed step: decode rows [0, nd) through the decode kernel, prefill chunks after.
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out[:nd] = ops.paged_attention_decode(q[:nd], key_cache, value_cache, meta.block_tables[:nd],
                                              meta.context_lens[:nd], self.scale, meta.max_context_len)
        self._prefill(ops, q[nd:], key_cache, value_cache, meta, new_kv, out[nd:])
        return out

    def _prefill(self, ops, q, key_cache, value_cache, meta: AttentionMetadata,
                 new_kv: tuple[torch.Tensor, torch.Tensor] | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """The prefill chunks (sequences num_decodes.., rows q) over the paged cache; into
        out when given."""
        nd = meta.num_decodes
        if meta.prefill is not None:
            k, v = (new_kv[0][nd:], new_kv[1][nd:]) if new_kv is not None else (None, None)
            return flash_prefill(q, k, v, key_cache, value_cache, meta.prefill, self.scale, out)
        o = ops.paged_attention(q, key_cache, value_cache, meta.block_tables[nd:],
                                meta.query_start_loc[nd:] - nd, meta.context_lens[nd:], self.scale)
        return o if out is None else out.copy_(o)


def _attention_without_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             meta: AttentionMetadata, scale: float) -> torch.Tensor:
    # Plain torch SDPA per sequence: a profiling run must touch no cache blocks,
    # and its speed does not matter.
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist()
    for b, ctx_len in enumerate(meta.context_lens.tolist()):
        s, e = starts[b], starts[b + 1]
        if e - s != ctx_len:
            raise ValueError("attention without a KV cache needs whole prompts "
                             f"(sequence {b}: {e - s} tokens, context {ctx_len})")
        # [1, H, L, D] layout for SDPA
        qb, kb, vb = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
        ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                            enable_gqa=True)
        out[s:e] = ob[0].transpose(0, 1)
    return out


__all__ = ["AttentionMetadata", "Attention"]
