"""W2 serving (DESIGN.md): W1's requests (256, prompts uniform in [128, 1024] tokens, 128
output tokens, EOS ignored) sent over HTTP to the Ray Serve app as a Poisson stream, each
one a streamed /v1/completions call: TTFT and TPOT p50/p99 at each rate, and the output
throughput at saturation (rate inf: every request at once), against the same engine
offline (LLM.generate on the saturation run's prompts, before the server starts).

TTFT: from sending the request to its first streamed chunk (the first token). TPOT: the
rest of the request's time over its remaining tokens, (end - first) / (tokens - 1), as
vLLM's benchmark_serving computes it. Each rate gets fresh prompts (other token ids, the
same length distribution), so no run hits the prefix cache of an earlier one.

    python3 -m benchmarks.w2_serving                          # Llama-3-8B shapes, one GPU
    python3 -m benchmarks.w2_serving --shape tiny --num-requests 16 --rates 8,inf   # CPU smoke
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time

from benchmarks.common import (add_common_args, free_port, make_llm, make_prompts, model_dir, print_table, resolve_args,
                               sampling, tokenizer_dir, write_result)
from benchmarks.w1_throughput import w1_prompts

MODEL = "w2"



def start_server(args) -> str:
    """The Serve app on args.shape with random weights; returns its base URL."""
    from driver import serve as raytp_serve
    from driver.config import EngineConfig, ServeConfig

    engine_cfg = EngineConfig.create(model_dir(args.shape, args.dtype), tokenizer=tokenizer_dir(),
                                     load_format="dummy", dtype=args.dtype, device=args.device,
                                     max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                                     steps_in_flight=args.steps_in_flight,
                                     tensor_parallel_size=args.tp)
    port = free_port()
    serve_cfg = ServeConfig(host="127.0.0.1", port=port, served_model_name=MODEL,
                            max_num_requests=max(512, args.num_requests), replica_num_cpus=0,
                            stream_interval=args.stream_interval)
    raytp_serve.run(engine_cfg, serve_cfg, blocking=False)
    return f"http://127.0.0.1:{port}"


async def one_request(http, url: str, prompt: list[int], new_tokens: int, delay: float, stream: bool) -> dict:
    await asyncio.sleep(delay)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    sent = time.perf_counter()
    first = None
    tokens = 0
    async with http.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]!r}")
        if not stream:
            tokens = (await r.json())["usage"]["completion_tokens"]
            return {"sent": sent, "first": None, "end": time.perf_counter(), "tokens": tokens}
        async for raw in r.content:  # one server-sent-event line at a time
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"sent": sent, "first": first, "end": end, "tokens": tokens}


def engine_counters(url: str) -> dict[str, float]:
    """The engine's counters from /metrics (busy and device seconds, steps)."""
    import urllib.request
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    pairs = (line.split() for line in lines if line and not line.startswith("#"))
    return {k.removeprefix("raytp_"): float(v) for k, v in pairs}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


async def run_rate(url: str, prompts: list[list[int]], new_tokens: int, rate: float, seed: int,
                   stream: bool = True) -> dict:
    """All prompts at Poisson arrivals of `rate` per second (inf: all at t=0)."""
    import aiohttp  # a dependency of ray[serve]: there wherever the server runs

    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
    before = engine_counters(url)
    connector = aiohttp.TCPConnector(limit=0)  # no cap: at rate inf every request is open at once
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        recs = await asyncio.gather(*(one_request(http, url, p, new_tokens, d, stream) for p, d in zip(prompts, delays)))
    end = max(r["end"] for r in recs)
    after = engine_counters(url)
    busy = {k: round(after[k] - before[k], 3) for k in ("engine_step_seconds_total", "device_step_seconds_total")}
    if any(r["tokens"] != new_tokens for r in recs):
        raise RuntimeError(f"expected {new_tokens} tokens per request, got {sorted({r['tokens'] for r in recs})}")
    e2e = [r["end"] - r["sent"] for r in recs]
    out_tokens = sum(r["tokens"] for r in recs)
    row = {"rate_req_s": rate if not math.isinf(rate) else "inf", "requests": len(recs), "stream": stream,
           "wall_s": round(end - start, 3), "out_tok_s": round(out_tokens / (end - start), 1),
           "e2e_s": {"p50": round(_pct(e2e, 50), 3), "p99": round(_pct(e2e, 99), 3)},
           # the engine's own time meanwhile: its steps' wall time, and the device's
           "engine_step_s": busy["engine_step_seconds_total"], "device_s": busy["device_step_seconds_total"]}
    if stream:
        ttft = [1e3 * (r["first"] - r["sent"]) for r in recs]
        tpot = [1e3 * (r["end"] - r["first"]) / (r["tokens"] - 1) for r in recs]
        row["ttft_ms"] = {"p50": round(_pct(ttft, 50), 1), "p99": round(_pct(ttft, 99), 1)}
        row["tpot_ms"] = {"p50": round(_pct(tpot, 50), 2), "p99": round(_pct(tpot, 99), 2)}
    return row


