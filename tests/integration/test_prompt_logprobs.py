"""Prompt logprobs (vLLM's SamplingParams.prompt_logprobs) equal Hugging Face transformers
(float32) at TP=1 and TP=2: over chunked prefills, beside requests that do not ask, with
n=2, and past a prefix-cache hit they must not take."""
import random

import pytest

from driver import LLM, SamplingParams
from tests.hf_reference import hf_greedy, hf_prompt_logprobs

K = 3


def _check(ckpt, prompt, prompt_logprobs):
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for pos, (d, (own, top_ids, top_lps)) in enumerate(zip(prompt_logprobs[1:], hf_prompt_logprobs(ckpt, prompt, K)),
                                                       start=1):
        token = prompt[pos]
        assert next(iter(d)) == token  # the prompt token's own logprob comes first
        assert d[token] == pytest.approx(own, abs=2e-4)
        ours_top = sorted(d.items(), key=lambda kv: -kv[1])[:K]  # (its own token too, if in the top k)
        assert [t for t, _ in ours_top] == top_ids
        assert [v for _, v in ours_top] == pytest.approx(top_lps, abs=2e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_prompt_logprobs_match_hf(llama_ckpt, tp):
    asks = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=K)
    plain = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with LLM(model=llama_ckpt, tensor_parallel_size=tp, device="cpu", dtype="float32",
             max_num_batched_tokens=24, max_model_len=256, num_gpu_blocks=64) as llm:
        rng = random.Random(1)
        draw = lambda n: [rng.randrange(3, llm.config.model.arch.vocab_size) for _ in range(n)]  # noqa: E731
        long_, short, other = draw(50), draw(5), draw(9)
        # Budget 24: the 50-token prompt goes in three chunks, batched with the others.
        outs = llm.generate([long_, other, short], [asks, plain, asks], use_tqdm=False)
        _check(llama_ckpt, long_, outs[0].prompt_logprobs)
        _check(llama_ckpt, short, outs[2].prompt_logprobs)
        assert outs[1].prompt_logprobs is None
        assert outs[0].outputs[0].token_ids == hf_greedy(llama_ckpt, long_, 4)[0]

        # long_'s blocks are cached now: a request that asks computes its whole prompt anyway;
        # one that does not takes the hit.
        again = long_[:40] + draw(3)
        [asked, hit] = llm.generate([again, again], [asks, plain], use_tqdm=False)
        assert asked.num_cached_tokens == 0 and hit.num_cached_tokens == 32
        _check(llama_ckpt, again, asked.prompt_logprobs)

        [pair] = llm.generate([draw(21)], SamplingParams(n=2, temperature=0.0, max_tokens=3, prompt_logprobs=0),
                              use_tqdm=False)
        # prompt_logprobs=0: each prompt token's own logprob only (n=2: the parent computes them).
        ids = pair.prompt_token_ids
        assert [list(d) for d in pair.prompt_logprobs[1:]] == [[t] for t in ids[1:]]
        assert [d[t] for d, t in zip(pair.prompt_logprobs[1:], ids[1:])] == \
            pytest.approx([own for own, _, _ in hf_prompt_logprobs(llama_ckpt, ids, 1)], abs=2e-4)
