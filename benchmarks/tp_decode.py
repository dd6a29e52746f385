"""Decode step time at batch 64, TP=1 vs TP=2 on the same machine (goal: tp1/tp2 >= 1.35).

For each TP size an engine gets 64 requests (short prompts, many output tokens); the
script drives llm.engine.step() itself and times each step's wall (perf_counter),
keeping only steps that decoded the whole batch (no prefill tokens, one token for every
request): the median over --steps such steps, after --warmup of them. The TP=1 engine
is shut down before the TP=2 one starts.

Where a step's wall exceeds its GPU time, the host chain is the cause: rank 0's phases
(`rank0_host`: prepare, forward, wait_prev, sample; `call_gap`: its idle time between two
calls, i.e. the driver's and Ray's leg) and the driver's (`driver`: schedule + submit,
collect, update + outputs). With two steps in flight a step's launch waits for call_gap;
--steps-in-flight 3 queues the next call before it is needed.

    python3 -m benchmarks.tp_decode                         # needs 2 GPUs
    python3 -m benchmarks.tp_decode --tps 1,2 --floor       # plus same-run GEMM floors
    python3 -m benchmarks.tp_decode --compare-nccl          # TP>1 also with NCCL all-reduce only
    python3 -m benchmarks.tp_decode --shape tiny            # CPU smoke test (2 CPU workers)
"""
from __future__ import annotations

import argparse
import time

from benchmarks.common import (add_common_args, make_llm, make_prompts, median, ms, print_table,
                               resolve_args, sampling, wait_gpu_free, write_result)

GOAL_RATIO = 1.35


def decode_step_times(engine, batch: int, max_steps: int) -> list[tuple[float, float, dict, dict]]:
    """Step the engine; (wall, rank 0's GPU seconds, rank 0's host phase seconds, the
    driver's phase seconds) of each step that decoded all `batch` requests (no prefill
    tokens, one sampled token per request)."""
    m, times = engine.metrics, []
    delta = lambda now, before: {k: v - before.get(k, 0.0) for k, v in now.items()}
    while engine.has_unfinished_requests() and len(times) < max_steps:
        prompt0, gen0, gpu0 = m.num_prompt_tokens, m.num_generated_tokens, m.gpu_time_s
        phases0, driver0 = dict(m.phase_time_s), dict(m.driver_time_s)
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        if m.num_prompt_tokens == prompt0 and m.num_generated_tokens - gen0 == batch:
            times.append((dt, m.gpu_time_s - gpu0, delta(m.phase_time_s, phases0), delta(m.driver_time_s, driver0)))
    return times


def measure(args, tp: int, nccl_only: bool = False) -> dict:
    prompts = make_prompts(args.shape, [args.prompt_len] * args.batch, seed=tp)
    with make_llm(args, tp=tp, disable_custom_all_reduce=nccl_only) as llm:
        custom = llm.engine.executor.custom_all_reduce
        engine = llm.engine
        # Enough tokens that nobody finishes before the last timed step (prefill takes a few steps).
        max_tokens = args.warmup + args.steps + 64
        for p in prompts:
            engine.add_request(p, sampling(max_tokens))
        rows = decode_step_times(engine, args.batch, args.warmup + args.steps)[args.warmup:]
    if len(rows) < args.steps:
        raise RuntimeError(f"tp={tp}: only {len(rows)} full-batch decode steps; raise max tokens")
    times = [wall for wall, *_ in rows]
    mean_ms = lambda i, k: ms(sum(r[i].get(k, 0.0) for r in rows) / len(rows))
    host = {k.removesuffix("_s") + "_ms_mean": mean_ms(2, k) for k in rows[0][2] if k != "gpu_step_s"}
    driver = {k.removesuffix("_s") + "_ms_mean": mean_ms(3, k) for k in rows[0][3]}
    return {"tp": tp, "all_reduce": "custom" if custom else ("nccl" if args.device == "cuda" else "gloo"), "step_ms_p50": ms(median(times)), "step_ms_min": ms(min(times)),
            "step_ms_max": ms(max(times)), "gpu_ms_p50": ms(median([g for _, g, *_ in rows])),
            "steps": len(rows), "rank0_host": host, "driver": driver}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--tps", default="1,2", help="comma-separated TP sizes, run one after the other")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="timed full-batch decode steps")
    p.add_argument("--warmup", type=int, default=5, help="full-batch decode steps not timed")
    p.add_argument("--floor", action="store_true", help="also measure the GEMM floor at --batch per TP")
    p.add_argument("--compare-nccl", action="store_true",
                   help="also measure each TP>1 with the custom all-reduce off (NCCL only)")
    args = resolve_args(p.parse_args())
    tps = [int(t) for t in args.tps.split(",")]
    rows = [measure(args, tp) for tp in tps]  # each engine is shut down before the next starts
    if args.compare_nccl:
        rows += [measure(args, tp, nccl_only=True) for tp in tps if tp > 1]
    if args.floor:
        from benchmarks.floor import gemm_floor_ms
        if args.device == "cuda":
            wait_gpu_free()
        floors = {tp: gemm_floor_ms(args.batch, tp=tp, shape=args.shape, device=args.device, dtype=args.dtype)
                  for tp in tps}
        for r in rows:
            r["floor_ms"] = floors[r["tp"]]
            r["step_over_floor"] = round(r["step_ms_p50"] / r["floor_ms"], 3)
    by_tp = {r["tp"]: r["step_ms_p50"] for r in reversed(rows)}  # the default engine's row wins
    ratio = round(by_tp[1] / by_tp[2], 3) if 1 in by_tp and 2 in by_tp else None
    config = {k: getattr(args, k) for k in ("shape", "dtype", "batch", "prompt_len", "steps", "warmup",
                                            "max_model_len", "enforce_eager", "steps_in_flight")}
    write_result("tp_decode", {"config": config, "goal_tp1_over_tp2": GOAL_RATIO,
                               "results": {"rows": rows, "tp1_over_tp2": ratio}}, args.out, args.device)
    print_table(["tp", "all_reduce", "step_ms_p50", "step_ms_min", "gpu_ms_p50", "rank0_host_ms", "call_gap_ms",
                 "floor_ms", "step/floor"],
                [[r["tp"], r["all_reduce"], r["step_ms_p50"], r["step_ms_min"], r["gpu_ms_p50"],
                  r["rank0_host"].get("worker_step_ms_mean"), r["rank0_host"].get("call_gap_ms_mean"),
                  r.get("floor_ms"), r.get("step_over_floor")]
                 for r in rows])
    print(f"tp1/tp2 decode step: {ratio} (goal >= {GOAL_RATIO})")


if __name__ == "__main__":
    main()
