"""Weights into a (sharded) model: from a safetensors checkpoint, or random.

Each rank opens the checkpoint itself and reads only its slices (through
`get_slice` and each parameter's weight_loader), so TP=N reads the checkpoint
about once in total, not N times. Names and full shapes are checked against
`model.checkpoint_shapes()` before any tensor data is read, so a wrong
checkpoint fails fast with the offending names.
"""
from __future__ import annotations

import json
import os
import zlib

import torch
from safetensors import safe_open
from tqdm import tqdm

from workers.model import LlamaForCausalLM

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_SHOW = 8  # names listed in an error before "... and N more"


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a Hugging Face checkpoint directory."""
    index = os.path.join(model_dir, _INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(model_dir, _SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"{model_dir!r} holds neither {_SINGLE_FILE} nor {_INDEX_FILE}; raytp loads safetensors "
        f"checkpoints (convert .bin weights with transformers' save_pretrained, or use "
        f"load_format='dummy' for random weights)")


def _names_list(names: list[str]) -> str:
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def _check_checkpoint(model: LlamaForCausalLM, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError unless the checkpoint's tensors are exactly what the model needs."""
    expected = model.checkpoint_shapes()
    present = {n for n in shapes if model.map_weight_name(n) is not None}
    missing = sorted(expected.keys() - present)
    unexpected = sorted(present - expected.keys())
    wrong = sorted(f"{n} {list(shapes[n])} (expected {list(expected[n])})"
                   for n in present & expected.keys() if tuple(shapes[n]) != expected[n])
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names_list(missing)}")
    if unexpected:
        problems.append(f"tensors the model has no parameter for: {_names_list(unexpected)}")
    if wrong:
        problems.append(f"tensors of the wrong shape: {_names_list(wrong)}")
    if problems:
        raise ValueError(f"checkpoint does not match {model.arch.architecture} "
                         f"(from its config.json): " + "; ".join(problems))


@torch.no_grad()
def load_weights(model: LlamaForCausalLM, model_dir: str, progress: bool = True) -> None:
    """Load this rank's slice of every parameter from model_dir's safetensors files."""
    files = checkpoint_files(model_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:  # headers only: names and shapes, no tensor data
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    _check_checkpoint(model, shapes)

    params = dict(model.named_parameters())
    with tqdm(total=len(shapes), desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    target = model.map_weight_name(name)
                    if target is not None:
                        param_name, shard_id = target
                        param = params[param_name]
                        try:
                            param.weight_loader(param, f.get_slice(name), shard_id)
                        except ValueError as e:
                            raise ValueError(f"loading {name} from {path}: {e}") from None
                    bar.update(1)


@torch.no_grad()
def dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights, no files: normal(0, 0.02), norm weights 1.

    Each full (unsharded) tensor is generated from a seed derived from (seed, name)
    and then sliced by the weight loaders, so a model is the same at every TP size
    and on every rank (per device type: CPU and CUDA generators differ).
    """
    params = dict(model.named_parameters())
    for name, shape in model.checkpoint_shapes().items():
        param_name, shard_id = model.map_weight_name(name)
        param = params[param_name]
        if name.endswith("norm.weight"):
            full = torch.ones(shape, dtype=param.dtype, device=param.device)
        else:
            gen = torch.Generator(device=param.device)
            gen.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            full = torch.randn(shape, generator=gen, dtype=param.dtype, device=param.device)
            full.mul_(0.02)
        param.weight_loader(param, full, shard_id)


__all__ = ["load_weights", "dummy_weights", "checkpoint_files"]
