"""The custom (symmetric-memory) all-reduce against NCCL on two GPUs: bit-identical
sums for one-shot and two-shot sizes, bf16 and fp32, eagerly and replayed from a CUDA
graph with fresh inputs."""
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
    from workers.communicator import ONE_SHOT_MAX_BYTES, SymmMemAllReduce, unavailable_reason
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
        assert parallel_state.init_custom_all_reduce(dev, torch.float16) is False  # fp16: NCCL
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


def test_custom_all_reduce_equals_nccl():
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_check, args=(port,), nprocs=2, start_method="spawn")
