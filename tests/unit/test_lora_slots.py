"""workers/lora.py's two ways of applying adapter slots: the dense form that the decode CUDA
graphs capture (every slot for every row, masked to the row's own) and the grouped form of
eager steps both give x (W + s B A)^T of each row's adapter, and x W^T for base rows, with
two adapters of different ranks and targets and the base in one batch, on every layer."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from driver.config import ModelArch
from driver.lora import LoRARequest
from tests.checkpoints import make_lora_adapter
from workers.loader import load_weights
from workers.lora import LoRAManager
from workers.model import LlamaForCausalLM

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(path: str) -> LlamaForCausalLM:
    with open(os.path.join(path, "config.json")) as f:
        model = LlamaForCausalLM(ModelArch.from_hf_config(json.load(f)), torch.float32)
    load_weights(model, path, progress=False)
    return model


@pytest.fixture(scope="module")
def loaded(llama_ckpt, tmp_path_factory):
    every, every_merged = make_lora_adapter(str(tmp_path_factory.mktemp("a")), llama_ckpt, ALL, r=8, seed=1)
    qv, qv_merged = make_lora_adapter(str(tmp_path_factory.mktemp("b")), llama_ckpt, ["q_proj", "v_proj"],
                                      r=4, alpha=8, seed=2)
    model = _load(llama_ckpt)
    manager = LoRAManager(model, max_loras=3, max_lora_rank=8)
    manager.load(LoRARequest("qv", 2, qv), 0)
    manager.load(LoRARequest("every", 1, every), 1)
    return model, manager, {0: model, 1: _load(every_merged), 2: _load(qv_merged)}


@torch.inference_mode()
def test_dense_and_grouped_equal_the_merged_weights(loaded):
    model, manager, references = loaded
    states = [SimpleNamespace(lora_id=i) for i in (0, 1, 2, 1, 0)]
    num_scheduled = [2, 1, 3, 2, 1]  # a prefill chunk's rows share their sequence's adapter
    slots = manager.slots_of(states)
    assert slots.tolist() == [-1, 1, 0, 1, -1]
    token_ids = np.repeat([s.lora_id for s in states], num_scheduled)
    gen = torch.Generator().manual_seed(0)
    for name in manager.layers:
        layer = model.get_submodule(name)
        x = torch.randn(len(token_ids), layer.weight.shape[1], generator=gen)
        want = torch.stack([F.linear(x[t], references[i].get_submodule(name).weight,
                                     references[i].get_submodule(name).bias)
                            for t, i in enumerate(token_ids)])
        manager.set_groups(slots, num_scheduled)
        grouped = layer(x)
        manager.set_groups(None, num_scheduled)
        manager.batch.set_slots(torch.from_numpy(np.repeat(slots, num_scheduled)))
        dense = layer(x)
        manager.batch.set_slots(None)
        assert not manager.batch.active and torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(grouped, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dense, want, atol=1e-5, rtol=1e-5)


def test_a_load_replaces_the_slots_adapter(loaded, tmp_path, llama_ckpt):
    model, manager, references = loaded
    assert manager.slots_of([SimpleNamespace(lora_id=0)] * 3) is None  # base rows only: no LoRA work
    third, third_merged = make_lora_adapter(str(tmp_path), llama_ckpt, ["o_proj"], r=2, seed=3)
    manager.load(LoRARequest("third", 3, third), 0)  # qv's slot
    assert manager.slots == {1: 1, 3: 0}
    layer, name = model.model.layers[0].self_attn.o_proj, "model.layers.0.self_attn.o_proj"
    x = torch.randn(2, layer.weight.shape[1], generator=torch.Generator().manual_seed(1))
    manager.set_groups(manager.slots_of([SimpleNamespace(lora_id=3)]), [2])
    got = layer(x)
    manager.set_groups(None, [2])
    torch.testing.assert_close(got, F.linear(x, _load(third_merged).get_submodule(name).weight), atol=1e-5, rtol=1e-5)
    # qkv_proj, which "third" leaves alone, lost qv's weights in slot 0: zeros now
    assert not manager.layers["model.layers.0.self_attn.qkv_proj"].slot(0)[0].any()
