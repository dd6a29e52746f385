"""LoRA adapters on a worker (vLLM's multi-LoRA): PEFT checkpoints loaded on first use, each
rank keeping only its slices, applied per row group of a batch beside the base weights.

For a targeted linear y = x W^T, an adapter adds s * (x A^T) B^T (A [r, in], B [out, r],
s = lora_alpha / r). Tensor parallelism follows the base layer's: a column-parallel layer
keeps B's rows of its output shard and all of A; a row-parallel layer keeps A's columns of
its input shard and all of B, and its partial sums join the layer's own all-reduce (the sum
over ranks of x_r A_r^T B^T is x A^T B^T). The stacked layers (qkv_proj, gate_up_proj) hold
one block-diagonal B over the stacked A of their parts, so one product serves q, k and v.

Per step the model runner sets `LoRABatch.groups`: for each adapter in the batch, the rows
(tokens) it applies to. Steps with LoRA rows run eagerly and unfused (CUDA graphs and the
fused decode layers know only the base weights).
"""
from __future__ import annotations

import os

import torch

from driver.lora import PEFT_PREFIX, LoRARequest, check_adapter
from workers.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear


class LoRABatch:
    """The step's row groups, shared by every LoRA layer of a model."""

    def __init__(self):
        self.groups: list[tuple[torch.Tensor, int]] = []  # (row indices [n] on the device, adapter id)


class LoRALayer:
    """One linear's adapters: id -> (A [R, in_local], B [out_local, R] with the scale folded in)."""

    def __init__(self, batch: LoRABatch):
        self.batch = batch
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for rows, lora_id in self.batch.groups:
            w = self.weights.get(lora_id)
            if w is not None:  # (else the adapter leaves this layer alone)
                a, b = w
                out.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
        return out


class LoRAManager:
    def __init__(self, model: torch.nn.Module, max_loras: int, max_lora_rank: int):
        self.model, self.max_loras, self.max_rank = model, max_loras, max_lora_rank
        self.batch = LoRABatch()
        model.model.lora_batch = self.batch  # the fused decode path steps aside for LoRA rows
        self.layers: dict[str, LoRALayer] = {}  # module name -> its LoRA state
        self.loaded: set[int] = set()
        self._parts = {ckpt: (param, shard) for param, ckpt, shard in model.stacked_params_mapping}
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                module.lora = self.layers[name] = LoRALayer(self.batch)

    def ensure_loaded(self, request: LoRARequest) -> None:
        if request.lora_int_id in self.loaded:
            return
        if len(self.loaded) >= self.max_loras:
            raise ValueError(f"more than max_loras={self.max_loras} adapters; raise max_loras")
        config, tensors = read_adapter(request.lora_path, self.max_rank)
        scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
        param = next(self.model.parameters())
        by_module: dict[str, dict] = {}  # our module name -> {part: (A, B)}
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module, part = self._module_of(key[len(PEFT_PREFIX):].split(".lora_A.")[0])
            by_module.setdefault(module, {})[part] = (a.to(param.device, torch.float32),
                                                      b.to(param.device, torch.float32) * scale)
        for module, parts in by_module.items():
            layer = self.model.get_submodule(module)
            self.layers[module].weights[request.lora_int_id] = tuple(
                t.to(param.dtype) for t in _shard(layer, parts, config["r"]))
        self.loaded.add(request.lora_int_id)

    def _module_of(self, ckpt_module: str) -> tuple[str, object]:
        """'model.layers.0.self_attn.q_proj' -> ('model.layers.0.self_attn.qkv_proj', 'q')."""
        prefix, leaf = ckpt_module.rsplit(".", 1)
        param, shard = self._parts.get(leaf, (leaf, None))
        return f"{prefix}.{param}", shard

    def set_rows(self, groups: list[tuple[torch.Tensor, int]]) -> None:
        self.batch.groups = groups


def _shard(layer: torch.nn.Module, parts: dict, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A, B) of one layer from its parts' full (A [r, in], B [out, r])."""
    if isinstance(layer, RowParallelLinear):
        (a, b), = parts.values()
        a_local = torch.empty(r, layer.input_size_per_partition, dtype=a.dtype, device=a.device)
        layer.weight_loader(a_local, a)  # the input columns of this rank
        return a_local, b
    names, device = _part_names(layer), next(iter(parts.values()))[0].device
    a_cat = torch.zeros(len(names) * r, layer.input_size, device=device)
    b_cat = torch.zeros(layer.output_size_per_partition, len(names) * r, device=device)
    for i, name in enumerate(names):
        if name not in parts:
            continue  # an untargeted part: zeros
        a, b = parts[name]
        a_cat[i * r:(i + 1) * r] = a
        layer.weight_loader(b_cat[:, i * r:(i + 1) * r], b, name)  # this rank's output rows of the part
    return a_cat, b_cat


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
