"""OpenAI request parsing (driver.openai_protocol) and the stream merge, on the CPU with the
demo checkpoint's real tokenizer: defaults, limits, and an APIError naming the field for
every bad value. (The HTTP app itself: tests/integration/test_openai_server.py.)"""
from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from driver.demo import ensure_demo_checkpoint
from driver.openai_protocol import APIError, check_length, parse_chat, parse_completion
from driver.openai_serving import merge
from driver.tokenizer import apply_chat_template, encode_prompt, load_tokenizer

VOCAB, LIMIT, NAME = 512, 64, "m"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path, _ = ensure_demo_checkpoint(str(tmp_path_factory.mktemp("cache")))
    return load_tokenizer(path)


def completion(tok, **body):
    return parse_completion({"model": NAME, **body}, tok, VOCAB, LIMIT, NAME)


def chat(tok, **body):
    return parse_chat({"model": NAME, **body}, tok, VOCAB, LIMIT, NAME)


def error(fn, *args, **body) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args, **body)
    return e.value


def test_completion_defaults_are_openais(tok):
    req = completion(tok, prompt="Hello")
    assert req.prompts == [encode_prompt(tok, "Hello")] and req.prompt_texts == ["Hello"]
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.logprobs) == (16, 1.0, 1.0, 1, None)
    assert not req.stream and not req.echo


def test_prompt_forms_and_sampling_fields(tok):
    req = completion(tok, prompt=[[5, 6], [7]], n=2, temperature=0, stop="x", seed=3, logprobs=2, top_k=5,
                     max_tokens=4, stream=True, stream_options={"include_usage": True})
    assert req.prompts == [[5, 6], [7]] and req.prompt_texts == [None, None]
    p = req.params
    assert (p.n, p.greedy, p.stop, p.seed, p.logprobs, p.top_k) == (2, True, ("x",), 3, 2, 5)
    assert req.stream and req.include_usage
    assert completion(tok, prompt=["a", "b"]).prompt_texts == ["a", "b"]


def test_truncation_stop_strings_and_usage_options(tok):
    req = completion(tok, prompt=[[5, 6, 7, 8], [9]], truncate_prompt_tokens=2, echo=True)
    assert req.prompts == [[7, 8], [9]] and req.prompt_texts == [None, None]  # echo decodes what is kept
    assert completion(tok, prompt="hi", include_stop_str_in_output=True, stop="x").params.include_stop_str_in_output
    streamed = completion(tok, prompt="hi", stream=True, stream_options={"continuous_usage_stats": True})
    assert streamed.continuous_usage and not completion(tok, prompt="hi").continuous_usage
    e = error(completion, tok, prompt="hi", truncate_prompt_tokens=0)
    assert e.param == "truncate_prompt_tokens" and "must be >= 1" in e.message


def test_scoring_and_steering_fields(tok):
    p = completion(tok, prompt="hi", logit_bias={"5": -100, "6": 3}, allowed_token_ids=[5, 6, 7]).params
    assert p.logit_bias == {5: -100.0, 6: 3.0} and p.allowed_token_ids == (5, 6, 7)
    assert completion(tok, prompt="hi", bad_words=["cat", "dog food"]).params.bad_words == ("cat", "dog food")
    assert completion(tok, prompt="hi", echo=True, logprobs=2).params.prompt_logprobs == 2  # echo scores the prompt
    assert completion(tok, prompt="hi", logprobs=2).params.prompt_logprobs is None
    req = completion(tok, prompt="hi", echo=True, logprobs=1, prompt_logprobs=4)
    assert req.params.prompt_logprobs == 4 and req.prompt_logprobs == 4


