"""Sampling features end to end through Ray workers, and the CLI."""
import json
import os
import subprocess
import sys

import pytest

from driver import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    with LLM(model=llama_ckpt, tensor_parallel_size=2, device="cpu", dtype="float32",
             max_model_len=256, num_gpu_blocks=128) as engine:
        yield engine


PROMPT = "The quick brown fox jumps over the lazy dog"


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3
    batched = llm.generate(["other", PROMPT, "more text"], [crowd[0], params, crowd[2]], use_tqdm=False)
    assert batched[1].outputs[0].token_ids == alone
    other_seed = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                       ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_completions_differ_when_sampling(llm):
    [out] = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.5, seed=7, max_tokens=12,
                                                  ignore_eos=True), use_tqdm=False)
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1


def _greedy(llm, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, **kw)
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]


def test_stop_token_ids_and_min_tokens(llm):
    full = _greedy(llm)
    stop_at = 3
    stop_id = full.token_ids[stop_at]
    first = full.token_ids.index(stop_id)
    stopped = _greedy(llm, stop_token_ids=[stop_id])
    assert stopped.token_ids == full.token_ids[:first + 1]
    assert stopped.finish_reason == "stop"
    # The stop token is not text (vLLM v1's), unless include_stop_str_in_output.
    assert stopped.text == llm.tokenizer.decode(full.token_ids[:first])
    kept = _greedy(llm, stop_token_ids=[stop_id], include_stop_str_in_output=True)
    assert kept.text == llm.tokenizer.decode(full.token_ids[:first + 1]) != stopped.text
    late = _greedy(llm, stop_token_ids=[stop_id], min_tokens=first + 3)
    assert len(late.token_ids) >= first + 3
    assert stop_id not in late.token_ids[:first + 3]


def test_bad_words_equal_transformers(llm, llama_ckpt):
    """vLLM's bad_words against transformers' bad_words_ids (NoBadWordsLogitsProcessor) over
    the same spellings: greedy outputs equal, token for token, and no banned spelling occurs."""
    import torch

    from driver.engine import bad_words_token_ids
    from tests.hf_reference import hf_model

    full, tok = _greedy(llm), llm.tokenizer
    ids = full.token_ids

    def spelled(tokens: tuple[int, ...]) -> str | None:  # the word that bans these tokens, if any
        word = tok.decode(list(tokens)).strip()
        return word if word.isprintable() and tokens in bad_words_token_ids(tok, (word,)) else None

    # A one-token word and a two-token word that the model writes unbanned.
    one = next(w for t in ids if (w := spelled((t,))) and w.isalpha())
    two = next(w for pair in zip(ids, ids[1:]) if (w := spelled(pair)))
    words = [one, two]
    banned = bad_words_token_ids(tok, tuple(words))
    prompt = tok.encode(PROMPT)
    # (transformers also matches a word's first tokens at the prompt's end; vLLM only in the output)
    assert not any(len(w) > 1 and tuple(prompt[-(len(w) - 1):]) == w[:-1] for w in banned)
    out = _greedy(llm, bad_words=words)
    with torch.inference_mode():
        want = hf_model(llama_ckpt).generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                             bad_words_ids=[list(w) for w in banned], eos_token_id=None,
                                             pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == want and out.token_ids != ids and any(len(w) == 2 for w in banned)
    assert not any(tuple(out.token_ids[i:i + len(w)]) == w for w in banned for i in range(len(out.token_ids)))


def test_chat_with_a_chat_template_of_its_own(llm):
    messages = [{"role": "user", "content": "hi"}]
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<bot>"
    [out] = llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False, chat_template=template)
    assert out.prompt_token_ids == llm.tokenizer.encode("<user>hi<bot>", add_special_tokens=False)
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        llm.chat(messages, chat_template="no-such-file.jinja")


def test_stop_string_ends_text_and_is_excluded(llm):
    full = _greedy(llm)
    assert len(full.text) > 12, full.text
    stop = full.text[6:9]
    cut = full.text.index(stop)
    out = _greedy(llm, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert len(out.token_ids) < len(full.token_ids)


def test_max_tokens_and_length_reason(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_chat_template(llm):
    [out] = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, ignore_eos=True),
                     use_tqdm=False)
    assert len(out.prompt_token_ids) > 3 and len(out.outputs[0].token_ids) == 4


