"""The fused decode GEMVs (ops/decode_gemv.cu via ops/cupy_decode.py) against the reference.

Fresh random bf16/fp16 inputs for every batch the kernels take (1..8 tokens), GQA ratios
1/4/8, head dims 64/128, with and without q/k/v bias, padding slots (-1); the reference is
ops/reference.py's composition in float32 on the upcast inputs. Outputs land on NaN-poisoned
memory and the caches hold NaN outside the slots a step writes, so an unwritten element or a
stray write fails. Then the fused model path against the unfused one, eager and in a CUDA graph,
and the decode attention started during the qkv GEMV (enable_pdl) against it started after.

Run on a GPU machine: python3 -m pytest -m gpu tests/gpu/test_decode_fusion.py
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from ops import reference as ref  # noqa: E402

if torch.cuda.is_available():
    from ops import cupy_decode as F  # noqa: E402

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert out.shape == want.shape, (out.shape, want.shape)
    assert torch.isfinite(out).all(), "NaN: an output element was not written"
    return ((out.double() - want.double()).norm() / want.double().norm()).item()


def _poison(nbytes: int) -> None:
    torch.empty(nbytes, dtype=torch.uint8, device=DEV).fill_(0xFF)  # NaN where the output goes


def _rand(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, device=DEV)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("hidden,inter", [(64, 96), (4096, 14336), (1000, 344)])
def test_linear_add_and_gate_up_silu(dtype, m, hidden, inter):
    torch.manual_seed(m + hidden)
    x, res = _rand(m, inter, dtype=dtype), _rand(m, hidden, dtype=dtype)
    w_down = _rand(hidden, inter, dtype=dtype, scale=inter ** -0.5)
    _poison(m * hidden * 2)
    got = F.linear_add(x, w_down, None, res)
    assert rel_err(got, ref.linear_add(x.float(), w_down.float(), None, res.float())) < TOL[dtype]
    bias = _rand(hidden, dtype=dtype)
    got = F.linear_add(x, w_down, bias, res)
    assert rel_err(got, ref.linear_add(x.float(), w_down.float(), bias.float(), res.float())) < TOL[dtype]

    g = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    w_gu = _rand(2 * inter, hidden, dtype=dtype, scale=hidden ** -0.5)
    _poison(m * inter * 2)
    got = F.norm_gate_up_silu(res, g, 1e-5, w_gu)
    want = ref.norm_gate_up_silu(res.float(), g.float(), 1e-5, w_gu.float())
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 4, 7, 8])
@pytest.mark.parametrize("hq,hk,d", [(4, 4, 64), (32, 8, 128), (16, 2, 128), (8, 1, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_qkv_rope_cache(dtype, m, hq, hk, d, bias):
    torch.manual_seed(m * 31 + hq + d)
    hidden, blocks, bs = 512, 12, 16
    x = _rand(m, hidden, dtype=dtype)
    g = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    w = _rand((hq + 2 * hk) * d, hidden, dtype=dtype, scale=hidden ** -0.5)
    b = _rand((hq + 2 * hk) * d, dtype=dtype) if bias else None
    positions = torch.randint(0, 4000, (m,), device=DEV)
    cos_sin = ref.rope_cos_sin_cache(d, 4096, 500000.0, None).to(DEV)
    slots = torch.randperm(blocks * bs, device=DEV)[:m]
    if m > 1:
        slots[m // 2] = -1  # a padding row: writes nothing
    kc = torch.full((blocks, hk, bs, d), float("nan"), dtype=dtype, device=DEV)
    vc = kc.clone()
    kc_ref, vc_ref = kc.float(), vc.float()
    _poison(m * hq * d * 2)
    q = F.norm_qkv_rope_cache(x, g, 1e-5, w, b, positions, cos_sin, kc, vc, slots, hq, hk)
    want = ref.norm_qkv_rope_cache(x.float(), g.float(), 1e-5, w.float(), None if b is None else b.float(),
                                   positions, cos_sin, kc_ref, vc_ref, slots, hq, hk)
    assert rel_err(q, want) < TOL[dtype]
    assert torch.equal(kc.isnan(), kc_ref.isnan()) and torch.equal(vc.isnan(), vc_ref.isnan())
    valid = slots[slots >= 0]
    blk, off = valid // bs, valid % bs
    assert rel_err(kc[blk, :, off], kc_ref[blk, :, off]) < TOL[dtype]
    assert rel_err(vc[blk, :, off], vc_ref[blk, :, off]) < TOL[dtype]


def test_fallbacks_and_errors():
    x = torch.randn(9, 64, device=DEV).bfloat16()  # more rows than the kernels take
    w, res = torch.randn(32, 64, device=DEV).bfloat16(), torch.randn(9, 32, device=DEV).bfloat16()
    assert "M <=" in F.gemv_reason(x, w)
    torch.testing.assert_close(F.linear_add(x, w, None, res), ref.linear_add(x, w, None, res))
    assert "dtypes" in F.gemv_reason(x[:2].float(), w.float())
    with pytest.raises(ValueError, match="bias shape"):
        F.linear_add(x[:2], w, torch.zeros(31, device=DEV).bfloat16(), res[:2])


def test_inside_cuda_graph():
    x, res = torch.randn(2, 4096, device=DEV).bfloat16(), torch.randn(2, 4096, device=DEV).bfloat16()
    w = torch.randn(4096, 4096, device=DEV).bfloat16() / 64
    F.linear_add(x, w, None, res)  # the first call compiles, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = F.linear_add(x, w, None, res)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, F.linear_add(x, w, None, res), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contexts,num_parts", [([600], None), ([1], None), ([17, 4097, 300, 33], None),
                                                ([4097], 1), ([1000, 31], 1)])
@pytest.mark.parametrize("graph", [False, True])
def test_attention_starts_during_qkv(dtype, contexts, num_parts, graph):
    # enable_pdl: the decode attention reads the cache while the qkv GEMV before it still
    # runs and writes q and each sequence's newest K/V, whose slots hold NaN until then.
    # Against the same kernel launched after qkv ends: bit-identical, rounds and replays over.
    torch.manual_seed(len(contexts) + contexts[0])
    from ops import cupy_attention as A
    m, hq, hk, d, bs, hidden = len(contexts), 32, 8, 128, 16, 4096
    per_seq = -(-max(contexts) // bs)
    bt = torch.arange(m * per_seq, dtype=torch.int32, device=DEV).view(m, per_seq)
    kc = _rand(m * per_seq, hk, bs, d, dtype=dtype)
    vc = _rand(m * per_seq, hk, bs, d, dtype=dtype)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    positions = (ctx - 1).long()
    slots = bt[torch.arange(m, device=DEV), positions // bs].long() * bs + positions % bs
    x, g = _rand(m, hidden, dtype=dtype), torch.ones(hidden, dtype=dtype, device=DEV)
    w = _rand((hq + 2 * hk) * d, hidden, dtype=dtype, scale=hidden ** -0.5)
    cos_sin = ref.rope_cos_sin_cache(d, 8192, 500000.0, None).to(DEV)

    blk, off, nan = slots // bs, slots % bs, torch.tensor(float("nan"), dtype=dtype, device=DEV)

    def step(pdl: bool) -> torch.Tensor:
        kc[blk, :, off] = nan  # (a device value: capturable)
        vc[blk, :, off] = nan
        q = F.norm_qkv_rope_cache(x, g, 1e-5, w, None, positions, cos_sin, kc, vc, slots, hq, hk)
        return A.paged_attention_decode(q, kc, vc, bt, ctx, d ** -0.5, max_context_len=8192, enable_pdl=pdl,
                                        num_parts=num_parts)

    want = step(False).clone()
    assert torch.isfinite(want).all()
    run = lambda: step(True)
    if graph:
        step(True)  # compiled outside the capture
        torch.cuda.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            out = step(True)
        run = lambda: (cuda_graph.replay(), out)[1]
    for _ in range(5):
        torch.testing.assert_close(run(), want, rtol=0, atol=0)
