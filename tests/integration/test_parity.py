"""Greedy tokens and logprobs equal Hugging Face transformers (float32), at TP=1 and TP=2,
with chunked prefill, a prefix-cache hit and n=2 (copy-on-write)."""
import random

import pytest

from driver import LLM, SamplingParams
from tests.hf_reference import hf_greedy

MAX_TOKENS = 10


def _prompts(vocab: int, seed: int = 0) -> tuple[list[int], list[int], list[int], list[int]]:
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(3, vocab) for _ in range(n)]
    short, long_ = draw(7), draw(37)
    shares_prefix = long_[:32] + draw(18)  # two full blocks in common with `long_`
    odd = draw(21)  # 21 = 16 + 5: the forked n=2 sequences share a partly filled block
    return short, long_, shares_prefix, odd


def _check(ckpt, prompt, completion, num_tokens=MAX_TOKENS):
    ref_tokens, ref_logprobs = hf_greedy(ckpt, prompt, num_tokens)
    assert completion.token_ids == ref_tokens
    ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
    assert ours == pytest.approx(ref_logprobs, abs=2e-4)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("style", ["llama", "mistral", "qwen2"])
def test_greedy_parity(style, tp, request):
    ckpt = request.getfixturevalue(f"{style}_ckpt")
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    # A token budget of 24 splits the 37- and 50-token prompts into chunked prefills.
    with LLM(model=ckpt, tensor_parallel_size=tp, device="cpu", dtype="float32",
             max_num_batched_tokens=24, max_model_len=256, num_gpu_blocks=64) as llm:
        short, long_, shares_prefix, odd = _prompts(llm.config.model.arch.vocab_size)
        outs = llm.generate([short, long_], greedy, use_tqdm=False)
        for prompt, out in zip([short, long_], outs):
            assert out.prompt_token_ids == prompt
            _check(ckpt, prompt, out.outputs[0])

        [hit] = llm.generate([shares_prefix], greedy, use_tqdm=False)
        assert hit.num_cached_tokens == 32
        _check(ckpt, shares_prefix, hit.outputs[0])

        [pair] = llm.generate([odd], SamplingParams(n=2, temperature=0.0, max_tokens=MAX_TOKENS,
                                                    ignore_eos=True, logprobs=1), use_tqdm=False)
        assert [c.index for c in pair.outputs] == [0, 1]
        for completion in pair.outputs:
            _check(ckpt, odd, completion)
        assert llm.engine.scheduler.block_manager.num_cow_copies > 0