@pytest.mark.parametrize("body, param, says", [
    ({"prompt": "hi", "max_tokens": True}, "max_tokens", "must be int"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature", "must be int or float"),
    ({"prompt": "hi", "top_p": 0}, "top_p", "'top_p' must be in (0, 1]"),
    ({"prompt": "hi", "n": 2, "best_of": 3}, "best_of", "must equal 'n'"),
    ({"prompt": "hi", "min_tokens": 9, "max_tokens": 2}, "min_tokens", "'min_tokens' (9) must be <="),
    ({"prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
    ({"prompt": "hi", "logit_bias": {"5": "a lot"}}, "logit_bias", "must map token ids to numbers"),
    ({"prompt": "hi", "logit_bias": {"600": 1}}, "logit_bias", "past the vocabulary; they must be in [0, 512)"),
    ({"prompt": "hi", "allowed_token_ids": []}, "allowed_token_ids", "non-empty list"),
    ({"prompt": "hi", "bad_words": "cat"}, "bad_words", "must be list"),
    ({"prompt": "hi", "bad_words": [" "]}, "bad_words", "non-empty strings"),
    ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not available with 'stream'"),
    ({"prompt": "hi", "response_format": {"type": "yaml"}}, "response_format", "'text', 'json_object' or"),
    ({"prompt": "hi", "response_format": {"type": "json_schema"}}, "response_format", "needs {'json_schema'"),
    ({"prompt": "hi", "guided_regex": 5}, "guided_regex", "must be str"),
    ({"prompt": "hi", "guided_json": {}, "response_format": {"type": "json_object"}}, "response_format", "not both"),
    ({"prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}, None, "at most one of"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "'prompt' must be"),
    ({"prompt": [[1, -2]]}, "prompt", "in [0, 512)"),
    ({"prompt": [3] * 60}, "max_tokens", "maximum context length is 64 tokens. However, you requested 76"),
])
def test_bad_completion_fields_name_themselves(tok, body, param, says):
    e = error(completion, tok, **body)
    assert e.status == 400 and e.param == param and says in e.message
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param,
                                  "code": e.code}}


def test_structured_output_fields(tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert completion(tok, prompt="hi", response_format=spec).params.guided_json == schema
    assert completion(tok, prompt="hi", response_format={"type": "json_object"}).params.guided_json == \
        {"type": "object"}
    assert completion(tok, prompt="hi", structured_outputs={"json": {}}).params.guided_json == {}
    assert completion(tok, prompt="hi", structured_outputs={"regex": "a+"}).params.guided_regex == "a+"
    grammar = 'root ::= "a"+'
    assert completion(tok, prompt="hi", structured_outputs={"grammar": grammar}).params.guided_grammar == grammar
    assert completion(tok, prompt="hi", guided_grammar=grammar).params.guided_grammar == grammar
    assert completion(tok, prompt="hi", guided_json='{"type": "string"}').params.guided_json == '{"type": "string"}'
    assert completion(tok, prompt="hi", response_format={"type": "text"}).params.guided_json is None


def test_model_is_required_and_must_be_the_served_one(tok):
    assert error(parse_completion, {"prompt": "x"}, tok, VOCAB, LIMIT, NAME).param == "model"
    e = error(parse_completion, {"model": "other", "prompt": "x"}, tok, VOCAB, LIMIT, NAME)
    assert (e.status, e.code) == (404, "model_not_found")


def test_context_limit():
    check_length(63, None, 64, "max_tokens")  # no max_tokens: whatever room is left
    check_length(60, 4, 64, "max_tokens")
    for n, m in ((64, None), (60, 5)):
        with pytest.raises(APIError, match="maximum context length is 64"):
            check_length(n, m, 64, "max_tokens")


def test_chat_renders_the_template_and_checks_messages(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]}]
    req = chat(tok, messages=msgs, logprobs=True, top_logprobs=3)
    assert req.prompts == [apply_chat_template(tok, [{"role": "user", "content": "Hi you"}])]
    assert req.params.max_tokens is None and req.logprobs and req.params.logprobs == 3
    assert chat(tok, messages=msgs, logprobs=True).params.logprobs == 0
    assert error(chat, tok, messages=msgs, top_logprobs=2).param == "top_logprobs"
    assert error(chat, tok, messages=[]).param == "messages"
    assert "needs a 'role'" in error(chat, tok, messages=[{"role": "robot", "content": "x"}]).message
    e = error(chat, tok, messages=msgs, max_completion_tokens=60)
    assert e.param == "max_completion_tokens" and "maximum context length" in e.message
    assert error(chat, tok, messages=msgs, tools=[{"type": "function"}]).param == "tools"


def test_merge_interleaves_and_closes_every_stream_on_early_exit():
    closed = []

    async def numbers(tag, n, pause):
        try:
            for i in range(n):
                await asyncio.sleep(pause)
                yield f"{tag}{i}"
        finally:
            closed.append(tag)

    async def main():
        got = [item async for _, item in merge([numbers("a", 3, 0.001), numbers("b", 2, 0.0015)])]
        assert sorted(got) == ["a0", "a1", "a2", "b0", "b1"] and sorted(closed) == ["a", "b"]
        closed.clear()
        async with aclosing(merge([numbers("a", 100, 0.001), numbers("b", 100, 0.001)])) as items:
            async for _ in items:
                break  # a client that goes away
        assert sorted(closed) == ["a", "b"]
        closed.clear()

        await cancel_midway(lambda: [numbers("a", 100, 0.01), numbers("b", 100, 0.01)])
        assert sorted(closed) == ["a", "b"]

        # One stream (its own path): the same guarantees.
        closed.clear()
        assert [x async for x in merge([numbers("a", 3, 0)])] == [(0, "a0"), (0, "a1"), (0, "a2")]
        async with aclosing(merge([numbers("b", 100, 0.001)])) as items:
            async for _ in items:
                break
        assert closed == ["a", "b"]
        closed.clear()
        await cancel_midway(lambda: [numbers("c", 100, 0.01)])
        assert closed == ["c"]

    async def cancel_midway(make_gens):
        """A request handler whose task is cancelled mid-stream (an HTTP disconnect)."""
        async def consume():
            async with aclosing(merge(make_gens())) as items:
                async for _ in items:
                    pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.035)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
