"""W1's prefill attention (Llama-3-8B heads, bf16, one step of M tokens packed from prompts of
128-1024 tokens, causal): the varlen kernel the engine runs (FlashAttention-2 inside torch,
aten._flash_attention_forward) against cuDNN's varlen attention (aten._cudnn_attention_forward),
to see whether the other is faster. Each output is checked against FlashAttention-2's.

    python3 -m benchmarks.prefill_attention                  # M = 8192 (the default token budget)
    python3 -m benchmarks.prefill_attention --tokens 4096,8192
"""
from __future__ import annotations

import argparse
import random

from benchmarks.common import cuda_ms, require_cuda, write_result

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def chunk_lengths(tokens: int, seed: int = 0) -> list[int]:
    """Prompt lengths uniform in [128, 1024] packed into `tokens` (the last one cut, as a chunk)."""
    rng, lens = random.Random(seed), []
    while sum(lens) < tokens:
        lens.append(min(rng.randint(128, 1024), tokens - sum(lens)))
    return lens


def causal_flops(lens: list[int]) -> float:
    # QK^T and PV, 2 flops per multiply-add, half the square under the causal mask.
    return sum(2 * 2 * HEADS * HEAD_DIM * n * (n + 1) / 2 for n in lens)


def variants(q, k, v, cu, max_len: int, scale: float) -> dict:
    import torch
    aten = torch.ops.aten
    k_full = k.repeat_interleave(HEADS // KV_HEADS, dim=1)  # for kernels without GQA
    v_full = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    return {
        "flash2": lambda: aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
                                                        scale=scale)[0],
        "cudnn_gqa": lambda: aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, False, 0.0,
                                                           True, False, scale=scale)[0],
        "cudnn_mha": lambda: aten._cudnn_attention_forward(q, k_full, v_full, None, cu, cu, max_len, max_len,
                                                           False, 0.0, True, False, scale=scale)[0],
    }


def measure(tokens: int, reps: int) -> dict:
    import torch
    lens = chunk_lengths(tokens)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(tokens, HEADS, HEAD_DIM, device=dev, dtype=dt)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=dev, dtype=dt)
    v = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=dev, dtype=dt)
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], device=dev, dtype=torch.int32)
    fns = variants(q, k, v, cu, max(lens), HEAD_DIM ** -0.5)
    want = fns["flash2"]()
    flops, rows = causal_flops(lens), {}
    for name, fn in fns.items():
        try:
            err = (fn().float() - want.float()).abs().max().item()
            t = cuda_ms(fn, reps)
            rows[name] = {"ms": round(t, 4), "tflops": round(flops / t / 1e9, 1), "max_abs_err_vs_flash2": err}
        except Exception as e:  # (a backend this torch or GPU does not run)
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(tokens, name, rows[name], flush=True)
    return {"tokens": tokens, "num_seqs": len(lens), "lengths": lens, "tflop": round(flops / 1e12, 3),
            "variants": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="8192", help="comma-separated step sizes M (default: 8192)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    require_cuda("prefill_attention")
    results = [measure(int(m), args.reps) for m in args.tokens.split(",")]
    write_result("prefill_attention", {"config": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                                  "dtype": "bfloat16", "causal": True}, "results": results},
                 args.out)


if __name__ == "__main__":
    main()
