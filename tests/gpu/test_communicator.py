"""The custom (symmetric-memory) all-reduces against NCCL on two GPUs: bit-identical
sums for one-shot and two-shot sizes, bf16 and fp32, and the fused all-reduce + add +
RMSNorm kernel against NCCL + the norm kernel (bit-identical) and against its torch
reference; eagerly and replayed from CUDA graphs with fresh inputs."""
from __future__ import annotations

import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

HIDDEN = 4096
TOKENS = (1, 3, 64, 256)  # 8 KiB ... 2 MiB in bf16: both kernels


def _check(rank: int, port: int) -> None:
    import torch.distributed as dist
    from workers import parallel_state
    from workers.communicator import (ONE_SHOT_MAX_BYTES, FusedAllReduceRMSNorm, SymmMemAllReduce,
                                      unavailable_reason)
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    parallel_state.init_distributed("nccl", f"tcp://127.0.0.1:{port}", 2, rank)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            assert unavailable_reason(dev, dtype) is None
            comm = SymmMemAllReduce(dist.group.WORLD.group_name, dev, dtype)
            sizes = {t * HIDDEN * dtype.itemsize for t in TOKENS}
            assert min(sizes) <= ONE_SHOT_MAX_BYTES < max(sizes)  # both paths run
            for tokens in TOKENS:
                gen = torch.Generator(device=dev).manual_seed(1000 * rank + tokens)
                x = torch.randn(tokens, HIDDEN, device=dev, dtype=dtype, generator=gen)
                assert comm.fits(x)
                expect = x.clone()
                dist.all_reduce(expect)
                before = x.clone()
                got = comm.all_reduce(x)
                assert torch.equal(got, expect), (dtype, tokens)
                assert torch.equal(x, before)  # out of place
                _check_graph(comm, x, rank, dtype)
        assert not SymmMemAllReduce(dist.group.WORLD.group_name, dev, torch.bfloat16).fits(
            torch.zeros(3, device=dev, dtype=torch.bfloat16))  # 6 bytes: not 16-byte aligned
        for dtype in (torch.bfloat16, torch.float16):
            fused = FusedAllReduceRMSNorm(dist.group.WORLD.group_name, dev, dtype)
            for rows, hidden in ((1, 4096), (64, 4096), (300, 4096), (7, 256), (3, 5120)):
                _check_fused(fused, rank, rows, hidden, dtype)
            _check_fused_graph(fused, rank, dtype)
            _check_fused_back_to_back(fused, rank, dtype)
        assert parallel_state.init_custom_all_reduce(dev, torch.float16) is True  # the fused kernel only
        assert parallel_state._custom_all_reduce is None and parallel_state._fused_all_reduce_norm is not None
    finally:
        parallel_state.destroy_distributed()


def _check_graph(comm, x, rank, dtype) -> None:
    import torch.distributed as dist
    gen = torch.Generator(device=x.device).manual_seed(7 + rank)  # different inputs per rank
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        comm.all_reduce(static)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = comm.all_reduce(static)
    for i in range(3):
        static.copy_(torch.randn(x.shape, device=x.device, dtype=dtype, generator=gen))
        expect = static.clone()
        dist.all_reduce(expect)
        graph.replay()
        assert torch.equal(out, expect), (dtype, x.shape, i)


def _fused_inputs(rank, rows, hidden, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed + rank)  # partials differ per rank...
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=gen)
    gen.manual_seed(seed)  # ...the residual and weight are replicated
    residual = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=gen)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=gen)).to(dtype)
    return x, residual, weight


def _expected(x, residual, weight, eps):
    import torch.distributed as dist
    from ops import cupy_ops, reference
    reduced = x.clone()
    dist.all_reduce(reduced)
    parts = [torch.empty_like(x) for _ in range(2)]
    dist.all_gather(parts, x)
    return cupy_ops.fused_add_rms_norm(reduced, residual, weight, eps), \
        reference.all_reduce_rms_norm(parts, residual, weight, eps)


def _check_fused(fused, rank, rows, hidden, dtype) -> None:
    x, residual, weight = _fused_inputs(rank, rows, hidden, dtype, seed=rows * hidden)
    assert fused.fits(x, residual, weight)
    (want_out, want_res), (ref_out, ref_res) = _expected(x, residual, weight, 1e-5)
    out, res = fused(x, residual, weight, 1e-5)
    assert torch.equal(res, want_res) and torch.equal(out, want_out), (dtype, rows, hidden)
    assert torch.equal(res, ref_res)  # the sum and add round exactly as the reference
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)


def _check_fused_graph(fused, rank, dtype) -> None:
    x, residual, weight = _fused_inputs(rank, 64, 4096, dtype, seed=5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused(x, residual, weight, 1e-5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # two in a row: the second overwrites the buffer the first read
        mid, mid_res = fused(x, residual, weight, 1e-5)
        out, res = fused(mid, mid_res, weight, 1e-5)
    for i in range(3):
        fresh = _fused_inputs(rank, 64, 4096, dtype, seed=100 + i)
        for static, new in zip((x, residual, weight), fresh):
            static.copy_(new)
        graph.replay()
        want_mid, want_mid_res = _expected(x, residual, weight, 1e-5)[0]
        want, want_res = _expected(want_mid, want_mid_res, weight, 1e-5)[0]
        assert torch.equal(res, want_res) and torch.equal(out, want), (dtype, i)


def _check_fused_back_to_back(fused, rank, dtype) -> None:
    """Calls with changing grids and no other collective between them: each reuses a
    buffer half two calls after a peer read it, with no barrier at the kernel's end."""
    rows = [64, 300, 1, 200, 7, 132, 133, 64] * 4
    inputs = [_fused_inputs(rank, n, 4096, dtype, seed=1000 + i) for i, n in enumerate(rows)]
    if rank == 1:
        torch.cuda._sleep(50_000_000)  # start later than rank 0, so rank 0 runs ahead where it can
    outs = [fused(x, r, w, 1e-5) for x, r, w in inputs]
    for i, ((x, r, w), (out, res)) in enumerate(zip(inputs, outs)):
        want, want_res = _expected(x, r, w, 1e-5)[0]
        assert torch.equal(res, want_res) and torch.equal(out, want), (dtype, i, rows[i])


def test_custom_all_reduce_equals_nccl():
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_check, args=(port,), nprocs=2, start_method="spawn")
