"""All-reduce latency at decode sizes on 2 GPUs: NCCL vs torch symmetric memory,
and raytp's custom all-reduce (workers/communicator.py, which picks one of them).

Each variant is captured `--calls` times in one CUDA graph and replayed; the median
replay over --calls is the per-call latency (what a decode graph pays per all-reduce).
Sizes are Llama-3-8B hidden states (4096 bf16) at batch 1, 64, 128 and 256.

    python3 -m benchmarks.allreduce_latency          # needs 2 GPUs (nvidia-h200-x2)
"""
from __future__ import annotations

import argparse
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import print_table, require_cuda, write_result
from workers.communicator import SymmMemAllReduce

HIDDEN = 4096


def _time_graph(fn, calls: int, reps: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def _variants(x: torch.Tensor) -> dict:
    import torch.distributed._symmetric_memory as symm_mem
    group = dist.group.WORLD.group_name
    buf = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
    symm_mem.rendezvous(buf, group)
    out = torch.empty_like(x)
    ops = torch.ops.symm_mem
    ours = SymmMemAllReduce(group, x.device, x.dtype)

    def one_shot():  # the copy into the buffer fused into the kernel
        ops.one_shot_all_reduce_copy_out(buf, x, "sum", group, out)

    def two_shot():
        buf.copy_(x)
        ops.two_shot_all_reduce_out(buf, "sum", group, out)

    return {"nccl": lambda: dist.all_reduce(x), "symm_one_shot": one_shot, "symm_two_shot": two_shot,
            "raytp": lambda: ours.all_reduce(x)}


def _worker(rank: int, port: int, args, queue) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank,
                            device_id=torch.device("cuda", rank))
    rows = []
    for batch in args.batches:
        x = torch.randn(batch * HIDDEN, device="cuda", dtype=torch.bfloat16)
        row = {"batch": batch, "bytes": x.numel() * 2}
        for name, fn in _variants(x).items():
            try:
                row[f"{name}_us"] = round(_time_graph(fn, args.calls, args.reps) * 1e6, 2)
            except Exception as e:  # report, keep measuring the others
                row[f"{name}_us"] = f"failed: {type(e).__name__}: {e}"[:200]
        rows.append(row)
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 128, 256])
    p.add_argument("--calls", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    require_cuda("allreduce_latency", 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(port, args, queue), nprocs=2, start_method="spawn")
    rows = queue.get()
    write_result("allreduce_latency", {"config": vars(args), "rows": rows}, args.out, "cuda")
    keys = sorted({k for r in rows for k in r if k.endswith("_us")})
    print_table(["batch", "bytes"] + keys, [[r["batch"], r["bytes"]] + [r.get(k) for k in keys] for r in rows])


if __name__ == "__main__":
    main()
