"""Greedy sampling's argmax over Llama-3 logits: torch.argmax vs the CuPy kernels
(ops/argmax.cu), rows 1, 64, 256: --calls calls captured in one CUDA graph, the median
replay (of --replays) divided by --calls, so that the graph's own launch is left out.

    python3 -m benchmarks.argmax
"""
from __future__ import annotations

import argparse

from benchmarks.common import median, print_table, require_cuda, write_result
from benchmarks.floor import _time_graph


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--rows", default="1,64,256")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    require_cuda("argmax")
    import torch
    from ops import cupy_ops
    rows = []
    for n in (int(r) for r in args.rows.split(",")):
        logits = torch.randn(n, args.vocab, device="cuda")
        assert torch.equal(cupy_ops.argmax(logits), logits.argmax(dim=-1))
        per_call = lambda fn: 1e6 * median(_time_graph(torch, lambda: [fn(logits) for _ in range(args.calls)],
                                                       args.replays)) / args.calls
        torch_us = per_call(lambda x: x.argmax(dim=-1))
        kernel_us = per_call(cupy_ops.argmax)
        rows.append({"rows": n, "torch_us": round(torch_us, 2), "kernel_us": round(kernel_us, 2),
                     "speedup": round(torch_us / kernel_us, 2)})
    write_result("argmax", {"config": vars(args), "results": rows}, args.out)
    print_table(["rows", "torch_us", "kernel_us", "speedup"], [list(r.values()) for r in rows])


if __name__ == "__main__":
    main()
