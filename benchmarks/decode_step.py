"""GPU time of one decode step of the model at small batches: fused layers vs unfused,
against the weight-GEMM floor, in one process (no engine, no Ray).

The Llama-3-8B-shaped model (dummy bf16 weights) runs one decode step of M sequences at
context --context: forward and lm_head captured in a CUDA graph and replayed (the median
of --replays), once with the fused small-batch layers (ops/decode_gemv.cu, per --unrolls)
and once with the unfused ones (cuBLAS + separate norm/RoPE/cache/SiLU kernels); then the
floor of benchmarks/floor.py at the same M. Both paths' logits are compared.

    python3 -m benchmarks.decode_step                      # M = 1,2,4,8
    python3 -m benchmarks.decode_step --batches 1 --unrolls 2,4,8
"""
from __future__ import annotations

import argparse
import itertools
import json

from benchmarks.common import SHAPES, hf_config_dict, median, print_table, require_cuda, write_result
from benchmarks.floor import _time_graph, floor_ms

BLOCK_SIZE = 16


def build(torch, max_model_len: int, num_blocks: int):
    from driver.config import ModelArch
    from workers.loader import dummy_weights
    from workers.model import LlamaForCausalLM
    arch = ModelArch.from_hf_config(json.loads(json.dumps(hf_config_dict("llama3-8b"))))
    with torch.device("cuda"):
        model = LlamaForCausalLM(arch, torch.bfloat16).eval()
    dummy_weights(model, 0)
    shape = (num_blocks, arch.num_kv_heads, BLOCK_SIZE, arch.head_dim)
    caches = [tuple(0.5 * torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
              for _ in range(arch.num_layers)]
    return model, caches


def step_inputs(torch, m: int, context: int, max_model_len: int):
    from workers.attention import AttentionMetadata
    per_seq = -(-max_model_len // BLOCK_SIZE)
    tables = torch.arange(m * per_seq, dtype=torch.int32, device="cuda").view(m, per_seq)
    pos = torch.full((m,), context - 1, dtype=torch.int64, device="cuda")
    slots = tables[:, (context - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (context - 1) % BLOCK_SIZE
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                             context_lens=torch.full((m,), context, dtype=torch.int32, device="cuda"),
                             query_start_loc=torch.arange(m + 1, dtype=torch.int32, device="cuda"),
                             num_decodes=m, max_query_len=1, max_context_len=max_model_len)
    ids = torch.randint(100, 30000, (m,), device="cuda")
    return ids, pos, meta


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _profile(torch, step, label: str, replays: int = 10) -> None:
    """Per-step device time of the top kernels of `step`, replayed in a CUDA graph."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:14]
    print(f"-- {label}: us per step, kernel (calls per step)")
    for e in rows:
        print(f"{e.self_device_time_total / replays:9.1f}  {e.key[:100]} ({e.count // replays})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--unrolls", default="2", help="comma-separated UNROLL values of the fused kernels")
    p.add_argument("--ctas-per-sm", default="8", help="comma-separated grid caps of the fused kernels")
    p.add_argument("--min-partition-tokens", default="",
                   help="comma-separated decode-attention split sizes to try (fused path, first unroll/cap)")
    p.add_argument("--context", type=int, default=576, help="tokens of context per sequence (W0: 512-640)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--profile", action="store_true", help="also print the top kernels of each path")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    require_cuda("decode_step")
    import torch
    import workers.model as M
    from ops import cupy_attention, cupy_decode
    batches = [int(b) for b in args.batches.split(",")]
    per_seq = -(-args.max_model_len // BLOCK_SIZE)
    rows, table = [], []
    with torch.inference_mode():
        model, caches = build(torch, args.max_model_len, max(batches) * per_seq)
        for m in batches:
            ids, pos, meta = step_inputs(torch, m, args.context, args.max_model_len)
            step = lambda: model.compute_logits(model(ids, pos, caches, meta))
            M.FUSED_DECODE_MAX_TOKENS = 0
            unfused = median(_time_graph(torch, step, args.replays))
            want = step()
            row = {"m": m, "unfused_ms": round(1e3 * unfused, 4)}
            for unroll, cps in itertools.product(_ints(args.unrolls), _ints(args.ctas_per_sm)):
                M.FUSED_DECODE_MAX_TOKENS, cupy_decode.UNROLL, cupy_decode.CTAS_PER_SM = 8, unroll, cps
                key = f"fused_u{unroll}_c{cps}"
                row[f"{key}_ms"] = round(1e3 * median(_time_graph(torch, step, args.replays)), 4)
                got = step()
                row[f"{key}_logits_rel_err"] = float(f"{((got - want).norm() / want.norm()).item():.2e}")
            for mpt in _ints(args.min_partition_tokens) if args.min_partition_tokens else []:
                default = cupy_attention.MIN_PARTITION_TOKENS
                cupy_attention.MIN_PARTITION_TOKENS = mpt
                cupy_decode.UNROLL, cupy_decode.CTAS_PER_SM = _ints(args.unrolls)[0], _ints(args.ctas_per_sm)[0]
                row[f"fused_split{mpt}_ms"] = round(1e3 * median(_time_graph(torch, step, args.replays)), 4)
                cupy_attention.MIN_PARTITION_TOKENS = default
            rows.append(row)
            if args.profile:
                cupy_decode.UNROLL, cupy_decode.CTAS_PER_SM = _ints(args.unrolls)[0], _ints(args.ctas_per_sm)[0]
                for fused in (0, 8):
                    M.FUSED_DECODE_MAX_TOKENS = fused
                    _profile(torch, step, f"M={m} {'fused' if fused else 'unfused'}")
        del model, caches
        torch.cuda.empty_cache()
    floors = floor_ms("llama3-8b", batches, 1, "cuda", "bfloat16", args.replays)
    for row in rows:
        row["floor_ms"] = floors[row["m"]]
        best = min(v for k, v in row.items() if k.startswith("fused_") and k.endswith("_ms"))
        table.append([row["m"], row["unfused_ms"], best, row["floor_ms"], round(row["unfused_ms"] / row["floor_ms"], 3),
                      round(best / row["floor_ms"], 3)])
    write_result("decode_step", {"config": vars(args) | {"shape": "llama3-8b", "dtype": "bfloat16",
                                                          "layers": SHAPES["llama3-8b"]["num_hidden_layers"]},
                                 "results": {"rows": rows}}, args.out)
    print(json.dumps(rows))
    print_table(["M", "unfused_ms", "fused_ms", "floor_ms", "unfused/floor", "fused/floor"], table)


if __name__ == "__main__":
    main()
