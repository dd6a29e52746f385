"""ops.reference against formulas, transformers' rotary embedding and plain SDPA."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from ops import reference as ops
from ops.dispatch import ops_for

# ----------------------------------------------------------------------------- norms, MLP


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_formula(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(7, 64, dtype=dtype), torch.randn(64, dtype=dtype)
    xf = x.float()
    expected = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    out = ops.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm(dtype):
    torch.manual_seed(0)
    x, res, w = torch.randn(5, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype), torch.randn(32, dtype=dtype)
    out, new_res = ops.fused_add_rms_norm(x, res, w, 1e-6)
    assert out.dtype == new_res.dtype == dtype
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(out, ops.rms_norm(x + res, w, 1e-6))


def test_silu_and_mul():
    torch.manual_seed(0)
    x = torch.randn(6, 2 * 24)
    gate, up = x[:, :24], x[:, 24:]
    torch.testing.assert_close(ops.silu_and_mul(x), gate * torch.sigmoid(gate) * up)
    assert ops.silu_and_mul(x.bfloat16()).dtype == torch.bfloat16


def test_dispatch_returns_reference_on_cpu():
    assert ops_for(torch.zeros(1)) is ops


# ----------------------------------------------------------------------------- rotary

ROPE_CASES = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


def _hf_rotary(head_dim: int, theta: float, scaling: dict | None, max_pos: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_parameters=rope)
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_cache_matches_transformers(case):
    head_dim, theta, max_pos = 32, 500000.0, 300
    hf = _hf_rotary(head_dim, theta, ROPE_CASES[case], max_pos)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = hf(x, torch.arange(max_pos)[None])  # [1, P, D]: (f | f) duplicated halves
    cache = ops.rope_cos_sin_cache(head_dim, max_pos, theta, ROPE_CASES[case])
    assert cache.shape == (max_pos, head_dim) and cache.dtype == torch.float32
    torch.testing.assert_close(cache[:, :head_dim // 2], cos[0, :, :head_dim // 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(cache[:, head_dim // 2:], sin[0, :, :head_dim // 2], rtol=0, atol=1e-6)


def test_rope_scaling_changes_frequencies_and_rejects_unknown():
    base = ops.rope_cos_sin_cache(32, 100, 500000.0, None)
    for case in ("llama3", "linear"):
        assert not torch.allclose(base, ops.rope_cos_sin_cache(32, 100, 500000.0, ROPE_CASES[case]))
    torch.testing.assert_close(base, ops.rope_cos_sin_cache(32, 100, 500000.0, {"rope_type": "default"}))
    with pytest.raises(ValueError, match="yarn"):
        ops.rope_cos_sin_cache(32, 100, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary_embedding_matches_transformers(case):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    torch.manual_seed(0)
    head_dim, theta, max_pos, T = 64, 10000.0, 512, 23
    hf = _hf_rotary(head_dim, theta, ROPE_CASES[case], max_pos)
    positions = torch.randint(0, max_pos, (T,))  # unsorted, repeated: any positions work
    q, k = torch.randn(T, 8, head_dim), torch.randn(T, 2, head_dim)
    cos, sin = hf(q, positions[None])  # [1, T, D]
    q_hf, k_hf = apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
    cache = ops.rope_cos_sin_cache(head_dim, max_pos, theta, ROPE_CASES[case])
    q_out, k_out = ops.rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(q_out, q_hf[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out, k_hf[0], rtol=1e-5, atol=1e-5)
    q16, _ = ops.rotary_embedding(positions, q.bfloat16(), k.bfloat16(), cache)
    assert q16.dtype == torch.bfloat16
    torch.testing.assert_close(q16.float(), q_hf[0], rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- paged KV cache


def test_reshape_and_cache_writes_slots_and_skips_padding():
    torch.manual_seed(0)
    num_blocks, hk, bs, d = 4, 2, 8, 16
    k, v = torch.randn(5, hk, d), torch.randn(5, hk, d)
    kc, vc = torch.zeros(num_blocks, hk, bs, d), torch.zeros(num_blocks, hk, bs, d)
    slots = torch.tensor([3 * bs + 7, -1, 0, 1 * bs + 2, -1])
    ops.reshape_and_cache(k, v, kc, vc, slots)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kc[s // bs, :, s % bs], k[i]) and torch.equal(vc[s // bs, :, s % bs], v[i])
    assert int((kc.abs().sum(-1) != 0).sum()) == 3 * hk  # only the 3 real tokens written
    assert int((vc.abs().sum(-1) != 0).sum()) == 3 * hk


def _sdpa_reference(q, k, v, scale):
    """q [Lq, Hq, D] = the last Lq positions of k/v [Lk, Hk, D]; plain causal SDPA."""
    q_len, ctx = q.shape[0], k.shape[0]
    q_pos = torch.arange(ctx - q_len, ctx)[:, None]
    mask = torch.arange(ctx)[None, :] <= q_pos  # [Lq, Lk] True = attend
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


def _build_batch(seqs, hq, hk, d, bs, seed, dtype=torch.float32):
    """seqs: [(context_len, q_len)]. Writes each sequence's full K/V into scattered
    blocks and returns the paged_attention inputs plus per-seq dense K/V."""
    gen = random.Random(seed)
    max_blocks = max(-(-c // bs) for c, _ in seqs)
    num_blocks = sum(-(-c // bs) for c, _ in seqs) + 3  # a few never-used blocks
    free = list(range(num_blocks))
    gen.shuffle(free)  # scattered, out-of-order block ids
    kc = torch.randn(num_blocks, hk, bs, d, dtype=dtype)  # garbage where unwritten
    vc = torch.randn(num_blocks, hk, bs, d, dtype=dtype)
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    queries, dense = [], []
    for b, (ctx, q_len) in enumerate(seqs):
        blocks = [free.pop() for _ in range(-(-ctx // bs))]
        block_tables[b, :len(blocks)] = torch.tensor(blocks)
        k, v = torch.randn(ctx, hk, d, dtype=dtype), torch.randn(ctx, hk, d, dtype=dtype)
        pos = torch.arange(ctx)
        slots = torch.tensor(blocks)[pos // bs] * bs + pos % bs
        ops.reshape_and_cache(k, v, kc, vc, slots)
        queries.append(torch.randn(q_len, hq, d, dtype=dtype))
        dense.append((k, v))
    q_lens = torch.tensor([q for _, q in seqs])
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    ctx_lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    return torch.cat(queries), kc, vc, block_tables, qsl, ctx_lens, dense


@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("bs", [8, 16])
def test_paged_attention_matches_sdpa(gqa, bs):
    hk, d = 2, 32
    hq = hk * gqa
    seqs = [(1, 1), (bs, 1), (3 * bs + 5, 1),  # decodes: 1 token, full block, partial block
            (2 * bs + 3, 2 * bs + 3),  # whole prompt, multi-block
            (3 * bs + 1, bs + 4),  # cached prefix + new chunk, chunk spans blocks
            (bs + 2, 2), (5, 5), (4 * bs, bs)]  # tiny chunk, tiny prompt, block-aligned
    rnd = random.Random(gqa * 100 + bs)
    seqs += [(c, rnd.randint(1, c)) for c in (rnd.randint(1, 5 * bs) for _ in range(4))]
    q, kc, vc, bt, qsl, ctx, dense = _build_batch(seqs, hq, hk, d, bs, seed=gqa + bs)
    scale = d ** -0.5
    out = ops.paged_attention(q, kc, vc, bt, qsl, ctx, scale)
    assert out.shape == q.shape
    for b, (k, v) in enumerate(dense):
        s, e = int(qsl[b]), int(qsl[b + 1])
        torch.testing.assert_close(out[s:e], _sdpa_reference(q[s:e], k, v, scale),
                                   rtol=1e-5, atol=1e-5, msg=f"sequence {b} {seqs[b]}")


def test_paged_attention_decode_wrapper_and_bf16():
    hq, hk, d, bs = 8, 2, 64, 16
    seqs = [(c, 1) for c in (1, 17, 40, 64, 3)]
    q, kc, vc, bt, qsl, ctx, _ = _build_batch(seqs, hq, hk, d, bs, seed=7)
    full = ops.paged_attention(q, kc, vc, bt, qsl, ctx, 0.125)
    torch.testing.assert_close(ops.paged_attention_decode(q, kc, vc, bt, ctx, 0.125), full)
    out16 = ops.paged_attention_decode(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, ctx, 0.125)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), full, rtol=3e-2, atol=3e-2)


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
