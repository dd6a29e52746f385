"""A KV cache too small for the batch forces preemption; outputs still equal HF's."""
import random

import pytest

from driver import LLM, SamplingParams
from tests.hf_reference import hf_greedy


@pytest.mark.parametrize("mode,tp,style", [("recompute", 2, "llama"), ("swap", 2, "llama"),
                                           ("recompute", 1, "qwen2"), ("swap", 1, "mistral")])
def test_preemption_keeps_outputs_exact(mode, tp, style, request):
    ckpt = request.getfixturevalue(f"{style}_ckpt")
    rng = random.Random(1)
    # 4 sequences x (20 prompt + 28 new) tokens need 12 blocks of 16; the cache has 6.
    with LLM(model=ckpt, tensor_parallel_size=tp, device="cpu", dtype="float32", num_gpu_blocks=6,
             max_model_len=64, preemption_mode=mode, max_num_batched_tokens=64) as llm:
        vocab = llm.config.model.arch.vocab_size
        prompts = [[rng.randrange(3, vocab) for _ in range(20)] for _ in range(4)]
        params = SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        sched = llm.engine.scheduler
        assert sched.num_preempted_total > 0
        if mode == "swap":
            assert sched.num_swapped_out_total > 0
        for prompt, out in zip(prompts, outs):
            assert out.outputs[0].token_ids == hf_greedy(ckpt, prompt, 28)[0]
        assert sched.block_manager.num_free_gpu_blocks == 6  # nothing leaked
