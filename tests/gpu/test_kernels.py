"""CuPy kernels (ops/cupy_ops.py, ops/*.cu) against the plain-torch reference.

Each kernel runs on fresh random inputs in bf16/fp16; the reference runs in
float32 on the upcast inputs, and ||out - ref|| / ||ref|| must stay under 1e-2
(bf16) or 2e-3 (fp16). Caches hold NaN outside the positions a test writes or
reads, and outputs are allocated over NaN-filled memory where possible, so a
kernel that reads a stale slot or leaves an element unwritten fails.

Run on a GPU machine: python3 -m pytest -m gpu tests/gpu/test_kernels.py
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

cp = pytest.importorskip("cupy")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from ops import reference as ref  # noqa: E402

if torch.cuda.is_available():
    from ops import cupy_attention as A  # noqa: E402
    from ops import cupy_ops as K  # noqa: E402
else:  # collected but skipped
    K = None

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
CONTEXTS = [1, 15, 16, 17, 255, 256, 1000, 2049, 4097]
DEV = "cuda"


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.float(), want.float()
    assert out.shape == want.shape, (out.shape, want.shape)
    assert torch.isfinite(out).all(), "non-finite values in the kernel's output"
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def check(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    err = rel_err(out, want)
    assert err < TOL[dtype], f"{what} relative error {err:.2e} >= {TOL[dtype]:.0e}"


def poison_allocator(nbytes: int) -> None:
    """Leave NaN bytes where the caching allocator will place the next block of
    this size, so that an output element the kernel forgets to write shows."""
    t = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    t.fill_(0xFF)  # 0xFFFF is NaN in bf16 and fp16, 0xFFFFFFFF in float32
    del t


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------- dispatch


def test_dispatch_picks_cupy_ops():
    from ops import dispatch
    assert dispatch.ops_for(torch.zeros(1, device=DEV)) is K
    assert dispatch.ops_for(torch.zeros(1)) is ref


# --------------------------------------------------------------------------- norms, MLP


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_fp32", [False, True])
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 4096), (33, 1000), (5, 4100)])
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm(dtype, w_fp32, tokens, hidden, fused):
    eps = 1e-5
    x = torch.randn(tokens, hidden, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(torch.float32 if w_fp32 else dtype)
    poison_allocator(tokens * hidden * 2)
    if not fused:
        check(K.rms_norm(x, w, eps), ref.rms_norm(x.float(), w.float(), eps), dtype)
        return
    r = torch.randn(tokens, hidden, device=DEV).to(dtype)
    out, res = K.fused_add_rms_norm(x, r, w, eps)
    want_out, want_res = ref.fused_add_rms_norm(x.float(), r.float(), w.float(), eps)
    check(res, want_res, dtype, "residual")
    check(out, want_out, dtype, "out")
    # The norm reads the residual as stored (rounded to dtype), like the reference.
    check(out, ref.rms_norm(res.float(), w.float(), eps), dtype, "out vs stored residual")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_rows(dtype):
    big = torch.randn(9, 3 * 512, device=DEV).to(dtype)
    x = big[:, 512:1024]  # row stride 1536
    w = torch.randn(512, device=DEV).to(dtype)
    check(K.rms_norm(x, w, 1e-6), ref.rms_norm(x.float(), w.float(), 1e-6), dtype)
    r = big[:, :512]
    out, res = K.fused_add_rms_norm(x, r, w, 1e-6)
    want_out, want_res = ref.fused_add_rms_norm(x.float(), r.float(), w.float(), 1e-6)
    check(res, want_res, dtype)
    check(out, want_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 8), (3, 11), (17, 4096), (64, 1000)])
def test_silu_and_mul(dtype, tokens, inter):
    x = (2 * torch.randn(tokens, 2 * inter, device=DEV)).to(dtype)
    poison_allocator(tokens * inter * 2)
    check(K.silu_and_mul(x), ref.silu_and_mul(x.float()), dtype)


def test_zero_rows():
    x = torch.randn(0, 64, device=DEV, dtype=torch.bfloat16)
    w = torch.ones(64, device=DEV, dtype=torch.bfloat16)
    assert K.rms_norm(x, w, 1e-5).shape == (0, 64)
    assert K.silu_and_mul(torch.randn(0, 64, device=DEV, dtype=torch.bfloat16)).shape == (0, 32)


# --------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens,hq,hk", [(1, 4, 4), (13, 8, 2), (37, 32, 8), (300, 32, 8)])
@pytest.mark.parametrize("layout", ["contiguous", "qkv_view", "unaligned"])
@pytest.mark.parametrize("cache_fp32", [True, False])
def test_rotary_embedding(dtype, head_dim, tokens, hq, hk, layout, cache_fp32):
    """16-byte vectors where rows are aligned; "unaligned" (views shifted by one element)
    takes the scalar kernel."""
    cache = ref.rope_cos_sin_cache(head_dim, 8192, 500000.0, None).to(DEV)
    if not cache_fp32:
        cache = cache.to(dtype)
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    if layout == "contiguous":
        q = torch.randn(tokens, hq, head_dim, device=DEV).to(dtype)
        k = torch.randn(tokens, hk, head_dim, device=DEV).to(dtype)
    else:  # q/k as strided views of one qkv row, as the model passes them
        off = 1 if layout == "unaligned" else 0
        qkv = torch.randn(tokens, off + (hq + 2 * hk) * head_dim, device=DEV).to(dtype)
        q = qkv[:, off:off + hq * head_dim].view(tokens, hq, head_dim)
        k = qkv[:, off + hq * head_dim:off + (hq + hk) * head_dim].view(tokens, hk, head_dim)
    want_q, want_k = ref.rotary_embedding(positions, q.float(), k.float(), cache)
    out_q, out_k = K.rotary_embedding(positions, q, k, cache)
    check(out_q, want_q, dtype, "query")
    check(out_k, want_k, dtype, "key")


# --------------------------------------------------------------------------- reshape_and_cache


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])  # a copy: float32 runs the kernel too
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("layout", ["contiguous", "qkv_view", "unaligned"])
def test_reshape_and_cache(dtype, head_dim, layout):
    hk, bs, nb, t = 4, 16, 37, 100
    if layout == "contiguous":
        key = torch.randn(t, hk, head_dim, device=DEV).to(dtype)
        value = torch.randn(t, hk, head_dim, device=DEV).to(dtype)
    else:  # views into one fused row; "unaligned" shifts them by one element
        off = 1 if layout == "unaligned" else 0
        qkv = torch.randn(t, off + 3 * hk * head_dim, device=DEV).to(dtype)
        key = qkv[:, off + hk * head_dim:off + 2 * hk * head_dim].view(t, hk, head_dim)
        value = qkv[:, off + 2 * hk * head_dim:].view(t, hk, head_dim)
    slots = torch.randperm(nb * bs, device=DEV)[:t]
    slots[::7] = -1  # padding rows
    kc = torch.full((nb, hk, bs, head_dim), float("nan"), device=DEV, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    K.reshape_and_cache(key, value, kc, vc, slots)
    ref.reshape_and_cache(key, value, kc_ref, vc_ref, slots)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
    K.reshape_and_cache(key[:0], value[:0], kc, vc, slots[:0])  # no tokens: a no-op


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 16), (128, 32)])
def test_gather_cache(dtype, head_dim, block_size):
    """reshape_and_cache's inverse, bit for bit: random slots (repeats too, any order)."""
    hk, nb = 8, 41
    kc = torch.randn(nb, hk, block_size, head_dim, device=DEV).to(dtype)
    vc = torch.randn_like(kc)
    for n in (0, 1, 17, 1000):
        slots = torch.randint(0, nb * block_size, (n,), device=DEV)
        got, want = K.gather_cache(kc, vc, slots), ref.gather_cache(kc, vc, slots)
        for g, w in zip(got, want):
            assert g.shape == (n, hk, head_dim) and g.is_contiguous() and torch.equal(g, w)


