"""Shared pieces of the GPU benchmarks: model shapes, a config-only model directory,
prompts, the engine factory, device info, result files and tables.

Nothing here touches CUDA at import time: the driver process must not create a CUDA
context before the engine's workers profile GPU memory (it would take memory from
them), so device_info() and wait_gpu_free() are only called once engines are gone.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import socket
import statistics
import sys
import tempfile
import time

# Llama-3-8B (DESIGN.md) and a tiny Llama for CPU smoke tests (the demo tokenizer's vocab).
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}
# Prompt token ids are drawn from [lo, hi): ordinary (non-special) ids of each vocab.
PROMPT_ID_RANGE = {"llama3-8b": (100, 30000), "tiny": (10, 512)}


def free_port() -> int:
    """A TCP port free on this host right now (for a rendezvous or a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_device(shape: str) -> str:
    return "cpu" if shape == "tiny" else "cuda"


def default_dtype(device: str) -> str:
    return "float32" if device == "cpu" else "bfloat16"


def add_common_args(parser, max_model_len: int = 2048) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b",
                        help="model shape; 'tiny' runs on the CPU in seconds (smoke test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda, or cpu for --shape tiny")
    parser.add_argument("--dtype", help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--max-model-len", type=int, default=max_model_len)
    parser.add_argument("--enforce-eager", action="store_true", help="engine without CUDA graphs")
    parser.add_argument("--steps-in-flight", type=int, default=2,
                        help="the engine's steps_in_flight (async scheduling: steps queued at once)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON result")


def resolve_args(args):
    """Fill the device/dtype defaults that depend on --shape."""
    args.device = args.device or default_device(args.shape)
    args.dtype = args.dtype or default_dtype(args.device)
    return args


def hf_config_dict(shape: str, dtype: str = "bfloat16") -> dict:
    s = dict(SHAPES[shape])
    rope = s["rope_parameters"]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
            "torch_dtype": dtype, "dtype": dtype, "rope_theta": rope["rope_theta"],
            "head_dim": s["hidden_size"] // s["num_attention_heads"], **s}


def model_dir(shape: str, dtype: str = "bfloat16") -> str:
    """A directory holding only config.json for `shape` (weights come from load_format='dummy').
    Cached under ~/.cache/raytp/bench/<shape>-<dtype>; rewritten atomically on every call."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "raytp", "bench", f"{shape}-{dtype}")
    os.makedirs(path, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(hf_config_dict(shape, dtype), f, indent=2)
    os.replace(tmp, os.path.join(path, "config.json"))  # concurrent runs never see half a file
    return path


def tokenizer_dir() -> str:
    # The demo checkpoint's real tokenizer; token ids are never detokenized (detokenize=False).
    from driver.demo import demo_checkpoint_dir
    return demo_checkpoint_dir()


def make_prompts(shape: str, lengths: list[int], seed: int = 0) -> list[list[int]]:
    import numpy as np
    rng = np.random.default_rng(seed)
    lo, hi = PROMPT_ID_RANGE[shape]
    return [rng.integers(lo, hi, size=n).tolist() for n in lengths]


def sampling(max_tokens: int):
    from driver import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)


def make_llm(args, tp: int = 1, **engine_kwargs):
    """The engine on `args.shape` with random weights; extra keywords are engine options."""
    from driver import LLM
    kwargs = dict(tokenizer=tokenizer_dir(), load_format="dummy", dtype=args.dtype, device=args.device,
                  max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                  steps_in_flight=args.steps_in_flight)
    kwargs.update(engine_kwargs)
    return LLM(model=model_dir(args.shape, args.dtype), tensor_parallel_size=tp, **kwargs)


def profile_top(llm, run, top: int = 30, rank: int = 0, trace_dir: str | None = None) -> list[dict]:
    """run() under the workers' torch.profiler: that rank's top ops by their own device time.
    With trace_dir, the ranks' timelines go there too, and rank's device gaps are printed."""
    llm.start_profile()
    try:
        run()
    finally:
        rows = llm.stop_profile(top, rank, trace_dir)
    print(f"top {top} ops by self device time:")
    print_table(["self_ms", "count", "name"], [[round(r["self_ms"], 2), r["count"], r["name"][:90]] for r in rows])
    if trace_dir is not None:
        gaps = device_gaps(os.path.join(trace_dir, f"rank{rank}.json"))
        print(f"rank {rank} device timeline: {json.dumps({k: v for k, v in gaps.items() if k != 'top_gaps'})}")
        print_table(["gap_ms", "count", "ops (before -> after)"], [[g["ms"], g["count"], g["between"]] for g in gaps["top_gaps"]])
    return rows


def device_gaps(trace_path: str, top: int = 12) -> dict:
    """From a Chrome trace of torch.profiler: the device's busy time, its span (first op's start
    to last op's end) and the idle gaps between consecutive ops (kernels, copies, memsets),
    summed per (op before, op after) pair: where the device waits on launches or the host."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    if not ops:
        return {"busy_ms": 0.0, "span_ms": 0.0, "idle_ms": 0.0, "top_gaps": []}
    sums: dict[str, list] = {}
    for a, b in zip(ops, ops[1:]):
        pair = f"{a['name'][:40]} -> {b['name'][:40]}"
        entry = sums.setdefault(pair, [0.0, 0])
        entry[0] += max(0.0, b["ts"] - a["ts"] - a["dur"])
        entry[1] += 1
    busy = sum(e["dur"] for e in ops) / 1e3
    span = (ops[-1]["ts"] + ops[-1]["dur"] - ops[0]["ts"]) / 1e3
    ranked = sorted(sums.items(), key=lambda kv: -kv[1][0])[:top]
    return {"busy_ms": round(busy, 3), "span_ms": round(span, 3), "idle_ms": round(span - busy, 3),
            "top_gaps": [{"between": k, "ms": round(v[0] / 1e3, 3), "count": v[1]} for k, v in ranked]}


def wait_gpu_free(fraction: float = 0.8, timeout_s: float = 60.0) -> float:
    """Wait until `fraction` of GPU 0's memory is free (killed Ray workers release it a
    moment after shutdown returns). Returns the free fraction seen last."""
    import torch
    if not torch.cuda.is_available():
        return 1.0
    deadline = time.monotonic() + timeout_s
    while True:
        free, total = torch.cuda.mem_get_info()
        if free / total >= fraction or time.monotonic() > deadline:
            return free / total
        time.sleep(0.5)


def require_cuda(benchmark: str, gpus: int = 1) -> None:
    """Exit with a message that says what to do, where a GPU probe cannot run."""
    import torch
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < gpus:
        sys.exit(f"benchmarks.{benchmark} measures CUDA kernels and needs {gpus} GPU(s) (this host has {have}); "
                 f"run it on a GPU machine, or use a workload benchmark (w0_latency, w1_throughput, ...) "
                 f"with --shape tiny on the CPU")


def device_info(device: str = "cuda") -> str:
    import torch
    if device == "cuda" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{torch.cuda.get_device_name(0)}" + (f" x{n}" if n > 1 else "")
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def cuda_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median ms of `fn` on the device over `reps` calls, each between two CUDA events
    (eager: launch overhead that the device waits for counts)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def ms(seconds: float, digits: int = 3) -> float:
    return round(1e3 * seconds, digits)


def write_result(name: str, payload: dict, out_dir: str, device: str = "cuda", tag: str = "") -> str:
    """Write {benchmark, device, date, command, **payload} as JSON; print and return the path."""
    now = datetime.datetime.now().astimezone()
    dev = device_info(device)
    result = {"benchmark": name, "device": dev, "date": now.isoformat(timespec="seconds"),
              "command": f"python3 -m benchmarks.{name} " + shlex.join(sys.argv[1:]), **payload}
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dev.split(" (")[0]).strip("-").lower()
    stamp = now.strftime("%Y-%m-%dT%H-%M-%S")
    path = os.path.join(out_dir, f"{name}{'_' + tag if tag else ''}_{slug}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return path


def print_table(headers: list[str], rows: list[list]) -> None:
    """A plain fixed-width table (printed last, so a log's tail shows it)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.0f}"
    return "-" if x is None else str(x)
