"""The weight-GEMM floor of one decode step (DESIGN.md), and device copy bandwidth.

Random matrices of one decode step's shapes: per layer x@Wqkv, x@Wo, x@Wgate_up, x@Wdown,
then the lm_head, captured once in a CUDA graph and replayed; the median replay time is
the floor for that batch size on this GPU in this run. With --tp 2, two processes (one
GPU each, NCCL) each hold half of every weight (column halves of qkv/gate_up/lm_head,
row halves of o/down) and all-reduce after Wo and Wdown inside the graph.
On the CPU (--shape tiny) the same GEMMs are timed eagerly, without a graph (labelled).

    python3 -m benchmarks.floor                       # TP=1, batches 1,64,256
    python3 -m benchmarks.floor --tp 2                # needs 2 GPUs
    python3 -m benchmarks.floor --shape tiny          # CPU smoke test

Other scripts call gemm_floor_ms(batch) for a same-run ratio.
"""
from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import (SHAPES, default_device, default_dtype, free_port, median, print_table,
                               write_result)

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def weight_shapes(shape: str, tp: int = 1) -> tuple[list[tuple[str, int, int]], tuple[int, int]]:
    """One layer's (name, out_features, in_features) on one rank, and the lm_head's (out, in).
    Column-parallel weights split the output dim, row-parallel ones the input dim."""
    s = SHAPES[shape]
    h, inter = s["hidden_size"], s["intermediate_size"]
    hd = h // s["num_attention_heads"]
    qkv = (s["num_attention_heads"] + 2 * s["num_key_value_heads"]) * hd
    layer = [("qkv", qkv // tp, h), ("o", h, s["num_attention_heads"] * hd // tp),
             ("gate_up", 2 * inter // tp, h), ("down", h, inter // tp)]
    return layer, (s["vocab_size"] // tp, h)


def weight_bytes(shape: str, tp: int = 1, itemsize: int = 2) -> int:
    layer, head = weight_shapes(shape, tp)
    per_layer = sum(o * i for _, o, i in layer)
    return itemsize * (SHAPES[shape]["num_hidden_layers"] * per_layer + head[0] * head[1])


class DecodeGemms:
    """The weights of one step (one rank's share) and a function that runs its GEMMs."""

    def __init__(self, shape: str, tp: int, device, dtype):
        import torch
        self.torch, self.tp, self.device, self.dtype = torch, tp, device, dtype
        layer, (vocab, hidden) = weight_shapes(shape, tp)
        gen = torch.Generator(device=device).manual_seed(0)
        rand = lambda *sz: torch.randn(*sz, generator=gen, device=device, dtype=dtype)
        # Distinct matrices per layer: 15 GB at Llama-3-8B, far larger than L2, as in the model.
        self.layers = [{n: rand(o, i) for n, o, i in layer} for _ in range(SHAPES[shape]["num_hidden_layers"])]
        self.lm_head = rand(vocab, hidden)
        self.in_dims = {n: i for n, _, i in layer}

    def inputs(self, batch: int) -> dict:
        t = self.torch
        return {n: 0.01 * t.randn(batch, i, device=self.device, dtype=self.dtype) for n, i in self.in_dims.items()}

    def step(self, x: dict) -> None:
        F, dist = self.torch.nn.functional, self.torch.distributed
        for w in self.layers:
            F.linear(x["qkv"], w["qkv"])
            y = F.linear(x["o"], w["o"])
            if self.tp > 1:
                dist.all_reduce(y)  # row-parallel output: partial sums from every rank
            F.linear(x["gate_up"], w["gate_up"])
            y = F.linear(x["down"], w["down"])
            if self.tp > 1:
                dist.all_reduce(y)
        F.linear(x["qkv"], self.lm_head)  # x["qkv"] has the hidden width


def _time_graph(torch, fn, replays: int) -> list[float]:
    """Capture fn once in a CUDA graph; seconds of each replay (CUDA events)."""
    fn()  # eager warm-up: cuBLAS handles and the NCCL communicator exist before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return [s.elapsed_time(e) / 1e3 for s, e in events]


def _time_eager(fn, replays: int) -> list[float]:
    fn()
    times = []
    for _ in range(replays):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def floor_ms(shape: str, batches: list[int], tp: int = 1, device: str = "cuda", dtype: str = "bfloat16",
             replays: int = 50) -> dict[int, float]:
    """Median step time (ms) per batch size, in this process (rank/process group already set up)."""
    import torch
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    out = {}
    with torch.inference_mode():
        gemms = DecodeGemms(shape, tp, dev, getattr(torch, DTYPES[dtype]))
        for b in batches:
            x = gemms.inputs(b)
            times = _time_graph(torch, lambda: gemms.step(x), replays) if device == "cuda" \
                else _time_eager(lambda: gemms.step(x), replays)
            out[b] = round(1e3 * median(times), 4)
        del gemms, x  # free the weights (15 GB at Llama-3-8B) for whatever runs next
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def gemm_floor_ms(batch: int, tp: int = 1, shape: str = "llama3-8b", device: str | None = None,
                  dtype: str | None = None, replays: int = 50) -> float:
    """The floor (ms) at one batch size, in this process (tp=1 only: TP needs run_tp())."""
    if tp != 1:
        return run_tp(shape, [batch], tp, device or default_device(shape), dtype, replays)[batch]
    device = device or default_device(shape)
    return floor_ms(shape, [batch], 1, device, dtype or default_dtype(device), replays)[batch]


def copy_bandwidth(device: str, nbytes: int | None = None, iters: int = 20) -> float:
    """Device-to-device copy: bytes read + written per second (median of iters)."""
    import torch
    nbytes = nbytes or (2**31 if device == "cuda" else 2**26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)  # same dtype, contiguous: copy_ is one cudaMemcpyAsync
    if device == "cuda":
        times = []
        for _ in range(iters + 3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        times = times[3:]
    else:
        times = _time_eager(lambda: dst.copy_(src), iters)
    return 2 * nbytes / median(times)


# ---- TP: one process per rank ----

def _tp_rank(rank: int, tp: int, port: int, shape: str, batches: list[int], device: str, dtype: str,
             replays: int, queue) -> None:
    import torch
    import torch.distributed as dist
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:  # share the cores: oversubscribed ranks would time thread contention, not GEMMs
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=tp)
    try:
        result = floor_ms(shape, batches, tp, device, dtype, replays)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run_tp(shape: str, batches: list[int], tp: int, device: str, dtype: str | None, replays: int) -> dict:
    """Spawn tp processes (one GPU each); rank 0's medians."""
    import torch.multiprocessing as mp
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (shared hosts)
    if device == "cuda":
        import torch
        if torch.cuda.device_count() < tp:
            raise SystemExit(f"--tp {tp} needs {tp} GPUs; this machine has {torch.cuda.device_count()}")
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_tp_rank, args=(tp, free_port(), shape, batches, device, dtype or default_dtype(device),
                             replays, queue), nprocs=tp, join=True)
    return queue.get()



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda, or cpu for --shape tiny")
    p.add_argument("--dtype", help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tp", type=int, default=1, help="ranks, one process and GPU each")
    p.add_argument("--batches", default="1,64,256", help="comma-separated batch sizes")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = args.device or default_device(args.shape)
    dtype = args.dtype or default_dtype(device)
    batches = [int(b) for b in args.batches.split(",")]
    # First, on a fresh device: after the GEMM runs the same copy read up to 10% lower.
    bw = copy_bandwidth(device)
    if args.tp == 1:
        floors = floor_ms(args.shape, batches, 1, device, dtype, args.replays)
    else:
        floors = run_tp(args.shape, batches, args.tp, device, dtype, args.replays)
    itemsize = 4 if dtype == "float32" else 2
    wbytes = weight_bytes(args.shape, args.tp, itemsize)
    mode = "cuda graph replay" if device == "cuda" else "eager matmuls on the CPU (no CUDA graph)"
    payload = {"config": {"shape": args.shape, "dtype": dtype, "tp": args.tp, "replays": args.replays,
                          "mode": mode, "weight_bytes_per_rank": wbytes},
               "results": {"floor_ms": {str(b): v for b, v in floors.items()},
                           "copy_bw_TBps": round(bw / 1e12, 4),
                           "bound_ms_at_copy_bw": round(1e3 * wbytes / bw, 4)}}
    write_result("floor", payload, args.out, device, tag=f"tp{args.tp}")
    print(f"weight-GEMM floor, {args.shape}, TP={args.tp}, {mode}; copy {bw / 1e12:.3f} TB/s, "
          f"{wbytes / 1e9:.2f} GB/rank -> bound {1e3 * wbytes / bw:.3f} ms")
    print_table(["batch", "floor_ms"], [[b, v] for b, v in floors.items()])


if __name__ == "__main__":
    main()
