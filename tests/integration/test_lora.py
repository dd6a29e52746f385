"""LoRA adapters (vLLM's LoRARequest, enable_lora): greedy tokens and logprobs of a request
under an adapter equal Hugging Face transformers' on the base with that adapter merged into
its weights, at TP=1 and TP=2, with two adapters (one on every linear, one on q/v only) and
the base in one batch, over chunked prefills; K/V under one adapter is never another's
prefix-cache hit; more adapters than max_loras slots take turns."""
import random

import pytest

from driver import LLM, SamplingParams
from driver.lora import LoRARequest
from tests.checkpoints import make_lora_adapter
from tests.hf_reference import hf_greedy

TOKENS = 8
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(llama_ckpt, tmp_path_factory):
    every = make_lora_adapter(str(tmp_path_factory.mktemp("lora1")), llama_ckpt, ALL, r=8, alpha=16, seed=1)
    qv = make_lora_adapter(str(tmp_path_factory.mktemp("lora2")), llama_ckpt, ["q_proj", "v_proj"], r=4,
                           alpha=8, seed=2)
    return every, qv


def _check(ckpt, prompt, completion):
    tokens, lps = hf_greedy(ckpt, prompt, TOKENS)
    assert completion.token_ids == tokens
    assert [d[t] for d, t in zip(completion.logprobs, completion.token_ids)] == pytest.approx(lps, abs=2e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_adapters_equal_merged_weights(llama_ckpt, adapters, tp):
    (every, every_merged), (qv, qv_merged) = adapters
    loras = [None, LoRARequest("every", 1, every), LoRARequest("qv", 2, qv), LoRARequest("every", 1, every)]
    greedy = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    with LLM(model=llama_ckpt, tensor_parallel_size=tp, device="cpu", dtype="float32", enable_lora=True,
             max_loras=2, max_num_batched_tokens=24, max_model_len=256, num_gpu_blocks=64) as llm:
        rng = random.Random(3)
        shared = [rng.randrange(3, 500) for _ in range(40)]  # chunked; the same prompt in two requests
        prompts = [shared, [rng.randrange(3, 500) for _ in range(9)], [rng.randrange(3, 500) for _ in range(21)],
                   shared]
        outs = llm.generate(prompts, greedy, use_tqdm=False, lora_request=loras)
        for prompt, out, ckpt in zip(prompts, outs, [llama_ckpt, every_merged, qv_merged, every_merged]):
            _check(ckpt, prompt, out.outputs[0])
        assert outs[0].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the adapter changes the reply

        # The base's blocks of `shared` are cached now; the adapter's are their own.
        [base_hit, lora_hit] = llm.generate([shared, shared], greedy, use_tqdm=False,
                                            lora_request=[None, LoRARequest("every", 1, every)])
        assert base_hit.num_cached_tokens == 32 and lora_hit.num_cached_tokens == 32
        assert base_hit.outputs[0].token_ids == outs[0].outputs[0].token_ids
        assert lora_hit.outputs[0].token_ids == outs[3].outputs[0].token_ids

        # A third adapter with two slots: batches take turns, slots change hands between them.
        third = LoRARequest("third", 3, qv)  # (qv's weights under another id)
        outs = llm.generate(prompts[1:], greedy, use_tqdm=False,
                            lora_request=[third, LoRARequest("every", 1, every), LoRARequest("qv", 2, qv)])
        for prompt, out, ckpt in zip(prompts[1:], outs, [qv_merged, every_merged, qv_merged]):
            _check(ckpt, prompt, out.outputs[0])


def test_lora_needs_enable_lora_and_a_real_adapter(llama_ckpt, adapters, tmp_path):
    with LLM(model=llama_ckpt, device="cpu", dtype="float32") as llm:
        with pytest.raises(ValueError, match="needs an engine started with enable_lora=True"):
            llm.generate("hi", lora_request=LoRARequest("every", 1, adapters[0][0]), use_tqdm=False)
    with LLM(model=llama_ckpt, device="cpu", dtype="float32", enable_lora=True) as llm:
        with pytest.raises(ValueError, match="is no PEFT LoRA checkpoint"):
            llm.generate("hi", lora_request=LoRARequest("none", 1, str(tmp_path)), use_tqdm=False)
        assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def lora_server(llama_ckpt, adapters):
    from ray import serve

    from benchmarks.common import free_port
    from driver import serve as raytp_serve
    from driver.config import EngineConfig, ServeConfig

    port = free_port()
    engine_cfg = EngineConfig.create(llama_ckpt, device="cpu", dtype="float32", max_model_len=256, enable_lora=True,
                                     max_loras=2)
    serve_cfg = ServeConfig(host="127.0.0.1", port=port, served_model_name="base", replica_num_cpus=0,
                            lora_modules={"every": adapters[0][0], "qv": adapters[1][0]})
    raytp_serve.run(engine_cfg, serve_cfg, blocking=False)
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


def test_served_adapters_are_models_of_their_own(llama_ckpt, adapters, lora_server):
    import openai

    client = openai.OpenAI(base_url=lora_server, api_key="unused", max_retries=0, timeout=60)
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert list(cards) == ["base", "every", "qv"] and cards["every"]["parent"] == "base"
    prompt = [random.Random(4).randrange(3, 500) for _ in range(17)]
    for model, ckpt in (("base", llama_ckpt), ("every", adapters[0][1]), ("qv", adapters[1][1])):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0, logprobs=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].logprobs.token_logprobs == pytest.approx(hf_greedy(ckpt, prompt, TOKENS)[1], abs=2e-4)
    with pytest.raises(openai.NotFoundError, match="this server serves 'base', 'every', 'qv'"):
        client.completions.create(model="other", prompt="hi")


def test_lora_modules_that_cannot_be_served_fail_the_deployment(llama_ckpt, adapters):
    from driver import serve as raytp_serve
    from driver.config import EngineConfig, ServeConfig

    modules = {"every": adapters[0][0], "qv": adapters[1][0]}
    plain = EngineConfig.create(llama_ckpt, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="add --enable-lora"):
        raytp_serve.build_app(plain, ServeConfig(lora_modules=modules))
    small = EngineConfig.create(llama_ckpt, device="cpu", dtype="float32", enable_lora=True, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank 8 is more than max_lora_rank=4"):
        raytp_serve.build_app(small, ServeConfig(lora_modules=modules))
