"""Per-step round trip of the Ray executor: driver -> every TP worker -> rank 0's reply.

Two numbers per TP size:
- empty step: a SchedulerOutput with no tokens (broadcast + actor call + reply, no model);
- decode step: one running sequence decoding one token per step (the whole engine step),
  with rank 0's own time inside it, so the difference is what Ray and the driver add.

    python -m benchmarks.step_roundtrip --tp 1 2 --steps 200
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from driver import LLM, SamplingParams
from driver.protocol import SchedulerOutput


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(model: str, tp: int, device: str, steps: int) -> dict:
    with LLM(model=model, tensor_parallel_size=tp, device=device, dtype="auto") as llm:
        engine = llm.engine
        empty = []
        for i in range(steps + 10):
            t = time.perf_counter()
            engine.executor.execute_model(SchedulerOutput(step_id=-1 - i))
            empty.append(time.perf_counter() - t)
        empty = empty[10:]  # warm-up
        engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=steps + 12, ignore_eos=True))
        step = []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            step.append(time.perf_counter() - t)
        snap = engine.metrics.snapshot()
        step = step[10:]
    ms = lambda x: round(1e3 * x, 3)
    return {"tp": tp, "device": device,
            "empty_step_ms": {"p50": ms(statistics.median(empty)), "p99": ms(_pct(empty, 0.99))},
            "decode_step_ms": {"p50": ms(statistics.median(step)), "p99": ms(_pct(step, 0.99))},
            "rank0_gpu_ms_mean": ms(snap["mean_gpu_step_s"]), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON result")
    args = parser.parse_args()
    if args.model is None:
        from driver.demo import demo_checkpoint_dir
        args.model = demo_checkpoint_dir()
    rows = [measure(args.model, tp, args.device, args.steps) for tp in args.tp]
    result = {"benchmark": "step_roundtrip", "date": time.strftime("%Y-%m-%d"),
              "device": f"{args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "command": "python -m benchmarks." + " ".join(["step_roundtrip"] + sys.argv[1:]), "results": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"step_roundtrip_{args.device}_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'tp':>3} {'empty p50':>10} {'empty p99':>10} {'decode p50':>11} {'decode p99':>11} {'rank0 ms':>9}")
    for r in rows:
        print(f"{r['tp']:>3} {r['empty_step_ms']['p50']:>10} {r['empty_step_ms']['p99']:>10} "
              f"{r['decode_step_ms']['p50']:>11} {r['decode_step_ms']['p99']:>11} {r['rank0_gpu_ms_mean']:>9}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
