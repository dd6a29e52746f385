"""W0 latency (DESIGN.md): 1 request, prompt 512 tokens, 128 new tokens: time per output token.

Each repeat is one max_tokens=128 request on a fresh random prompt (the prefix cache never
hits), driven through engine.step() so that every token's arrival is seen: TTFT is the
time to its first token and TPOT the time from its first token to its last over 127.
(tpot_split_ms is the older estimate, (total - TTFT of a separate 1-token request) / 127:
a slow or fast 1-token request moves it by 1/127 of the difference.) Then, with the
engine shut down so its memory is free, the weight-GEMM floor at batch 1 is measured in
the same run: goal TPOT / floor <= 1.10. Each request also records per-step means of
the driver's step and of rank 0's phases (step_means_ms_all): they tell a host-bound
request from a GPU-bound one.

    python3 -m benchmarks.w0_latency                  # Llama-3-8B shapes, bf16, one GPU
    python3 -m benchmarks.w0_latency --tp 2
    python3 -m benchmarks.w0_latency --shape tiny     # CPU smoke test
"""
from __future__ import annotations

import argparse
import time

from benchmarks.common import (add_common_args, make_llm, make_prompts, median, ms, print_table,
                               resolve_args, sampling, wait_gpu_free, write_result)

GOAL_RATIO = 1.10


def _timed(llm, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(time to the first token, time to the last) of one request, from its own outputs."""
    engine = llm.engine
    request_id = engine.add_request(prompt, sampling(max_tokens))
    start, first, got, finished = time.perf_counter(), None, 0, False
    while not finished:
        if not engine.has_unfinished_requests():
            raise RuntimeError(f"request {request_id} never finished")
        for out in engine.step():
            if out.request_id == request_id:
                got, finished = len(out.outputs[0].token_ids), out.finished
                if first is None and got:
                    first = time.perf_counter() - start
    if got != max_tokens:  # ignore_eos: anything else means the request did not run as asked
        raise RuntimeError(f"asked for {max_tokens} tokens, got {got}")
    return first, time.perf_counter() - start


def _step_means(before: dict, after: dict) -> dict:
    """Per-step means (ms) between two engine metric snapshots: the driver's whole step and
    rank 0's phases. A request whose steps are host-bound shows wait_prev_s near 0 (the GPU
    was done before the worker asked); a GPU-bound one shows the GPU's time there."""
    n = max(after["steps"] - before["steps"], 1)
    phases = {k: v - before["worker_phase_total_s"].get(k, 0.0) for k, v in after["worker_phase_total_s"].items()}
    return {"engine_step": ms((after["total_step_s"] - before["total_step_s"]) / n),
            **{k.removesuffix("_s"): ms(v / n) for k, v in phases.items()}}


def measure_engine(args) -> dict:
    n = 1 + 2 * args.repeats
    prompts = make_prompts(args.shape, [args.prompt_len] * n, seed=0)
    t0 = time.perf_counter()
    with make_llm(args, tp=args.tp) as llm:
        startup_s = time.perf_counter() - t0
        _timed(llm, prompts[0], args.new_tokens)  # warm-up: first-use costs stay out of the numbers
        ttft, total, ttft_alone, steps = [], [], [], []
        for i in range(args.repeats):
            ttft_alone.append(_timed(llm, prompts[1 + 2 * i], 1)[1])
            before = llm.engine.metrics.snapshot()
            first, last = _timed(llm, prompts[2 + 2 * i], args.new_tokens)
            steps.append(_step_means(before, llm.engine.metrics.snapshot()))
            ttft.append(first)
            total.append(last)
        num_blocks = llm.engine.executor.num_gpu_blocks
    intervals = args.new_tokens - 1
    tpot = [(last - first) / intervals for first, last in zip(ttft, total)]
    split = [(last - alone) / intervals for alone, last in zip(ttft_alone, total)]
    return {"startup_s": round(startup_s, 2), "num_gpu_blocks": num_blocks,
            "ttft_ms": ms(median(ttft)), "total_ms": ms(median(total)), "tpot_ms": ms(median(tpot)),
            "tpot_ms_all": [ms(x) for x in tpot], "tpot_split_ms": ms(median(split)),
            "tpot_split_ms_all": [ms(x) for x in split], "step_means_ms_all": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="TTFT/total pairs; medians are reported")
    p.add_argument("--no-floor", action="store_true", help="skip the same-run weight-GEMM floor")
    args = resolve_args(p.parse_args())
    res = measure_engine(args)
    if not args.no_floor:
        from benchmarks.floor import gemm_floor_ms
        if args.device == "cuda":
            res["gpu_free_fraction_before_floor"] = round(wait_gpu_free(), 3)
        res["floor_ms_batch1"] = gemm_floor_ms(1, tp=args.tp, shape=args.shape, device=args.device,
                                               dtype=args.dtype)
        res["tpot_over_floor"] = round(res["tpot_ms"] / res["floor_ms_batch1"], 3)
        res["meets_goal"] = res["tpot_over_floor"] <= GOAL_RATIO
    config = {k: getattr(args, k) for k in ("shape", "dtype", "tp", "prompt_len", "new_tokens", "repeats",
                                            "max_model_len", "enforce_eager", "steps_in_flight")}
    if args.device == "cpu":
        config["note"] = "CPU smoke test: floor timed eagerly; the ratio means nothing here"
    write_result("w0_latency", {"config": config, "goal_tpot_over_floor": GOAL_RATIO, "results": res},
                 args.out, args.device, tag=f"tp{args.tp}")
    print_table(["tp", "ttft_ms", "tpot_ms", "floor_ms", "tpot/floor", f"goal<={GOAL_RATIO}"],
                [[args.tp, res["ttft_ms"], res["tpot_ms"], res.get("floor_ms_batch1"),
                  res.get("tpot_over_floor"), res.get("meets_goal")]])


if __name__ == "__main__":
    main()
