"""Bad input: a clear error, no hang, no Ray actor left behind."""
import json
import shutil
import time

import pytest
import ray

from driver import LLM, SamplingParams
from driver.engine import EngineDeadError
from tests.integration.conftest import alive_raytp_actors


def test_missing_model_dir(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(model=str(tmp_path / "nope"), device="cpu")
    assert alive_raytp_actors() == []


def test_unsupported_architecture(tmp_path, llama_ckpt):
    ckpt = tmp_path / "gpt2"
    shutil.copytree(llama_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(model=str(ckpt), device="cpu")


def test_tp_not_dividing_heads(llama_ckpt):
    with pytest.raises(ValueError, match="must divide the number of attention heads"):
        LLM(model=llama_ckpt, tensor_parallel_size=3, device="cpu")
    assert alive_raytp_actors() == []


def test_gpu_requested_without_gpus(llama_ckpt):
    with pytest.raises(RuntimeError, match="needs 1 GPU"):
        LLM(model=llama_ckpt, device="cuda")
    assert alive_raytp_actors() == []


def test_invalid_sampling_values():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-5), dict(n=0),
                dict(max_tokens=0), dict(logprobs=50), dict(min_tokens=10, max_tokens=5)):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


def test_long_prompt_and_bad_ids_then_engine_still_serves(llama_ckpt):
    with LLM(model=llama_ckpt, device="cpu", dtype="float32", max_model_len=32, num_gpu_blocks=16) as llm:
        with pytest.raises(ValueError, match="max_model_len=32"):
            llm.generate([list(range(3, 40))], use_tqdm=False)
        with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
            llm.generate([[10**6]], use_tqdm=False)
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
        assert llm.engine.scheduler.block_manager.num_free_gpu_blocks == 16
    assert alive_raytp_actors() == []


def test_dead_worker_is_an_error_not_a_hang(llama_ckpt):
    llm = LLM(model=llama_ckpt, tensor_parallel_size=2, device="cpu", dtype="float32",
              max_model_len=256, num_gpu_blocks=64)
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
        assert len(alive_raytp_actors()) == 2  # one named actor per TP rank
        ray.kill(llm.engine.executor.workers[1])
        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - start < 60
        with pytest.raises(EngineDeadError):  # and it stays an error
            llm.generate([[5]], use_tqdm=False)
    finally:
        llm.shutdown()
    assert alive_raytp_actors() == []
