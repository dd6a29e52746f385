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


class LoRASlots:
    """Which adapter each of the workers' max_loras slots holds. The scheduler decides: a
    sequence runs only with its adapter in a slot, and a slot changes hands only when no
    running sequence uses its adapter (least recently admitted first). Each change goes to
    the workers once, in the next SchedulerOutput's lora_loads, before that step's forward;
    a step in flight that still reads the old adapter is ahead of the load on the stream."""

    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self.slot_of: dict[int, int] = {}  # resident lora_int_id -> slot
        self._last_used: dict[int, int] = {}  # resident lora_int_id -> admission clock
        self._clock = 0
        self._loads: list[tuple[LoRARequest, int]] = []

    def can_run(self, lora_id: int, running: list) -> bool:
        """A sequence of adapter lora_id (0: none) may start beside the `running` sequences."""
        in_use = _ids(running)
        return (not lora_id or lora_id in self.slot_of or len(self.slot_of) < self.max_loras
                or any(i not in in_use for i in self.slot_of))

    def acquire(self, request: LoRARequest, running: list) -> None:
        """Make request's adapter resident (can_run said it may be)."""
        in_use = _ids(running)
        self._clock += 1
        lora_id = request.lora_int_id
        if lora_id not in self.slot_of:
            free = sorted(set(range(self.max_loras)) - set(self.slot_of.values()))
            if free:
                slot = free[0]
            else:
                victim = min((i for i in self.slot_of if i not in in_use), key=self._last_used.__getitem__)
                slot = self.slot_of.pop(victim)
                del self._last_used[victim]
            self.slot_of[lora_id] = slot
            self._loads.append((request, slot))
        self._last_used[lora_id] = self._clock

    def take_loads(self) -> list[tuple[LoRARequest, int]]:
        loads, self._loads = self._loads, []
        return loads


def _ids(running: list) -> set[int]:
    """The adapters of these sequences."""
    return {s.lora_id for s in running if s.lora_id}


__all__ = ["LoRARequest", "LoRASlots", "SUPPORTED_TARGETS", "PEFT_PREFIX", "check_adapter"]
