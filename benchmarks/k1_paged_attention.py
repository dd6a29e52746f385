"""K1: the paged-attention decode kernel against device copy bandwidth.

K1 is Llama-3-8B decode attention: batch 64, 32 query heads, 8 KV heads, head dim
128, block size 16, bf16, every sequence at the same context length, blocks
scattered over the cache (shuffled block tables). Per context length:

- kernel time: ops.cupy_ops.paged_attention_decode, captured `--calls` times in a
  CUDA graph that rotates over `--sets` input sets (each with its own blocks,
  together larger than L2), replayed `--reps` times; median per call. The graph
  removes Python launch overhead, so this is GPU time (back-to-back kernels).
- KV bytes read = B * ctx * Hk * D * 2 (K and V) * 2 bytes, over kernel time, as
  GB/s and as a fraction of the device-to-device copy bandwidth measured in the
  same run (a large torch copy, bytes read + written over time).
- torch baselines, eager: the SDPA-gather approach (gather K/V through the block
  tables, then scaled_dot_product_attention with enable_gqa) and ops.reference.
- err: the kernel's relative error against the float32 reference on one set.

    python3 -m benchmarks.k1_paged_attention                  # contexts 256 1024 2048 4096
    python3 -m benchmarks.k1_paged_attention --sweep          # also try decode kernel configs
    python3 -m benchmarks.k1_paged_attention --shape tiny     # CPU smoke test (torch only)

Goal (H100): >= 80% of copy bandwidth at context 2048, >= 50% at 256.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import print_table, write_result
from ops import reference as ref

K1 = dict(batch=64, heads=32, kv_heads=8, head_dim=128, block_size=16)
TINY = dict(batch=2, heads=4, kv_heads=2, head_dim=64, block_size=16)
SWEEP = [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (2, 4)]  # (warps per CTA, pipeline stages)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", help="context lengths (default 256 1024 2048 4096)")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--sets", type=int, default=4, help="input sets rotated through (default 4)")
    p.add_argument("--calls", type=int, default=12, help="kernel calls per CUDA graph (default 12)")
    p.add_argument("--reps", type=int, default=30, help="timed graph replays (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed graph replays (default 3)")
    p.add_argument("--torch-reps", type=int, default=10, help="timed torch-baseline calls (default 10)")
    p.add_argument("--no-reference", action="store_true", help="skip the slow ops.reference timing")
    p.add_argument("--sweep", action="store_true",
                   help="also time decode kernel configs (warps, stages), a forced 2-way split, "
                        "and forced partition counts in the split check")
    p.add_argument("--shape", choices=("k1", "llama3-8b", "tiny"), default="k1",
                   help="k1 (= llama3-8b attention) or tiny (CPU smoke test)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    p.add_argument("--split-cases", nargs="*", default=["1x4096", "4x8192", "8x4096", "12x4096", "16x2048", "32x1024"],
                   help="BATCHxCONTEXT cases where the split heuristic is checked: auto vs unsplit")
    p.add_argument("--copy-mib", type=int, default=2048, help="size of the copy-bandwidth probe")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON result")
    args = p.parse_args(argv)
    shape = TINY if args.shape == "tiny" else K1
    for k, v in shape.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.contexts is None:
        args.contexts = [64, 128] if args.shape == "tiny" else [256, 1024, 2048, 4096]
    args.device = args.device or ("cuda" if torch.cuda.is_available() and args.shape != "tiny" else "cpu")
    return args


# --------------------------------------------------------------------------- timing


def copy_bandwidth(mib: int, reps: int = 20) -> float:
    """Device-to-device copy, (bytes read + bytes written) / time, in GB/s."""
    n = mib * 2**20
    a = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n / statistics.median(times) / 1e9


def time_graph(fn, calls: int, reps: int, warmup: int) -> float:
    """Median seconds per call of fn(i) (i = 0..calls-1) captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) / 1e3 / calls)
    del g
    return statistics.median(times)


def time_eager(fn, sets: int, reps: int, device: str) -> float:
    """Median seconds per call of fn(i), eager (includes launch overhead)."""
    fn(0)
    times = []
    for r in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(r % sets)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --------------------------------------------------------------------------- inputs


