"""LoRA adapters on a worker (vLLM's multi-LoRA): PEFT checkpoints loaded on first use into
one of max_loras slots, each rank keeping only its slices, applied beside the base weights.

For a targeted linear y = x W^T, an adapter adds s * (x A^T) B^T (A [r, in], B [out, r],
s = lora_alpha / r). Tensor parallelism follows the base layer's: a column-parallel layer
keeps B's rows of its output shard and all of A; a row-parallel layer keeps A's columns of
its input shard and all of B, and its partial sums join the layer's own all-reduce (the sum
over ranks of x_r A_r^T B^T is x A^T B^T). The stacked layers (qkv_proj, gate_up_proj) hold
one block-diagonal B over the stacked A of their parts, so one product serves q, k and v.

Every layer's slots live in two buffers allocated with the model (before the KV cache is
sized): A [L * P * R, in] and B^T [L * P * R, out] for L = max_loras slots, P stacked parts
and R = max_lora_rank (a smaller rank, or an untargeted part, leaves zeros). A step applies
them one of two ways (`LoRABatch`):
- grouped (eager steps): per adapter in the step, its rows' two products, FLOPs as needed;
- per row (decode CUDA graphs, ops' lora_apply): each row its own slot's products, by two
  kernels that read only that slot (up to 16 rows), else every slot for every row masked to
  the row's own. Shapes never depend on which adapters a step has, so one graph serves any
  mix.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from driver.lora import PEFT_PREFIX, LoRARequest, check_adapter
from ops.dispatch import ops_for
from workers.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from workers.staging import to_device_async

logger = logging.getLogger("raytp.lora")
TARGET_LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRABatch:
    """The step's adapter rows, shared by every LoRA layer of a model. At most one of
    `groups` (eager) and `slots` (graphs) is set; neither: no adapter in the step."""

    def __init__(self, max_loras: int, device: torch.device, dtype: torch.dtype):
        self.groups: list[tuple[torch.Tensor, int]] = []  # (row indices [n] on the device, slot)
        self.slots: torch.Tensor | None = None  # [T] int64: each row's slot (-1: none)
        self.onehot: torch.Tensor | None = None  # [T, L]: slots as one-hot rows
        self.dtype = dtype
        self.slot_ids = torch.arange(max_loras, device=device)

    @property
    def active(self) -> bool:
        return self.slots is not None or bool(self.groups)

    def set_slots(self, slots: torch.Tensor | None) -> None:
        """slots [T] int64 on the device (-1: the base weights): the per-row mode, without a
        host sync (capturable); None ends it."""
        self.slots = slots
        self.onehot = None if slots is None else (slots[:, None] == self.slot_ids).to(self.dtype)


class LoRALayer:
    """One linear's slots: A [L * P * R, in_local], B^T [L * P * R, out_local] (scale folded in)."""

    def __init__(self, layer: torch.nn.Module, batch: LoRABatch, max_loras: int, rank: int):
        out_local, in_local = layer.weight.shape
        self.batch, self.parts, self.rank = batch, _part_names(layer), rank
        width = len(self.parts) * rank  # one slot's columns
        w = layer.weight
        self.a = torch.zeros(max_loras * width, in_local, dtype=w.dtype, device=w.device)
        self.bt = torch.zeros(max_loras * width, out_local, dtype=w.dtype, device=w.device)
        self.width = width

    def slot(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot s's (A [P * R, in_local], B [out_local, P * R]) views."""
        rows = slice(s * self.width, (s + 1) * self.width)
        return self.a[rows], self.bt[rows].t()

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if batch.slots is not None:
            return ops_for(x).lora_apply(out, x, self.a, self.bt, batch.slots, batch.onehot, self.width)
        for rows, s in batch.groups:
            a, b = self.slot(s)
            out.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
        return out


class LoRAManager:
    """The model's LoRA layers and slots. The driver picks the slot of each adapter
    (driver/lora.py's LoRASlots) and says when to load one, replacing the slot's previous."""

    def __init__(self, model: torch.nn.Module, max_loras: int, max_lora_rank: int):
        self.model, self.max_loras, self.max_rank = model, max_loras, max_lora_rank
        param = next(model.parameters())
        self.device = param.device
        self.batch = LoRABatch(max_loras, param.device, param.dtype)
        model.model.lora_batch = self.batch  # the fused decode path steps aside for LoRA rows
        self.layers: dict[str, LoRALayer] = {}  # module name -> its LoRA state
        self.slots: dict[int, int] = {}  # resident lora_int_id -> slot
        self._parts = {ckpt: (param, shard) for param, ckpt, shard in model.stacked_params_mapping}
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGET_LAYERS:
                module.lora = self.layers[name] = LoRALayer(module, self.batch, max_loras, max_lora_rank)
        nbytes = sum(t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.a, layer.bt))
        logger.info("LoRA slots: %d adapters of rank <= %d, %.1f MiB", max_loras, max_lora_rank, nbytes / 2**20)

    def load(self, request: LoRARequest, slot: int) -> None:
        """Put request's adapter into `slot` (whatever held it before is gone)."""
        config, tensors = read_adapter(request.lora_path, self.max_rank)
        scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
        by_module: dict[str, dict] = {}  # our module name -> {part: (A, B)}
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module, part = self._module_of(key[len(PEFT_PREFIX):].split(".lora_A.")[0])
            by_module.setdefault(module, {})[part] = (a.to(self.device, torch.float32),
                                                      b.to(self.device, torch.float32) * scale)
        for module, layer in self.layers.items():
            a, b = layer.slot(slot)
            a.zero_(), b.zero_()
            if module in by_module:
                _load_slot(self.model.get_submodule(module), layer, a, b, by_module[module])
        self.slots = {i: s for i, s in self.slots.items() if s != slot}
        self.slots[request.lora_int_id] = slot

    def _module_of(self, ckpt_module: str) -> tuple[str, object]:
        """'model.layers.0.self_attn.q_proj' -> ('model.layers.0.self_attn.qkv_proj', 'q')."""
        prefix, leaf = ckpt_module.rsplit(".", 1)
        param, shard = self._parts.get(leaf, (leaf, None))
        return f"{prefix}.{param}", shard

    def slots_of(self, states: list) -> np.ndarray | None:
        """Each sequence's slot (-1: the base weights) [B] int64; None if none has an adapter."""
        if not any(s.lora_id for s in states):
            return None
        return np.array([self.slots[s.lora_id] if s.lora_id else -1 for s in states], dtype=np.int64)

    def set_groups(self, slots: np.ndarray | None, num_scheduled: list[int]) -> None:
        """Tell the layers which rows (tokens) of an eager step each slot applies to."""
        groups = []
        if slots is not None:
            token_slots = np.repeat(slots, num_scheduled)
            for s in np.unique(slots[slots >= 0]):
                groups.append((to_device_async(np.flatnonzero(token_slots == s), self.device), int(s)))
        self.batch.groups = groups


