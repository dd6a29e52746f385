"""What a LoRA adapter costs in decode (Llama-3-8B shapes, bf16, random weights; a random
rank-16 PEFT adapter on all seven linears): time per output token of a batch of requests
with the base weights vs all of them under the adapter, in one engine (enable_lora).

Steps with adapter rows run eagerly (no CUDA graphs, no fused TP=1 decode layers) and add
two small GEMMs per linear per adapter; this measures what that costs.

    python3 -m benchmarks.lora_decode                     # batches 1 and 64
    python3 -m benchmarks.lora_decode --shape tiny        # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
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


def tpot_ms(llm, prompts: list[list[int]], lora, new_tokens: int) -> float:
    """Time per output token of the batch: (all new tokens - the first) / (new_tokens - 1)."""
    loras = [lora] * len(prompts)
    llm.generate(prompts, sampling(new_tokens), use_tqdm=False, lora_request=loras)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, sampling(1), use_tqdm=False, lora_request=loras)
    first = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts, sampling(new_tokens), use_tqdm=False, lora_request=loras)
    return ms((time.perf_counter() - start - first) / (new_tokens - 1))


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
                base, adapted = (tpot_ms(llm, prompts, x, args.new_tokens) for x in (None, lora))
                results.append({"batch": batch, "tpot_base_ms": base, "tpot_lora_ms": adapted,
                                "lora_over_base": round(adapted / base, 3)})
                rows.append([batch, base, adapted, round(adapted / base, 3)])
    print_table(["batch", "tpot_base_ms", "tpot_lora_ms", "lora/base"], rows)
    write_result("lora_decode", {"config": {"shape": args.shape, "dtype": args.dtype, "rank": args.rank,
                                            "targets": list(TARGETS), "prompt_len": args.prompt_len,
                                            "new_tokens": args.new_tokens}, "results": results},
                 args.out, device=args.device)


if __name__ == "__main__":
    main()