class Inputs:
    """`sets` batches at one context length, each over its own shuffled blocks of one cache."""

    def __init__(self, args, ctx: int, dtype: torch.dtype):
        dev, b, bs = args.device, args.batch, args.block_size
        self.ctx = ctx
        nblk = -(-ctx // bs)
        total = args.sets * b * nblk
        shape = (total, args.kv_heads, bs, args.head_dim)
        self.kc = torch.empty(shape, dtype=dtype, device=dev).normal_()
        self.vc = torch.empty(shape, dtype=dtype, device=dev).normal_()
        perm = torch.randperm(total, device=dev).to(torch.int32)
        self.bt = [perm[i * b * nblk:(i + 1) * b * nblk].view(b, nblk).contiguous()
                   for i in range(args.sets)]
        self.q = [torch.randn(b, args.heads, args.head_dim, device=dev).to(dtype)
                  for _ in range(args.sets)]
        self.ctx_lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        self.scale = args.head_dim ** -0.5
        self.group = args.heads // args.kv_heads

    def sdpa_gather(self, i: int) -> torch.Tensor:
        """The torch approach: gather K/V by block table, batched SDPA (enable_gqa)."""
        bt = self.bt[i].long()
        b, nblk = bt.shape
        k = self.kc[bt].permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :self.ctx]  # [B, Hk, ctx, D]
        v = self.vc[bt].permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :self.ctx]
        o = F.scaled_dot_product_attention(self.q[i][:, :, None], k, v, scale=self.scale,
                                           enable_gqa=self.group > 1)
        return o[:, :, 0]

    def reference(self, i: int) -> torch.Tensor:
        return ref.paged_attention_decode(self.q[i], self.kc, self.vc, self.bt[i], self.ctx_lens,
                                          self.scale, self.ctx)


# --------------------------------------------------------------------------- main


def run(args) -> tuple[dict, list[dict]]:
    dtype = getattr(torch, args.dtype)
    cuda = args.device == "cuda"
    K = None
    if cuda:
        from ops import cupy_attention as K  # noqa: N811
    info = {"shape": {k: getattr(args, k) for k in K1}, "dtype": args.dtype, "sets": args.sets,
            "calls_per_graph": args.calls, "reps": args.reps}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(sm_count=props.multi_processor_count, l2_mib=round(props.L2_cache_size / 2**20, 1),
                    copy_GBps=round(copy_bandwidth(args.copy_mib), 1),
                    decode_config_default={"num_warps": K.DECODE_NUM_WARPS, "stages": K.DECODE_STAGES})
        print(f"device copy bandwidth: {info['copy_GBps']:.0f} GB/s (read + write)", flush=True)
    rows = []
    for ctx in args.contexts:
        torch.manual_seed(ctx)
        inp = Inputs(args, ctx, dtype)
        kv_bytes = args.batch * ctx * args.kv_heads * args.head_dim * 2 * 2
        row = {"context": ctx, "batch": args.batch, "kv_MB": round(kv_bytes / 1e6, 1),
               "cache_sets_MB": round(2 * inp.kc.numel() * inp.kc.element_size() / 1e6, 1)}
        if cuda:
            row.update(kernel_row(args, K, inp, ctx, kv_bytes, info))
        sdpa = time_eager(inp.sdpa_gather, args.sets, args.torch_reps, args.device)
        row.update(sdpa_gather_us=round(sdpa * 1e6, 1),
                   sdpa_gather_GBps=round(kv_bytes / sdpa / 1e9, 1))
        if not args.no_reference:
            r = time_eager(inp.reference, args.sets, max(2, args.torch_reps // 3), args.device)
            row.update(reference_us=round(r * 1e6, 1))
        if cuda:
            row["speedup_vs_sdpa"] = round(sdpa / (row["kernel_us"] / 1e6), 1)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "sweep"}, flush=True)
        del inp
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        info["split_check"] = split_check(args, dtype, K, info)
        info["host_us_per_call"] = host_overhead(dtype)
    return info, rows