def test_cli_generate_with_embedded_demo(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "driver.cli", "generate", "--max-tokens", "6",
                           "--device", "cpu", "Hello"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "demo checkpoint" in proc.stderr
    assert "prompt: 'Hello'" in proc.stdout and "6 tokens" in proc.stdout
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}')
    proc = subprocess.run([sys.executable, "-m", "driver.cli", "generate", "--max-tokens", "20", "--device", "cpu",
                           "--json", "--json-schema", str(schema), "Hello"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(reply["text"]) in ({"ok": True}, {"ok": False}), reply


def test_cli_help_explains():
    proc = subprocess.run([sys.executable, "-m", "driver.cli", "generate", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--tensor-parallel-size", "--max-tokens", "--preemption-mode", "--model"):
        assert flag in proc.stdout
    text = " ".join(proc.stdout.split())  # (help lines wrap)
    assert "(default: None)" not in text and "(default: 32) (default" not in text, "defaults said twice"
    assert "(default: 256)" in text and "(default: 8192)" in text  # the engine's, for flags left unset


def test_steps_through_the_object_store_give_the_same_tokens(llm, monkeypatch):
    """A small step message travels inside each rank's call, a large one through the object
    store (once for all ranks): both reach the workers whole."""
    from executor import ray_executor
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [PROMPT, "Hello there"]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(ray_executor, "INLINE_MAX_BYTES", 0)  # every step message through ray.put
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want


@pytest.mark.parametrize("other", [{"async_scheduling": False}, {"steps_in_flight": 3}], ids=["sync", "three"])
def test_async_scheduling_gives_the_same_outputs_as_sync(llm, llama_ckpt, other):
    """The fixture engine schedules asynchronously (the default, two steps in flight); a
    synchronous one, and one with three steps in flight, must produce the same tokens for
    greedy, seeded, penalised, n > 1, stop-string and logprob requests in one batch (the
    workers keep their own sampled tokens)."""
    prompts = [PROMPT, "Hello there", "one two three four five six seven", "x"]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, seed=5, max_tokens=18, ignore_eos=True, n=2,
                             repetition_penalty=1.3, frequency_penalty=0.5),
              SamplingParams(temperature=0.8, top_k=20, seed=11, max_tokens=25),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, presence_penalty=1.0)]
    full = llm.generate(prompts[:1], params[0], use_tqdm=False)[0].outputs[0]
    params.append(SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[full.text[5:8]]))
    prompts.append(PROMPT)
    got = llm.generate(prompts, params, use_tqdm=False)
    with LLM(model=llama_ckpt, tensor_parallel_size=2, device="cpu", dtype="float32", max_model_len=256,
             num_gpu_blocks=128, **other) as other_llm:
        want = other_llm.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want):
        for a, b in zip(g.outputs, w.outputs):
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
            if b.logprobs is not None:
                for x, y in zip(a.logprobs, b.logprobs):
                    assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)
    assert got[4].outputs[0].finish_reason == "stop"


def test_priority_policy_orders_the_requests(llama_ckpt):
    """One sequence at a time: requests finish in priority order, not arrival order."""
    with LLM(model=llama_ckpt, device="cpu", dtype="float32", max_model_len=256, max_num_seqs=1,
             scheduling_policy="priority") as llm:
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        for rid, priority in (("late-low", 2), ("high", 0), ("mid", 1)):
            llm.engine.add_request(PROMPT, params, request_id=rid, priority=priority)
        done = []
        while llm.engine.has_unfinished_work():
            done += [o.request_id for o in llm.engine.step() if o.finished]
        assert done == ["high", "mid", "late-low"]
        outs = llm.generate([PROMPT, PROMPT], params, use_tqdm=False, priority=[1, 0])
        assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3]


def test_guided_choice_equals_constrained_transformers(llm, llama_ckpt):
    from tests.hf_reference import hf_greedy_choice

    choices = ["positive", "negative", "neutral opinion", "neutral"]
    tok = llm.tokenizer
    choice_ids = [tok.encode(c, add_special_tokens=False) for c in choices]
    stop_ids = list(llm.engine.scheduler.eos_token_ids)
    prompts = ["The review says", "I am fine, thank you.", "What is the weather like?"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, guided_choice=choices, max_tokens=12),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        assert c.text in choices and c.finish_reason == "stop"
        assert c.token_ids == hf_greedy_choice(llama_ckpt, out.prompt_token_ids, choice_ids, stop_ids)
    sampled = llm.generate(prompts * 4, SamplingParams(temperature=1.0, guided_choice=choices, seed=5),
                           use_tqdm=False)
    assert all(o.outputs[0].text in choices for o in sampled)


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_equals_transformers(llm, llama_ckpt, length_penalty):
    """vLLM's beam search (LLM.beam_search) against the same algorithm over transformers'
    float32 logprobs: the same beams, best first, with the same cumulative logprobs."""
    from driver import BeamSearchParams
    from driver.tokenizer import encode_prompt
    from tests.hf_reference import hf_beam_search

    prompts = ["The quick brown fox", [5, 17, 300, 42]]
    params = BeamSearchParams(beam_width=3, max_tokens=5, length_penalty=length_penalty)
    outs = llm.beam_search(prompts, params)
    stop_ids = list(llm.engine.scheduler.eos_token_ids)
    for prompt, out in zip(prompts, outs):
        ids = encode_prompt(llm.tokenizer, prompt) if isinstance(prompt, str) else prompt
        want = hf_beam_search(llama_ckpt, ids, 3, 5, stop_ids, length_penalty)
        assert [b.tokens for b in out.sequences] == [tokens for tokens, _ in want]
        assert [b.cum_logprob for b in out.sequences] == pytest.approx([c for _, c in want], abs=1e-3)
        assert all(b.finish_reason in ("stop", "length") and b.text for b in out.sequences)
        assert len(out.sequences[0].logprobs) == len(out.sequences[0].tokens) - len(ids)
    with pytest.raises(ValueError, match="beam_width must be in"):
        BeamSearchParams(beam_width=11, max_tokens=4)
