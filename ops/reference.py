"""Plain-torch reference ops: the CPU engine runs these, and the CuPy kernels in
ops/ implement exactly these signatures (tests compare the two).

Every op computes in float32 and returns the input's dtype, so that a bf16 run
differs from a float32 run only by rounding at op boundaries.

KV cache layout (fixed; the kernels use it too), per layer:
    key_cache, value_cache: [num_blocks, num_kv_heads, block_size, head_dim]
A token's slot is block_id * block_size + offset; slot -1 marks padding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- linear, norms, MLP


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] (F.linear: cuBLAS on a GPU)."""
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H], weight [H] -> [T, H]."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_new = x + residual; returns (rms_norm(residual_new), residual_new).

    The sum is rounded to the input dtype before the norm, as vLLM's kernel does:
    the residual stream is stored in the model dtype between layers.
    """
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def all_reduce_rms_norm(partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused all-reduce + add + norm after a row-parallel layer (ops/all_reduce.cu),
    in one process: `partials` are every rank's [T, H] partial sums, added in rank order
    in float32 and rounded to the model dtype (as NCCL's sum), then fused_add_rms_norm."""
    total = partials[0].float()
    for p in partials[1:]:
        total = total + p.float()
    return fused_add_rms_norm(total.to(partials[0].dtype), residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I] laid out as (gate | up) -> silu(gate) * up [T, I]."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


# --------------------------------------------------------------------------- fused decode layers
# A small decode batch at TP=1 runs each GEMM of a layer with the work around it
# (workers/model.py, LlamaDecoderLayer.forward_fused; kernels in ops/decode_gemv.cu).
# These are the same ops in the same order as the unfused layer, so they define the
# kernels' results (up to rounding: the kernels do not round the normed x to the dtype
# before the GEMM) and are what the CPU engine runs.


def norm_qkv_rope_cache(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv_weight: torch.Tensor,
                        qkv_bias: torch.Tensor | None, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """rms_norm(x) -> qkv_proj -> RoPE on q and k -> k and v into the paged cache.
    x [M, H] (the residual stream) -> q [M, Hq, D], rotated."""
    d = key_cache.shape[-1]
    qkv = linear(rms_norm(x, norm_weight, eps), qkv_weight, qkv_bias)  # [M, (Hq + 2 Hk) D]
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k = rotary_embedding(positions, q.view(-1, num_heads, d), k.view(-1, num_kv_heads, d), cos_sin_cache)
    reshape_and_cache(k, v.view(-1, num_kv_heads, d), key_cache, value_cache, slot_mapping)
    return q


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x): the next residual stream, each term rounded to the dtype as
    the unfused path stores it (the GEMM output, then the sum)."""
    return (linear(x, weight, bias).float() + residual.float()).to(residual.dtype)


def norm_gate_up_silu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      gate_up_weight: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(gate_up_proj(rms_norm(x))): x [M, H] -> [M, I]."""
    return silu_and_mul(linear(rms_norm(x, norm_weight, eps), gate_up_weight))


# --------------------------------------------------------------------------- sampling


def lora_apply(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor,
               onehot: torch.Tensor, width: int) -> torch.Tensor:
    """Multi-LoRA, in place: out [T, N] += (x[t] @ A_s^T) @ Bt_s for each row t's slot s
    (none where slots[t] == -1), with A_s = a[s * width:(s + 1) * width] ([width, K]) and Bt_s
    the same rows of bt ([width, N]). onehot [T, L] (x's dtype) is slots as one-hot rows: every
    slot's product is computed for every row and masked (no host sync, one shape for any mix)."""
    num_rows, num_slots = x.shape[0], onehot.shape[1]
    h = (x @ a.t()).view(num_rows, num_slots, width) * onehot[:, :, None]  # [T, L, width]
    return out.addmm_(h.view(num_rows, -1), bt)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens: logits [S, V] -> int64 [S], the first index of each row's maximum
    (a NaN counts as the maximum), as torch.argmax."""
    return logits.argmax(dim=-1)


# --------------------------------------------------------------------------- rotary


def _inv_freq(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, as transformers computes them."""
    # int64 arange then float, like transformers, so that the floats are bit-identical.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        # Scaling positions by 1/factor == scaling every frequency by 1/factor.
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; "
                     f"raytp supports default, linear and llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """transformers' _compute_llama3_parameters: keep high frequencies, divide low
    frequencies by `factor`, interpolate smoothly in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin_cache(head_dim: int, max_position: int, theta: float,
                       rope_scaling: dict | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[max_position, head_dim]: row p is (cos(p * inv_freq) | sin(p * inv_freq))."""
    inv_freq = _inv_freq(head_dim, theta, rope_scaling)  # [D/2]
    positions = torch.arange(max_position, dtype=torch.int64).float()  # [P]
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2], same product as transformers
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos/sin [T, 1, D/2]. Equals HF's x*cos + rotate_half(x)*sin.
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (HF Llama rotate_half) rotary embedding.

    positions [T] int64; query [T, Hq, D]; key [T, Hk, D]; cos_sin_cache [P, D].
    Returns the rotated (query, key). Kernels may rotate in place: callers use the
    return values and must not rely on the inputs being left unchanged.
    """
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]: broadcast over heads
    return _rotate_neox(query, cos, sin), _rotate_neox(key, cos, sin)