# --------------------------------------------------------------------------- paged attention helpers


def make_paged_kv(contexts, hk, head_dim, dtype, block_size=16, spare_blocks=7, max_blocks=None):
    """NaN-filled caches whose blocks (shuffled over the cache) hold random K/V
    for each sequence's positions [0, ctx); block tables padded with block 0."""
    nblk = [-(-c // block_size) for c in contexts]
    total = sum(nblk) + spare_blocks
    max_blocks = max_blocks or max(nblk)
    perm = torch.randperm(total, device=DEV).to(torch.int32)
    kc = torch.full((total, hk, block_size, head_dim), float("nan"), device=DEV, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    bt = torch.zeros(len(contexts), max_blocks, dtype=torch.int32, device=DEV)
    used = 0
    for b, (c, n) in enumerate(zip(contexts, nblk)):
        blocks = perm[used:used + n]
        used += n
        bt[b, :n] = blocks
        fill_sequence(kc, vc, blocks, c)
    return kc, vc, bt


def fill_sequence(kc, vc, blocks, ctx):
    """Random K/V in positions [0, ctx) of the sequence whose blocks are `blocks`."""
    bs = kc.shape[2]
    for i, blk in enumerate(blocks.tolist()):
        n = min(bs, ctx - i * bs)
        if n <= 0:
            break
        kc[blk, :, :n] = torch.randn(kc.shape[1], n, kc.shape[3], device=DEV).to(kc.dtype)
        vc[blk, :, :n] = torch.randn(kc.shape[1], n, kc.shape[3], device=DEV).to(kc.dtype)


def decode_reference(q, kc, vc, bt, ctx_lens, scale):
    return ref.paged_attention_decode(q.float(), kc.float(), vc.float(), bt, ctx_lens, scale)


# --------------------------------------------------------------------------- decode


@pytest.fixture(params=["cluster", "reduce_kernel"])
def split_merge(request, monkeypatch):
    """Split decode merges its partitions in a thread-block cluster (sm_90, up to 8
    partitions) or through paged_attention_reduce_kernel: each test runs both."""
    if request.param == "cluster" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("clusters need sm_90")
    monkeypatch.setattr(A, "CLUSTER_MERGE", request.param == "cluster")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("mode", ["auto", "unsplit", "split3", "split8", "graph_bound"])
def test_paged_attention_decode(dtype, head_dim, group, mode):
    hk = 2
    contexts = CONTEXTS
    kc, vc, bt = make_paged_kv(contexts, hk, head_dim, dtype)
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    q = torch.randn(len(contexts), hk * group, head_dim, device=DEV).to(dtype)
    scale = head_dim ** -0.5
    kwargs = {"auto": {}, "unsplit": {"num_parts": 1}, "split3": {"num_parts": 3}, "split8": {"num_parts": 8},
              "graph_bound": {"max_context_len": 8192}}[mode]
    poison_allocator(q.numel() * 2)
    out = K.paged_attention_decode(q, kc, vc, bt, ctx_lens, scale, **kwargs)
    check(out, decode_reference(q, kc, vc, bt, ctx_lens, scale), dtype, mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,group,block_size", [(64, 1, 16), (128, 4, 16), (128, 8, 32), (64, 6, 16),
                                                       (128, 32, 16)])
def test_paged_attention_decode_single_sequence(dtype, head_dim, group, block_size, split_merge):
    # Batch 1 is where a split merges in a cluster: every context of CONTEXTS, split
    # by the heuristic (graph bound 2048, or the context, or 8192), into 2, 3, 5 or 8 partitions.
    hk = 2
    for ctx in CONTEXTS:
        kc, vc, bt = make_paged_kv([ctx], hk, head_dim, dtype, block_size=block_size)
        ctx_lens = torch.tensor([ctx], dtype=torch.int32, device=DEV)
        q = torch.randn(1, hk * group, head_dim, device=DEV).to(dtype)
        want = decode_reference(q, kc, vc, bt, ctx_lens, 0.1)
        bounds = [{"max_context_len": max(ctx, 2048)}, {"max_context_len": 8192}]
        for kwargs in bounds + [{"num_parts": n} for n in (2, 3, 5, 8)]:
            out = K.paged_attention_decode(q, kc, vc, bt, ctx_lens, 0.1, **kwargs)
            check(out, want, dtype, f"ctx {ctx} {kwargs}")


def test_decode_split_choice():
    # K1-like batches fill the GPU unsplit; small batches with long contexts split.
    assert K.decode_partitions(64, 8, 4, 2048, 16, 132) == 1
    assert K.decode_partitions(16, 8, 4, 8192, 16, 132) == 1  # 128 CTAs: near full bandwidth
    for b, ctx in ((1, 4096), (4, 8192), (1, 131072), (2, 600)):
        parts = K.decode_partitions(b, 8, 4, ctx, 16, 132)
        assert 1 < parts <= ctx // A.MIN_PARTITION_TOKENS  # partitions of 256+ tokens at the bound
    assert K.decode_partitions(1, 8, 4, 300, 16, 132) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [16, 32, 6])
def test_paged_attention_decode_wide_groups(dtype, group):
    # 16 query heads per CTA row tile; 32 -> two CTAs per kv head; 6 -> partial rows.
    hk, head_dim = 2, 128
    contexts = [3, 16, 300, 1500]
    kc, vc, bt = make_paged_kv(contexts, hk, head_dim, dtype)
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    q = torch.randn(len(contexts), hk * group, head_dim, device=DEV).to(dtype)
    for parts in (None, 1, 4):
        out = K.paged_attention_decode(q, kc, vc, bt, ctx_lens, 0.1, num_parts=parts)
        check(out, decode_reference(q, kc, vc, bt, ctx_lens, 0.1), dtype, f"parts={parts}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_decode_block32_and_strided_query(dtype):
    hk, group, head_dim = 4, 4, 128
    contexts = [1, 31, 32, 33, 700]
    kc, vc, bt = make_paged_kv(contexts, hk, head_dim, dtype, block_size=32)
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    hq = hk * group
    qkv = torch.randn(len(contexts), (hq + 2 * hk) * head_dim, device=DEV).to(dtype)
    q = qkv[:, :hq * head_dim].view(len(contexts), hq, head_dim)  # row stride (hq + 2hk) * D
    for parts in (None, 1, 5):
        out = K.paged_attention_decode(q, kc, vc, bt, ctx_lens, 0.09, num_parts=parts)
        check(out, decode_reference(q, kc, vc, bt, ctx_lens, 0.09), dtype, f"parts={parts}")


def test_paged_attention_decode_large_batch():
    # Many CTAs (the K1 shape, short contexts): the unsplit path over several waves.
    dtype, hk, group, head_dim = torch.bfloat16, 8, 4, 128
    contexts = [int(c) for c in torch.randint(1, 600, (64,))]
    kc, vc, bt = make_paged_kv(contexts, hk, head_dim, dtype)
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    q = torch.randn(64, hk * group, head_dim, device=DEV).to(dtype)
    out = K.paged_attention_decode(q, kc, vc, bt, ctx_lens, head_dim ** -0.5)
    check(out, decode_reference(q, kc, vc, bt, ctx_lens, head_dim ** -0.5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_parts,bsz", [(None, 4), (1, 4), (None, 1), (8, 1)])
def test_paged_attention_decode_cuda_graph(dtype, num_parts, bsz, split_merge):
    """Capture decode with max_context_len fixed at a 'max_model_len', replay with
    new contexts, queries and cache contents; compare every replay."""
    hk, group, head_dim, bs, max_len = 2, 4, 128, 16, 4097
    max_blocks = -(-max_len // bs)
    nb = bsz * max_blocks + 3
    kc = torch.full((nb, hk, bs, head_dim), float("nan"), device=DEV, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(nb, device=DEV).to(torch.int32)
    bt = torch.zeros(bsz, max_blocks, dtype=torch.int32, device=DEV)
    ctx_lens = torch.ones(bsz, dtype=torch.int32, device=DEV)
    q = torch.randn(bsz, hk * group, head_dim, device=DEV).to(dtype)
    scale = head_dim ** -0.5

    def load(contexts):
        kc.fill_(float("nan"))
        vc.fill_(float("nan"))
        p = perm[torch.randperm(nb, device=DEV)]
        bt.copy_(p[:bsz * max_blocks].view(bsz, max_blocks))
        for b, c in enumerate(contexts):
            fill_sequence(kc, vc, bt[b], c)
        ctx_lens.copy_(torch.tensor(contexts, dtype=torch.int32))
        q.copy_(torch.randn_like(q, dtype=torch.float32).to(dtype))

    load([5, 17, 300, 4097][:bsz])
    run = lambda: K.paged_attention_decode(q, kc, vc, bt, ctx_lens, scale, max_context_len=max_len,
                                           num_parts=num_parts)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles) outside the graph
        run()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for contexts in ([1, 17, 1000, 4097], [4097, 2049, 256, 15], [16, 1, 255, 33], [2049, 300, 1, 1]):
        contexts = contexts[:bsz]
        load(contexts)
        graph.replay()
        torch.cuda.synchronize()
        check(out, decode_reference(q, kc, vc, bt, ctx_lens, scale), dtype, f"replay {contexts}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ops_in_one_cuda_graph(dtype):
    """A decode layer's ops captured together (as the engine's decode graphs do):
    replays on new inputs equal eager calls on the same inputs, bit for bit."""
    t, hq, hk, d, hidden, inter, max_len = 5, 8, 2, 128, 256, 384, 1024
    cos_sin = ref.rope_cos_sin_cache(d, max_len, 10000.0, None).to(DEV)
    x = torch.randn(t, hidden, device=DEV).to(dtype)
    residual = torch.randn_like(x)
    w = torch.randn(hidden, device=DEV).to(dtype)
    gate_up = torch.randn(t, 2 * inter, device=DEV).to(dtype)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV).to(dtype)
    positions = torch.zeros(t, dtype=torch.int64, device=DEV)
    contexts = [1, 16, 17, 500, 1024]
    kc, vc, bt = make_paged_kv(contexts, hk, d, dtype, max_blocks=max_len // 16)
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    slots = torch.full((t,), -1, dtype=torch.int64, device=DEV)

    def step():
        h, r = K.fused_add_rms_norm(x, residual, w, 1e-5)
        a = K.silu_and_mul(gate_up)
        buf = qkv.clone()  # rotary works in place
        q = buf[:, :hq * d].view(t, hq, d)
        k = buf[:, hq * d:(hq + hk) * d].view(t, hk, d)
        v = buf[:, (hq + hk) * d:].view(t, hk, d)
        q, k = K.rotary_embedding(positions, q, k, cos_sin)
        K.reshape_and_cache(k, v, kc, vc, slots)
        o = K.paged_attention_decode(q, kc, vc, bt, ctx_lens, d ** -0.5, max_context_len=max_len)
        return h, r, a, o

    def new_inputs():
        for z in (x, residual, gate_up, qkv):
            z.copy_(torch.randn(z.shape, device=DEV).to(dtype))
        positions.copy_(ctx_lens.long() - 1)
        # The new token of each sequence goes to its last position's slot.
        last = ctx_lens.long() - 1
        slots.copy_(bt.gather(1, (last // 16)[:, None])[:, 0].long() * 16 + last % 16)

    new_inputs()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        new_inputs()
        graph.replay()
        torch.cuda.synchronize()
        got = [o.clone() for o in outs]
        want = step()
        for name, g_, w_ in zip(("norm", "residual", "silu", "attention"), got, want):
            assert torch.isfinite(g_.float()).all(), name
            assert torch.equal(g_, w_), f"{name}: graph replay differs from eager"


def test_decode_float32_falls_back():
    contexts = [5, 40]
    kc, vc, bt = make_paged_kv(contexts, 2, 96, torch.float32)
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    q = torch.randn(2, 4, 96, device=DEV)
    assert K.fallback_reason("paged_attention_decode", q, kc, vc) is not None
    out = K.paged_attention_decode(q, kc, vc, bt, ctx_lens, 0.1)
    torch.testing.assert_close(out, decode_reference(q, kc, vc, bt, ctx_lens, 0.1))


@pytest.mark.parametrize("head_dim", [80, 96])
def test_decode_odd_head_dim_falls_back(head_dim):
    contexts = [5, 40]
    kc, vc, bt = make_paged_kv(contexts, 2, head_dim, torch.bfloat16)
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    q = torch.randn(2, 4, head_dim, device=DEV).to(torch.bfloat16)
    assert "head_dim" in K.fallback_reason("paged_attention_decode", q, kc, vc)
    out = K.paged_attention_decode(q, kc, vc, bt, ctx_lens, 0.1)
    check(out, decode_reference(q, kc, vc, bt, ctx_lens, 0.1), torch.bfloat16)


def test_decode_bad_shapes_raise():
    kc, vc, bt = make_paged_kv([5], 2, 64, torch.bfloat16)
    ctx = torch.tensor([5], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError):  # Hq not a multiple of Hk
        K.paged_attention_decode(torch.randn(1, 3, 64, device=DEV).bfloat16(), kc, vc, bt, ctx, 0.1)
    with pytest.raises(ValueError):  # head dim mismatch
        K.paged_attention_decode(torch.randn(1, 4, 128, device=DEV).bfloat16(), kc, vc, bt, ctx, 0.1)
    with pytest.raises(ValueError):  # int64 context lengths
        K.paged_attention_decode(torch.randn(1, 4, 64, device=DEV).bfloat16(), kc, vc, bt,
                                 ctx.long(), 0.1)


# --------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_paged_attention_prefill(dtype, head_dim, group):
    # (query rows, context): whole prompts, chunks after a cached prefix, decode rows.
    seqs = [(1, 1), (15, 15), (17, 17), (16, 33), (1, 256), (100, 1000), (7, 2049), (255, 255),
            (1, 17), (300, 4097)]
    hk = 2
    contexts = [c for _, c in seqs]
    kc, vc, bt = make_paged_kv(contexts, hk, head_dim, dtype)
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0] + list(itertools.accumulate(n for n, _ in seqs)),
                       dtype=torch.int32, device=DEV)
    q = torch.randn(int(qsl[-1]), hk * group, head_dim, device=DEV).to(dtype)
    scale = head_dim ** -0.5
    poison_allocator(q.numel() * 2)
    out = K.paged_attention(q, kc, vc, bt, qsl, ctx_lens, scale)
    want = ref.paged_attention(q.float(), kc.float(), vc.float(), bt, qsl, ctx_lens, scale)
    check(out, want, dtype)
    # Per sequence too, so a short sequence's error is not hidden by the long ones.
    for b in range(len(seqs)):
        s, e = int(qsl[b]), int(qsl[b + 1])
        check(out[s:e], want[s:e], dtype, f"sequence {b} {seqs[b]}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("cached", [True, False], ids=["cached_context", "fresh_chunks"])
def test_planned_flash_prefill(dtype, head_dim, group, cached):
    """The model runner's path: the plan built on the host (no sync in the layers), q/k/v
    views of one fused qkv row, the output a slice of a mixed step's. With cached context
    the keys are gathered from the cache; without, the step's own K/V rows are read in place."""
    from ops.prefill_attention import PrefillPlan, flash_prefill, plan_prefill
    seqs = [(1, 1), (15, 15), (17, 17), (16, 33), (100, 1000), (7, 2049), (1, 17), (300, 4097)]
    if not cached:
        seqs = [(n, n) for n in (1, 15, 17, 33, 1000, 300)]
    hk, bs, d = 2, 16, head_dim
    hq, contexts, q_lens = hk * group, [c for _, c in seqs], [n for n, _ in seqs]
    kc, vc, bt = make_paged_kv(contexts, hk, d, dtype, block_size=bs)
    tables = [row[:-(-c // bs)] for row, c in zip(bt.tolist(), contexts)]
    arrays = [torch.from_numpy(a).to(DEV) for a in plan_prefill(q_lens, contexts, tables, bs)]
    assert len(arrays) == (3 if cached else 2)
    plan = PrefillPlan(*arrays[:2], arrays[2] if cached else None, max_q=max(q_lens), max_k=max(contexts))
    t = sum(q_lens)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV).to(dtype)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hk * d, hk * d], dim=1))
    new_slots = torch.tensor([row[p // bs] * bs + p % bs for row, n, c in zip(tables, q_lens, contexts)
                              for p in range(c - n, c)], device=DEV)
    k[:], v[:] = ref.gather_cache(kc, vc, new_slots)  # the step's rows, as written to the cache
    nd, scale = 3, d ** -0.5
    mixed = torch.full((nd + t, hq, d), float("nan"), device=DEV, dtype=dtype)
    out = flash_prefill(q, k, v, kc, vc, plan, scale, out=mixed[nd:])
    assert out.data_ptr() == mixed[nd:].data_ptr() and mixed[:nd].isnan().all()
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    want = ref.paged_attention(q.float(), kc.float(), vc.float(), bt, plan.cu_q, ctx_lens, scale)
    check(out, want, dtype)
    torch.testing.assert_close(out, K.paged_attention(q, kc, vc, bt, plan.cu_q, ctx_lens, scale),
                               rtol=0, atol=0)  # the unplanned flash path: the same kernel


def test_decode_matches_prefill_path():
    # The same decode batch through both entry points.
    dtype, hk, group, head_dim = torch.float16, 4, 8, 64
    contexts = CONTEXTS
    kc, vc, bt = make_paged_kv(contexts, hk, head_dim, dtype)
    ctx_lens = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    q = torch.randn(len(contexts), hk * group, head_dim, device=DEV).to(dtype)
    qsl = torch.arange(len(contexts) + 1, dtype=torch.int32, device=DEV)
    a = K.paged_attention_decode(q, kc, vc, bt, ctx_lens, 0.125)
    b = K.paged_attention(q, kc, vc, bt, qsl, ctx_lens, 0.125)
    assert rel_err(a, b.float()) < 2 * TOL[dtype]
    assert math.isfinite(rel_err(b, a.float()))