def _load_slot(layer: torch.nn.Module, lora: LoRALayer, a_slot: torch.Tensor, b_slot: torch.Tensor,
               parts: dict) -> None:
    """Write this rank's slices of one layer's parts' full (A [r, in], B [out, r]) (float32)
    into its slot's (A [P * R, in_local], B [out_local, P * R]); part i takes rows (columns)
    i * R .. i * R + r."""
    if isinstance(layer, RowParallelLinear):
        (a, b), = parts.values()
        r = a.shape[0]
        layer.weight_loader(a_slot[:r], a)  # the input columns of this rank
        b_slot[:, :r] = b
        return
    R = lora.rank
    for i, name in enumerate(lora.parts):
        if name in parts:  # (an untargeted part stays zeros)
            a, b = parts[name]
            r = a.shape[0]
            a_slot[i * R:i * R + r] = a
            layer.weight_loader(b_slot[:, i * R:i * R + r], b, name)  # this rank's output rows of the part


def _part_names(layer: torch.nn.Module) -> list:
    """The shard ids of a column-parallel layer's stacked parts (its weight loader's)."""
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(len(layer.output_sizes)))
    return [None]


def read_adapter(path: str, max_rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT LoRA checkpoint directory: (adapter_config.json, its tensors), checked."""
    from safetensors.torch import load_file

    config = check_adapter(path, max_rank)
    return config, load_file(os.path.join(path, "adapter_model.safetensors"))


__all__ = ["LoRAManager", "LoRABatch", "LoRALayer", "read_adapter"]