def kernel_row(args, K, inp, ctx: int, kv_bytes: int, info: dict) -> dict:
    """Our kernel at one context length: graph-timed (and, with --sweep, every config),
    its error against the reference, its eager call time."""
    row = {}
    default = (K.DECODE_NUM_WARPS, K.DECODE_STAGES)
    configs = [(default, None)]
    if args.sweep:
        configs += [(c, None) for c in SWEEP if c != default] + [(default, 2)]
    results = []
    for (nw, st), parts in configs:
        K.DECODE_NUM_WARPS, K.DECODE_STAGES = nw, st
        fn = lambda i, p=parts: K.paged_attention_decode(
            inp.q[i % args.sets], inp.kc, inp.vc, inp.bt[i % args.sets], inp.ctx_lens,
            inp.scale, max_context_len=ctx, num_parts=p)
        try:
            t = time_graph(fn, args.calls, args.reps, args.warmup)
        except Exception as e:  # a config that does not launch (e.g. shared memory)
            print(f"  ctx {ctx} config {nw}w/{st}s parts={parts}: {type(e).__name__}: {e}")
            continue
        results.append({"num_warps": nw, "stages": st, "parts": parts or "auto",
                        "us": round(t * 1e6, 2), "GBps": round(kv_bytes / t / 1e9, 1)})
    K.DECODE_NUM_WARPS, K.DECODE_STAGES = default
    main = results[0]
    auto_parts = K.decode_partitions(args.batch, args.kv_heads, inp.group, ctx,
                                     args.block_size, info["sm_count"])
    out = K.paged_attention_decode(inp.q[0], inp.kc, inp.vc, inp.bt[0], inp.ctx_lens,
                                   inp.scale, max_context_len=ctx)
    want = ref.paged_attention_decode(inp.q[0].float(), inp.kc, inp.vc, inp.bt[0],
                                      inp.ctx_lens, inp.scale, ctx)
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    eager = time_eager(lambda i: K.paged_attention_decode(
        inp.q[i], inp.kc, inp.vc, inp.bt[i], inp.ctx_lens, inp.scale, max_context_len=ctx),
        args.sets, args.reps, "cuda")
    row.update(kernel_us=main["us"], kernel_GBps=main["GBps"],
               pct_copy=round(100 * main["GBps"] / info["copy_GBps"], 1),
               parts=auto_parts, rel_err=float(f"{err:.3g}"),
               eager_call_us=round(eager * 1e6, 1))
    if args.sweep:
        best = max(results, key=lambda r: r["GBps"])
        row.update(sweep=results, best=best,
                   best_pct_copy=round(100 * best["GBps"] / info["copy_GBps"], 1))
    return row


