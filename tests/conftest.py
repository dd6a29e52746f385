"""Shared pytest fixtures. Checkpoints are tiny, random-weight and built locally
(tests.checkpoints.make_checkpoint); each is built once per test session."""
from __future__ import annotations

import pytest

from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory) -> str:
    """LlamaForCausalLM, untied embeddings, GQA 4/2 heads, seed 0."""
    return make_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama", seed=0)


@pytest.fixture(scope="session")
def mistral_ckpt(tmp_path_factory) -> str:
    """MistralForCausalLM (no sliding window), seed 1 so its weights differ from llama's."""
    return make_checkpoint(str(tmp_path_factory.mktemp("mistral")), "mistral", seed=1)


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory) -> str:
    """Qwen2ForCausalLM: q/k/v biases, tied embeddings (no lm_head.weight saved), seed 2."""
    return make_checkpoint(str(tmp_path_factory.mktemp("qwen2")), "qwen2", seed=2)
