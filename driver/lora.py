"""LoRA requests (vLLM's LoRARequest): which adapter a request runs with."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

# The linears an adapter may target (PEFT's names in Llama, Mistral and Qwen2).
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int  # >= 1, unique per adapter: it keys the workers' weights and the prefix cache
    lora_path: str  # a PEFT checkpoint directory: adapter_config.json, adapter_model.safetensors

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")


PEFT_PREFIX = "base_model.model."


def check_adapter(path: str, max_rank: int) -> dict:
    """A PEFT LoRA checkpoint directory's adapter_config.json, once its adapter is one raytp
    applies: LoRA on SUPPORTED_TARGETS only, of rank <= max_rank. Reads no tensors."""
    from safetensors import safe_open

    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            config = json.load(f)
        with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="numpy") as f:
            keys = list(f.keys())
    except OSError as e:
        raise ValueError(f"{path} is no PEFT LoRA checkpoint (adapter_config.json and "
                         f"adapter_model.safetensors): {e}") from None
    modules = {k[len(PEFT_PREFIX):].split(".lora_")[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k}
    if unsupported := sorted(modules - set(SUPPORTED_TARGETS)):
        raise ValueError(f"{path}: LoRA on {unsupported} is not supported (only {list(SUPPORTED_TARGETS)})")
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise ValueError(f"{path}: adapters with modules_to_save or trained biases are not supported")
    if config.get("r", 0) > max_rank:
        raise ValueError(f"{path}: rank {config['r']} is more than max_lora_rank={max_rank}; raise max_lora_rank")
    return config


__all__ = ["LoRARequest", "SUPPORTED_TARGETS", "PEFT_PREFIX", "check_adapter"]
