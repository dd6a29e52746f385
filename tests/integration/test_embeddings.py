"""Embeddings (LLM.embed, PoolingParams): the last prompt token's final hidden state equals
Hugging Face transformers' (float32) at TP=1 and TP=2: over chunked prefills, after a prefix
-cache hit, and batched with generation requests."""
import random

import pytest

from driver import LLM, PoolingParams, SamplingParams
from tests.hf_reference import hf_embedding, hf_greedy


@pytest.mark.parametrize("tp", [1, 2])
def test_embeddings_match_hf(qwen2_ckpt, tp):
    with LLM(model=qwen2_ckpt, tensor_parallel_size=tp, device="cpu", dtype="float32",
             max_num_batched_tokens=24, max_model_len=256, num_gpu_blocks=64) as llm:
        rng = random.Random(2)
        draw = lambda n: [rng.randrange(3, llm.config.model.arch.vocab_size) for _ in range(n)]  # noqa: E731
        long_, short, other = draw(50), draw(6), draw(9)
        # Budget 24: the 50-token prompt goes in three chunks, batched with a generation.
        outs = llm.generate([long_, other, short], [PoolingParams(), SamplingParams(temperature=0.0, max_tokens=5,
                                                                                    ignore_eos=True),
                                                    PoolingParams(normalize=False)], use_tqdm=False)
        assert outs[0].embedding == pytest.approx(hf_embedding(qwen2_ckpt, long_), abs=1e-4)
        assert outs[2].embedding == pytest.approx(hf_embedding(qwen2_ckpt, short, normalize=False), abs=1e-4)
        assert outs[1].outputs[0].token_ids == hf_greedy(qwen2_ckpt, other, 5)[0] and outs[1].embedding is None
        assert outs[0].outputs == [] and outs[0].finished  # nothing generated

        hit = long_[:40] + draw(2)  # its first two blocks are cached now
        [emb] = llm.embed([hit], use_tqdm=False)
        assert emb.outputs.embedding == pytest.approx(hf_embedding(qwen2_ckpt, hit), abs=1e-4)
        assert emb.prompt_token_ids == hit
        assert llm.engine.scheduler.block_manager.gpu.prefix_cache_hits > 0
