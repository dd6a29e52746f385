"""Driver overhead at batch 64 decode: engine step wall vs rank 0's time inside the step.

ModelRunnerOutput.timings["gpu_step_s"] is the step's span on rank 0's GPU (CUDA events
from its first input copy to its last copy out); whatever else the wall holds is driver
(schedule, update, outputs), Ray (broadcast, reply) and worker host time that did not
overlap the GPU. overhead = (step wall - gpu_step_s) / step wall, median over
full-batch decode steps (goal <= 3%). Two kinds of step, alternating on one engine:
  1. engine.step() as is; GPU time from engine.metrics (its per-step delta);
  2. the same step written out (mirroring LLMEngine.step) to time each part: schedule
     and submit (step N+1 with async scheduling), wait for step N, update, outputs.
With async scheduling the driver's parts overlap the workers' step N, so the step wall
approaches the GPU time; `--no-async` measures the synchronous loop.

    python3 -m benchmarks.driver_overhead
    python3 -m benchmarks.driver_overhead --shape tiny        # CPU smoke test
"""
from __future__ import annotations

import argparse
import time

from benchmarks.common import (add_common_args, make_llm, make_prompts, median, ms, print_table,
                               profile_top, resolve_args, sampling, write_result)

GOAL = 0.03
PARTS = ("schedule_submit", "wait", "update", "outputs")


def plain_step(engine) -> tuple[dict, int]:
    """engine.step() as is: its wall and rank 0's GPU time (the metrics' per-step delta)."""
    m = engine.metrics
    prompt0, gen0, gpu0 = m.num_prompt_tokens, m.num_generated_tokens, m.gpu_time_s
    t = time.perf_counter()
    engine.step()
    wall = time.perf_counter() - t
    # Decodes in this step: tokens sampled, when no prefill tokens ran alongside.
    decodes = m.num_generated_tokens - gen0 if m.num_prompt_tokens == prompt0 else 0
    return {"wall": wall, "gpu": m.gpu_time_s - gpu0}, decodes


def mirrored_step(engine) -> tuple[dict, int]:
    """LLMEngine.step written out with a timer between the parts (same calls, same order)."""
    t0 = time.perf_counter()
    while len(engine._in_flight) < engine._max_in_flight:
        so = engine.scheduler.schedule()
        if so.is_empty:
            break
        engine._in_flight.append((so, engine.executor.submit(so)))
    t1 = time.perf_counter()
    if not engine._in_flight:
        return {}, 0
    so, handle = engine._in_flight.popleft()
    result = engine.executor.collect(handle)
    t2 = time.perf_counter()
    groups = engine.scheduler.update_from_output(so, result)
    engine.metrics.record_step(so, result, time.perf_counter() - t0, engine.scheduler)
    t3 = time.perf_counter()
    for group in groups:  # no public hook for this part: step() frees finished groups here
        engine._make_output(group)
    t4 = time.perf_counter()
    decodes = len(so.req_ids) if all(k == 1 for k in so.num_scheduled_tokens) else 0
    return {"schedule_submit": t1 - t0, "wait": t2 - t1, "update": t3 - t2, "outputs": t4 - t3,
            "wall": t4 - t0, "gpu": result.timings.get("gpu_step_s", 0.0)}, decodes


def run_steps(engine, batch: int, n: int, warmup: int) -> tuple[list[dict], list[dict]]:
    """Alternate the two kinds of step, so both see the same context lengths; keep the
    steps that decoded the whole batch, after `warmup` of them."""
    plain, mirrored, seen = [], [], 0
    while engine.has_unfinished_requests() and min(len(plain), len(mirrored)) < n:
        use_plain = seen % 2 == 0
        row, decodes = plain_step(engine) if use_plain else mirrored_step(engine)
        if decodes == batch:
            seen += 1
            if seen > warmup:
                (plain if use_plain else mirrored).append(row)
    return plain, mirrored


def summarize(rows: list[dict]) -> dict:
    out = {f"{k}_ms_p50": ms(median([r[k] for r in rows])) for k in rows[0]}
    out["overhead_p50"] = round(median([(r["wall"] - r["gpu"]) / r["wall"] for r in rows]), 4)
    out["steps"] = len(rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="timed full-batch decode steps per loop")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="then profile 20 more steps (torch.profiler)")
    p.add_argument("--profile-rank", type=int, default=0, help="whose ops --profile reports (default: 0)")
    p.add_argument("--trace-dir", help="with --profile: write the ranks' timelines there (rank<r>.json, "
                   "Chrome trace) and print the device's idle gaps")
    p.add_argument("--no-async", dest="async_scheduling", action="store_false",
                   help="the synchronous engine loop (schedule, run, update, one step at a time)")
    args = resolve_args(p.parse_args())
    prompts = make_prompts(args.shape, [args.prompt_len] * args.batch, seed=0)
    with make_llm(args, tp=args.tp, async_scheduling=args.async_scheduling) as llm:
        engine = llm.engine
        for prompt in prompts:
            engine.add_request(prompt, sampling(args.warmup + 2 * args.steps + 64))
        plain, mirrored = (summarize(rows) for rows in run_steps(engine, args.batch, args.steps, args.warmup))
        top = (profile_top(llm, lambda: [engine.step() for _ in range(20)], rank=args.profile_rank,
                           trace_dir=args.trace_dir)
               if args.profile else None)
    config = {k: getattr(args, k) for k in ("shape", "dtype", "tp", "batch", "prompt_len", "steps",
                                            "warmup", "max_model_len", "enforce_eager", "steps_in_flight",
                                            "async_scheduling")}
    res = {"engine_step": plain, "mirrored_step": mirrored, "meets_goal": plain["overhead_p50"] <= GOAL,
           "profile_top_20_steps": top, "profile_rank": args.profile_rank}
    write_result("driver_overhead", {"config": config, "goal_overhead": GOAL, "results": res},
                 args.out, args.device,
                 tag=f"tp{args.tp}_b{args.batch}" + ("" if args.async_scheduling else "_sync"))
    print_table(["loop", "wall_ms", "gpu_ms", "overhead"] + [f"{k}_ms" for k in PARTS],
                [["engine.step", plain["wall_ms_p50"], plain["gpu_ms_p50"], plain["overhead_p50"]]
                 + [None] * len(PARTS),
                 ["mirrored", mirrored["wall_ms_p50"], mirrored["gpu_ms_p50"], mirrored["overhead_p50"]]
                 + [mirrored[f"{k}_ms_p50"] for k in PARTS]])
    print(f"driver + Ray overhead per decode step: {100 * plain['overhead_p50']:.2f}% (goal <= {100 * GOAL:.0f}%)")


if __name__ == "__main__":
    main()