def run_offline(args, prompts: list[list[int]]) -> float:
    """Wall time of the same engine generating `prompts` in-process (no HTTP)."""
    with make_llm(args, tp=args.tp) as llm:
        llm.generate(make_prompts(args.shape, [128] * 4, seed=99), sampling(16), use_tqdm=False)
        t = time.perf_counter()
        llm.generate(prompts, sampling(args.new_tokens), use_tqdm=False)
        wall = time.perf_counter() - t
    if args.device == "cuda":
        _wait_gpu_released()
    return round(wall, 3)


def _wait_gpu_released(timeout_s: float = 60.0) -> None:
    """Until the killed workers' GPU memory is back (nvidia-smi: no CUDA context here)."""
    import subprocess
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.split()
        if out and max(int(x) for x in out) < 2048:
            return
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of the served engine")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rates", default="8,16,inf",
                   help="comma-separated request rates per second; inf sends every request at once")
    p.add_argument("--stream-interval", type=int, default=1, help="the server's tokens per streamed chunk")
    p.add_argument("--also-unstreamed", action="store_true",
                   help="then the saturation run once more with whole (not streamed) responses")
    args = resolve_args(p.parse_args())
    rates = [float(r) for r in args.rates.split(",")]
    import ray
    from ray import serve

    ray.init(logging_level="WARNING", include_dashboard=False)
    offline_s = None
    try:
        if math.inf in rates:
            offline_s = run_offline(args, w1_prompts(args.shape, args.num_requests, seed=1 + rates.index(math.inf)))
            print(f"offline (LLM.generate, same prompts as rate inf): {offline_s} s", flush=True)
        url = start_server(args)
        # Warm-up: a burst as wide as the runs (short prompts and outputs), so that the first
        # measured run does not pay the server's first-time costs at that concurrency.
        warm = w1_prompts(args.shape, args.num_requests, lo=64, hi=128, seed=100)
        asyncio.run(run_rate(url, warm, 16, math.inf, 0))
        rows = []
        for i, rate in enumerate(rates):
            prompts = w1_prompts(args.shape, args.num_requests, seed=1 + i)
            rows.append(asyncio.run(run_rate(url, prompts, args.new_tokens, rate, seed=i)))
            print(json.dumps(rows[-1]), flush=True)
        if args.also_unstreamed and math.inf in rates:  # the saturation run's prompts, answered whole
            prompts = w1_prompts(args.shape, args.num_requests, seed=1 + len(rates))
            rows.append(asyncio.run(run_rate(url, prompts, args.new_tokens, math.inf, 0, stream=False)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    config = {k: getattr(args, k) for k in ("shape", "dtype", "tp", "num_requests", "new_tokens", "max_model_len",
                                            "enforce_eager", "steps_in_flight", "stream_interval")}
    sat = next((r for r in rows if r["rate_req_s"] == "inf" and r["stream"]), None)
    summary = {"offline_wall_s": offline_s,
               "saturation_http_over_offline": round(sat["wall_s"] / offline_s, 3) if sat and offline_s else None}
    write_result("w2_serving", {"config": config, "results": rows, "saturation": summary}, args.out, args.device)
    pair = lambda r, k: f"{r[k]['p50']} / {r[k]['p99']}" if k in r else "-"
    print_table(["rate req/s", "stream", "wall_s", "out_tok_s", "TTFT p50/p99 ms", "TPOT p50/p99 ms"],
                [[r["rate_req_s"], r["stream"], r["wall_s"], r["out_tok_s"], pair(r, "ttft_ms"), pair(r, "tpot_ms")]
                 for r in rows])
    print(f"saturation over HTTP / offline: {summary['saturation_http_over_offline']} "
          f"(offline {offline_s} s)")


if __name__ == "__main__":
    main()
