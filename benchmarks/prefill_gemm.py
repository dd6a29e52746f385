"""The prefill GEMMs of W1 (Llama-3-8B shapes, bf16, one step of M tokens): each weight
GEMM's time and TFLOP/s as the model runs it (F.linear, weight [N, K]), and the same
product through other layouts and cuBLAS paths, to see whether another one is faster.

    python3 -m benchmarks.prefill_gemm                    # M = 8192 (the default token budget)
    python3 -m benchmarks.prefill_gemm --tokens 4096,8192,16384

Variants: `linear` F.linear(x, W) as in the model; `nn` x @ W.T stored transposed
([K, N], contiguous); `lt` F.linear through cuBLASLt (torch's preferred_blas_library);
`split2` a stacked weight (gate_up) as two GEMMs of N/2.
"""
from __future__ import annotations

import argparse

from benchmarks.common import cuda_ms, require_cuda, write_result

# name: (N, K) per layer, Llama-3-8B at TP=1
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def variants(x, w):
    import torch
    import torch.nn.functional as F
    wt = w.t().contiguous()  # [K, N]
    n = w.shape[0]

    def lt():
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return F.linear(x, w)
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")

    out = {"linear": lambda: F.linear(x, w), "nn": lambda: x @ wt, "lt": lt}
    if n % 2 == 0 and n > 8192:
        halves = (w[: n // 2].contiguous(), w[n // 2:].contiguous())
        out["split2"] = lambda: (F.linear(x, halves[0]), F.linear(x, halves[1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="8192", help="comma-separated M (tokens per step)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    require_cuda("prefill_gemm")
    import torch
    torch.manual_seed(0)
    rows = []
    for m in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        for name, (n, k) in SHAPES.items():
            xk = x if k == 4096 else torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            flops = 2 * m * n * k
            for variant, fn in variants(xk, w).items():
                ms = cuda_ms(fn, reps=30, warmup=5)
                rows.append({"tokens": m, "gemm": name, "variant": variant, "ms": round(ms, 4),
                             "tflops": round(flops / ms / 1e9, 1)})
                print(f"M={m:6d} {name:8s} {variant:7s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    layer = {}
    for r in rows:
        key = (r["tokens"], r["variant"])
        layer[key] = layer.get(key, 0.0) + r["ms"]
    summary = {f"M{m}_{v}_layer_ms": round(ms, 4) for (m, v), ms in layer.items() if v in ("linear", "nn", "lt")}
    write_result("prefill_gemm", {"config": {"shapes": SHAPES, "dtype": "bfloat16"}, "results": rows,
                                  "per_layer": summary}, args.out, "cuda")


if __name__ == "__main__":
    main()