def host_overhead(dtype, calls: int = 300) -> dict:
    """Host time per eager call of each op on tiny inputs (launch-bound): what an
    eager step pays per op outside CUDA graphs."""
    from ops import cupy_ops as K  # noqa: N811  (every op, the attention ones included)
    dev = "cuda"
    t, hq, hk, d, hidden = 8, 32, 8, 128, 4096
    x = torch.randn(t, hidden, device=dev).to(dtype)
    w = torch.ones(hidden, device=dev, dtype=dtype)
    q = torch.randn(t, hq, d, device=dev).to(dtype)
    k = torch.randn(t, hk, d, device=dev).to(dtype)
    cs = ref.rope_cos_sin_cache(d, 4096, 10000.0, None).to(dev)
    pos = torch.arange(t, device=dev)
    kc = torch.zeros(64, hk, 16, d, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.arange(t, device=dev)
    bt = torch.arange(t * 8, device=dev, dtype=torch.int32).view(t, 8)
    cl = torch.full((t,), 100, device=dev, dtype=torch.int32)
    ops = {
        "rms_norm": lambda: K.rms_norm(x, w, 1e-5),
        "fused_add_rms_norm": lambda: K.fused_add_rms_norm(x, x, w, 1e-5),
        "silu_and_mul": lambda: K.silu_and_mul(x),
        "rotary_embedding": lambda: K.rotary_embedding(pos, q, k, cs),
        "reshape_and_cache": lambda: K.reshape_and_cache(k, k, kc, vc, slots),
        "paged_attention_decode": lambda: K.paged_attention_decode(q, kc, vc, bt, cl, 0.1, 128),
        "torch_add (baseline)": lambda: torch.add(x, x),
    }
    res = {}
    for name, fn in ops.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        res[name] = round((t1 - t0) / calls * 1e6, 1)
    print("host us per eager call:", res, flush=True)
    return res


def split_check(args, dtype, K, info) -> list[dict]:
    """Small batches with long contexts: the automatic split against no split."""
    out = []
    for case in args.split_cases:
        b, ctx = (int(x) for x in case.lower().split("x"))
        a = argparse.Namespace(**{**vars(args), "batch": b})
        inp = Inputs(a, ctx, dtype)
        kv_bytes = b * ctx * args.kv_heads * args.head_dim * 4
        res = {"batch": b, "context": ctx,
               "auto_parts": K.decode_partitions(b, args.kv_heads, inp.group, ctx, args.block_size,
                                                 info["sm_count"])}
        variants = [("auto", None), ("unsplit", 1)]
        if args.sweep:  # forced partition counts, to tune the heuristic
            variants += [(f"parts{n}", n) for n in (2, 3, 4, 5, 6, 8, 10, 16) if n * 64 <= ctx]
        for name, parts in variants:
            fn = lambda i, p=parts: K.paged_attention_decode(
                inp.q[i % args.sets], inp.kc, inp.vc, inp.bt[i % args.sets], inp.ctx_lens,
                inp.scale, max_context_len=ctx, num_parts=p)
            t = time_graph(fn, args.calls, args.reps, args.warmup)
            res[f"{name}_us"] = round(t * 1e6, 2)
            res[f"{name}_GBps"] = round(kv_bytes / t / 1e9, 1)
        out.append(res)
        print(res, flush=True)
        del inp
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available (use --shape tiny for a CPU smoke test)")
    info, rows = run(args)
    payload = {**info, "rows": rows, "goal": ">= 80% of copy bandwidth at context 2048, >= 50% at 256"}
    dirs = [args.out]
    env_out = os.environ.get("OUT")
    if env_out and os.path.abspath(env_out) != os.path.abspath(args.out):
        dirs.append(env_out)
    for d in dirs:
        write_result("k1_paged_attention", payload, d, device=args.device,
                     tag="" if args.shape != "tiny" else "tiny")
    cuda = args.device == "cuda"
    if cuda and args.sweep:
        print("sweep (GB/s per (warps, stages, parts)):")
        for r in rows:
            print(f"  ctx {r['context']}: " + ", ".join(
                f"{s['num_warps']}w{s['stages']}s/{s['parts']}={s['GBps']:.0f}" for s in r["sweep"]))
    if cuda and info.get("split_check"):
        print("split check (auto = heuristic's split, GB/s):")
        for r in info["split_check"]:
            forced = ", ".join(f"{k[5:-5]}p {v:.0f}" for k, v in r.items()
                               if k.startswith("parts") and k.endswith("_GBps"))
            print(f"  B={r['batch']} ctx={r['context']}: auto ({r['auto_parts']} parts) "
                  f"{r['auto_GBps']:.0f}, unsplit {r['unsplit_GBps']:.0f}" + (f"; {forced}" if forced else ""))
    headers = ["ctx", "kernel_us", "GB/s", "%copy", "parts", "rel_err", "sdpa_us", "x_sdpa", "ref_us"]
    table = [[r["context"], r.get("kernel_us"), r.get("kernel_GBps"), r.get("pct_copy"), r.get("parts"),
              r.get("rel_err"), r["sdpa_gather_us"], r.get("speedup_vs_sdpa"), r.get("reference_us")]
             for r in rows]
    if cuda:
        print(f"K1 decode attention, {torch.cuda.get_device_name(0)}, copy {info['copy_GBps']:.0f} GB/s, "
              f"B={args.batch} Hq={args.heads} Hk={args.kv_heads} D={args.head_dim} {args.dtype}")
    print_table(headers, table)


if __name__ == "__main__":
    main()
