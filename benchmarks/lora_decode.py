"""What a LoRA adapter costs in decode (Llama-3-8B shapes, bf16, random weights; a random
rank-16 PEFT adapter on all seven linears): time per output token of a batch of requests
with the base weights, all of them under the adapter, and half and half, in one engine
(enable_lora).

Decode steps with adapter rows replay their bucket's LoRA CUDA graph: the unfused layers
(at TP=1 the base's batch-1 steps run fused ones) plus, per linear, each row's slot applied
(ops/lora.cu up to 16 rows, masked GEMMs over every slot above; workers/lora.py); this
measures what that costs. Each figure is
the median of 3 pairs of runs, (N new tokens - 1 new token) / (N - 1).

    python3 -m benchmarks.lora_decode                     # batches 1 and 64
    python3 -m benchmarks.lora_decode --shape tiny        # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from benchmarks.common import (SHAPES, add_common_args, make_llm, make_prompts, ms, print_table, resolve_args,
                               sampling, write_result)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(shape: str, rank: int, path: str) -> str:
    """A random PEFT LoRA adapter for `shape` (bf16, small weights) in `path`."""
    import torch
    from safetensors.torch import save_file

    s = SHAPES[shape]
    h, i, d = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * d
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)
    g, tensors = torch.Generator().manual_seed(0), {}
    for layer in range(s["num_hidden_layers"]):
        for name, (fan_in, fan_out) in dims.items():
            part = "self_attn" if name in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) * 0.01).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.01).bfloat16()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
                   "bias": "none"}, f)
    return path


def tpot_ms(llm, prompts: list[list[int]], loras: list, new_tokens: int, repeats: int = 3) -> float:
    """Median time per output token of the batch: (all new tokens - the first) / (new_tokens - 1)."""
    llm.generate(prompts, sampling(new_tokens), use_tqdm=False, lora_request=loras)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, sampling(1), use_tqdm=False, lora_request=loras)
        first = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate(prompts, sampling(new_tokens), use_tqdm=False, lora_request=loras)
        times.append((time.perf_counter() - start - first) / (new_tokens - 1))
    return ms(statistics.median(times))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default: 1,64)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = resolve_args(parser.parse_args(argv))
    from driver.lora import LoRARequest

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        lora = LoRARequest("bench", 1, write_adapter(args.shape, args.rank, tmp))
        with make_llm(args, enable_lora=True, max_lora_rank=args.rank) as llm:
            for batch in map(int, args.batches.split(",")):
                prompts = make_prompts(args.shape, [args.prompt_len] * batch, seed=batch)
                half = [lora if i % 2 else None for i in range(batch)]
                base, adapted, mixed = (tpot_ms(llm, prompts, loras, args.new_tokens)
                                        for loras in ([None] * batch, [lora] * batch, half))
                results.append({"batch": batch, "tpot_base_ms": base, "tpot_lora_ms": adapted,
                                "tpot_half_lora_ms": mixed, "lora_over_base": round(adapted / base, 3)})
                rows.append([batch, base, adapted, mixed, round(adapted / base, 3)])
    print_table(["batch", "tpot_base_ms", "tpot_lora_ms", "tpot_half_ms", "lora/base"], rows)
    write_result("lora_decode", {"config": {"shape": args.shape, "dtype": args.dtype, "rank": args.rank,
                                            "targets": list(TARGETS), "prompt_len": args.prompt_len,
                                            "new_tokens": args.new_tokens}, "results": results},
                 args.out, device=args.device)


if __name__ == "__main__":
    main()