# --------------------------------------------------------------------------- paged KV cache


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write this step's key/value [T, Hk, D] into the caches at slot_mapping [T].

    Slots < 0 are padding tokens (e.g. CUDA-graph batch padding) and are skipped.
    """
    block_size = key_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indices on dims 0 and 2 (split by a slice) put the token dim first:
    # key_cache[blocks, :, offsets] is [T_valid, Hk, D], matching key[valid].
    key_cache[blocks, :, offsets] = key[valid].to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value[valid].to(value_cache.dtype)


def gather_cache(key_cache: torch.Tensor, value_cache: torch.Tensor,
                 slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reshape_and_cache's inverse: the cache rows of slots [K] (all >= 0) -> (key, value),
    each [K, Hk, D]: prefill attention's keys where a chunk has cached context."""
    block_size = key_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    return key_cache[blocks, :, offsets], value_cache[blocks, :, offsets]


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len positions of one sequence: [context_len, Hk, D]."""
    num_blocks = -(-context_len // cache.shape[2])
    blocks = cache[block_table[:num_blocks].long()]  # [n, Hk, block_size, D]
    return blocks.transpose(1, 2).flatten(0, 1)[:context_len]  # [n * block_size, Hk, D] -> cut


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Lq, Hq, D] are the last Lq positions of k/v [Lk, Hk, D]; -> [Lq, Hq, D] float32."""
    q_len, num_heads, _ = q.shape
    ctx_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads  # GQA: query head h reads kv head h // group
    k = k.float().repeat_interleave(group, dim=1)  # [Lk, Hq, D]
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [Hq, Lq, Lk]
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)  # absolute query positions
    k_pos = torch.arange(ctx_len, device=q.device)
    scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                    context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Varlen causal attention over B sequences whose K/V live in the paged cache.

    query [T, Hq, D]: rows query_start_loc[b]:query_start_loc[b+1] belong to seq b.
    block_tables [B, max_blocks] int32; context_lens [B] int32 counts seq b's K/V
    positions (cached + this step's, already written). Row i of a seq with q_len
    rows sits at position context_lens[b] - q_len + i and attends to keys
    [0, position]. Decode is q_len == 1. Returns [T, Hq, D].
    """
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()  # one host sync, not one per sequence
    for b, ctx_len in enumerate(context_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        if end == start:
            continue
        k = _gather_kv(key_cache, block_tables[b], ctx_len)  # [ctx_len, Hk, D]
        v = _gather_kv(value_cache, block_tables[b], ctx_len)
        out[start:end] = _causal_attention(query[start:end], k, v, scale).to(query.dtype)
    return out


def paged_attention_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, max_context_len: int | None = None,
                           enable_pdl: bool = False) -> torch.Tensor:
    """Decode only: query [B, Hq, D], one token per sequence -> [B, Hq, D].

    max_context_len is an upper bound on context_lens (kernels size their split grid
    from it; a CUDA graph passes max_model_len). None means "compute it".
    enable_pdl promises that, of what this reads, the work queued just before it wrote only
    query and each sequence's newest K/V (position context_lens - 1), as a decode step's qkv
    does; the GPU kernel then starts before that work ends (a launch hint: no effect here)."""
    query_start_loc = torch.arange(query.shape[0] + 1, dtype=torch.int32, device=query.device)
    return paged_attention(query, key_cache, value_cache, block_tables, query_start_loc,
                           context_lens, scale)


__all__ = ["argmax", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope_cos_sin_cache",
           "rotary_embedding", "reshape_and_cache", "gather_cache", "linear", "norm_qkv_rope_cache",
           "linear_add", "norm_gate_up_silu", "paged_attention", "paged_attention_decode"]
