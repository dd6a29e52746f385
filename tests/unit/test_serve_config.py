"""ServeConfig: the `serve:` section of a preset, flags over it, and clear errors; the engine
sections of the same preset still load (EngineConfig.from_yaml skips `serve:`)."""
from __future__ import annotations

import os

import pytest

from driver.config import EngineConfig, ServeConfig
from tests.checkpoints import make_checkpoint

PRESET = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "serve.yaml")


def test_preset_then_flags():
    cfg = ServeConfig.from_yaml(PRESET, port=9001, host=None)
    assert (cfg.host, cfg.port, cfg.max_num_requests, cfg.stream_interval) == ("0.0.0.0", 9001, 512, 1)
    assert ServeConfig.from_yaml(None) == ServeConfig()
    assert ServeConfig.from_yaml(None, api_key="k").api_key == "k"


@pytest.mark.parametrize("bad, says", [
    ({"reasoning_parser": "qwen3"}, "unknown reasoning parser 'qwen3'"),
    ({"autoscaling_config": {"max_replica": 2}}, "Ray Serve's AutoscalingConfig fields"),
    ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas (2) must be greater"),
    ({"autoscaling_config": {"max_replicas": 2}, "num_replicas": 2}, "num_replicas or autoscaling_config"),
    ({"enable_auto_tool_choice": True}, "enable_auto_tool_choice needs tool_call_parser"),
    ({"tool_call_parser": "granite"}, "unknown tool call parser 'granite'; choose one of"),
    ({"prot": 1}, "unknown serve option(s) ['prot']"),
    ({"port": 70000}, "port must be in 1..65535"),
    ({"stream_interval": 0}, "stream_interval must be >= 1"),
    ({"max_num_requests": 0}, "max_num_requests"),
    ({"chat_template": "templates/missing.jinja"}, "neither a file nor a Jinja template"),
    ({"generation_config": "hf"}, "generation_config must be 'auto' or 'vllm'"),
])
def test_bad_values_say_what(bad, says):
    with pytest.raises(ValueError) as e:
        ServeConfig.from_yaml(None, **bad)
    assert says in str(e.value)


def test_engine_sections_of_the_serve_preset_load(tmp_path):
    ckpt = make_checkpoint(str(tmp_path / "m"), "llama")
    cfg = EngineConfig.from_yaml(PRESET, model=ckpt, device="cpu", dtype="float32", max_model_len=256)
    assert cfg.scheduler.max_num_batched_tokens == 8192 and cfg.model.max_model_len == 256
