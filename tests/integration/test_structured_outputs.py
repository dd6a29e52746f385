"""Structured outputs end to end (TP=2 through Ray workers; rank 0 masks the logits): greedy
completions under guided_regex / guided_json / guided_grammar equal greedy decoding over transformers' logits
constrained by the `regex` module's partial matching, token for token, and end where the
pattern does; sampled ones are valid JSON of the schema."""
import json

import pytest
import regex

from driver import LLM, SamplingParams
from driver.guided.grammar import grammar_to_regex
from driver.guided.json_schema import schema_to_regex
from tests.hf_reference import hf_greedy_regex

# ASCII-only strings, so that each token's text is whole characters for the reference.
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "pattern": "[a-z ]{1,10}"}, "age": {"type": "integer"},
                         "mood": {"enum": ["happy", "sad"]}},
          "required": ["name", "age"]}
PROMPTS = ["Tell me about the fox", "Who is there?", "JSON please"]


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    with LLM(model=llama_ckpt, tensor_parallel_size=2, device="cpu", dtype="float32",
             max_model_len=256, num_gpu_blocks=128) as engine:
        yield engine


def _texts(llm) -> list[str | None]:
    tok, special = llm.tokenizer, set(llm.tokenizer.all_special_ids)
    texts = [None if t in special else tok.convert_tokens_to_string([tok.convert_ids_to_tokens(t)])
             for t in range(len(tok))]
    return [s if s is not None and s.isascii() else None for s in texts]


# A grammar that nests: what a regular expression cannot say.
# (Greedy, the test model nests one of the prompts' lists five levels deep.)
GRAMMAR = """
root ::= "{" list "}"
list ::= item (";" item)*
item ::= "ab" | "{" list "}"   # a leaf, or a nested list
"""


@pytest.mark.parametrize("kind", ["regex", "json", "grammar"])
def test_greedy_equals_constrained_transformers(llm, llama_ckpt, kind):
    pattern = {"regex": r"(yes|no|maybe), [0-9]{1,3} (cats?|dogs?)", "json": schema_to_regex(SCHEMA),
               "grammar": grammar_to_regex(GRAMMAR)}[kind]
    field = {"regex": {"guided_regex": pattern}, "json": {"guided_json": SCHEMA},
             "grammar": {"guided_grammar": GRAMMAR}}[kind]
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40, **field), use_tqdm=False)
    stop_ids, texts = list(llm.engine.scheduler.eos_token_ids), _texts(llm)
    for out in outs:
        c = out.outputs[0]
        assert c.token_ids == hf_greedy_regex(llama_ckpt, out.prompt_token_ids, pattern, texts, stop_ids, 40)
        if c.finish_reason == "stop":
            assert regex.fullmatch(pattern, c.text)
    assert any(o.outputs[0].finish_reason == "stop" for o in outs)


def test_sampled_json_follows_the_schema(llm):
    outs = llm.generate(PROMPTS * 3, SamplingParams(temperature=1.0, seed=3, max_tokens=80, guided_json=SCHEMA),
                        use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        if c.finish_reason == "stop":
            value = json.loads(c.text)
            assert set(value) <= {"name", "age", "mood"} and isinstance(value["age"], int)
            assert value.get("mood", "happy") in ("happy", "sad")
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= 5


def test_bad_patterns_fail_the_request_only(llm):
    with pytest.raises(ValueError, match="lookaround"):
        llm.generate(["x"], SamplingParams(guided_regex="(?=a)b"), use_tqdm=False)
    with pytest.raises(ValueError, match="not supported"):
        llm.generate(["x"], SamplingParams(guided_json={"type": "object", "patternProperties": {}}), use_tqdm=False)
    with pytest.raises(ValueError, match="at most one of"):
        SamplingParams(guided_regex="a", guided_choice=["a"])
    assert llm.generate(["x"], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
