"""vLLM's --generation-config auto: a checkpoint's generation_config.json sets the sampling
defaults of requests that leave those fields out, over HTTP and offline; fields a request
gives win."""
import json
import os

import openai
import pytest
from ray import serve

from benchmarks.common import free_port
from driver import LLM, SamplingParams
from driver import serve as raytp_serve
from driver.config import EngineConfig, ServeConfig, generation_defaults
from tests.checkpoints import make_checkpoint

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint(str(tmp_path_factory.mktemp("gencfg")), "llama", seed=4)
    config_path = os.path.join(path, "generation_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:  # greedy by default, as the checkpoint's authors chose
        json.dump({**config, "do_sample": False, "temperature": 0.0, "top_k": 5}, f)
    return path


def test_the_checkpoints_sampling_fields_are_read(ckpt):
    assert generation_defaults(ckpt) == {"temperature": 0.0, "top_k": 5}


def test_requests_without_a_temperature_sample_as_the_checkpoint_says(ckpt):
    port = free_port()
    engine_cfg = EngineConfig.create(ckpt, device="cpu", dtype="float32", max_model_len=256)
    raytp_serve.run(engine_cfg, ServeConfig(host="127.0.0.1", port=port, served_model_name="m", replica_num_cpus=0),
                    blocking=False)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model="m", prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True})
        default = client.completions.create(n=3, **kw)
        greedy = client.completions.create(temperature=0, **kw).choices[0].text
        assert [c.text for c in default.choices] == [greedy] * 3  # greedy: the checkpoint's default
        hot = client.completions.create(n=3, temperature=1.5, seed=1, **kw)  # the request's own wins
        assert len({c.text for c in hot.choices}) > 1
    finally:
        serve.shutdown()

    with LLM(model=ckpt, device="cpu", dtype="float32", max_model_len=256, num_gpu_blocks=64) as llm:
        assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, top_k=5)
        [out] = llm.generate([PROMPT], use_tqdm=False)  # no params: the checkpoint's (greedy)
        assert out.outputs[0].token_ids == llm.generate([PROMPT], SamplingParams(temperature=0), use_tqdm=False)[0] \
            .outputs[0].token_ids
