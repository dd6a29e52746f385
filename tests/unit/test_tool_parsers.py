"""The tool-call parsers (driver/tool_parsers.py) on model replies, and what the chat
protocol makes of tools, tool_choice and tool turns."""
import json
from unittest.mock import ANY

import pytest

from driver.openai_protocol import APIError, parse_chat
from driver.tool_parsers import (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser,
                                 get_tool_parser)
from tests.checkpoints import TOOLS_CHAT_TEMPLATE, fresh_tokenizer

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}
TIME = {"name": "get_time", "arguments": {"tz": "CET"}}


def _plain(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_content_then_calls():
    text = f"Let me look.\n<tool_call>\n{json.dumps(WEATHER)}\n</tool_call>\n<tool_call>{json.dumps(TIME)}</tool_call>"
    content, calls = HermesToolParser().extract(text)
    assert content == "Let me look."
    assert _plain(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("text", ["no calls here", "<tool_call>{not json}</tool_call>",
                                  '<tool_call>{"arguments": {}}</tool_call>'])
def test_hermes_without_a_valid_call_is_all_content(text):
    assert HermesToolParser().extract(text) == (text, [])


def test_hermes_unclosed_call_at_the_end_still_parses():
    _, calls = HermesToolParser().extract("<tool_call>" + json.dumps(WEATHER))
    assert _plain(calls) == [("get_weather", {"city": "Paris"})]


def test_hermes_tool_start_holds_back_a_partial_marker():
    p = HermesToolParser()
    assert p.tool_start("Sure, ") is None
    assert p.tool_start("Sure, <tool") == len("Sure, ")
    assert p.tool_start("Sure <tool_call>{") == len("Sure ")
    assert p.tool_start("a < b") is None


def test_llama3_json_calls():
    p = Llama3JsonToolParser()
    one = json.dumps({"name": "get_weather", "parameters": {"city": "Paris"}})
    assert p.extract(one)[0] is None and _plain(p.extract(one)[1]) == [("get_weather", {"city": "Paris"})]
    two = "<|python_tag|>" + one + "; " + json.dumps({"name": "get_time", "parameters": {"tz": "CET"}})
    assert _plain(p.extract(two)[1]) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    for text in ("It is sunny.", "{not json", '{"city": "Paris"}'):
        assert p.extract(text) == (text, [])
    assert [p.tool_start(t) for t in ("", "  {", "<|python", "Hello")] == [0, 0, 0, None]


def test_pythonic_calls():
    p = PythonicToolParser()
    text = "[get_weather(city='Paris', days=2, hourly=True), get_time(tz=\"CET\", opts={'a': [1, None]})]"
    assert p.extract(text)[0] is None
    assert _plain(p.extract(text)[1]) == [("get_weather", {"city": "Paris", "days": 2, "hourly": True}),
                                          ("get_time", {"tz": "CET", "opts": {"a": [1, None]}})]
    wrapped = "<|python_start|>[get_time()]<|python_end|>"
    assert _plain(p.extract(wrapped)[1]) == [("get_time", {})]
    for text in ("It is sunny.", "[]", "[get_time(1)]", "[get_time(tz=now())]", "[get_time(**kw)]", "[x.y()]",
                 "[get_time(tz='CET'"):
        assert p.extract(text) == (text, []), text
    assert [p.tool_start(t) for t in ("", " [", "<|python", "Hello")] == [0, 0, 0, None]


def test_mistral_calls_both_formats():
    p = MistralToolParser()
    old = "Checking. [TOOL_CALLS] " + json.dumps([WEATHER, TIME])
    assert p.extract(old)[0] == "Checking."
    assert _plain(p.extract(old)[1]) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    new = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}'
    assert p.extract(new) == (None, ANY) and _plain(p.extract(new)[1]) == _plain(p.extract(old)[1])
    for text in ("no calls", "[TOOL_CALLS] {not json", "[TOOL_CALLS][ARGS]{}", '[TOOL_CALLS][{"arguments": {}}]',
                 "[TOOL_CALLS]get_time"):
        assert p.extract(text) == (text, []), text
    assert p.tool_start("Sure [TOOL") == len("Sure ") and p.tool_start("a [b]") is None


def test_mistral_keeps_special_tokens_in_the_reply(tok):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    assert parse_chat(body, tok, len(tok), 4096, "m", "mistral").params.skip_special_tokens is False
    assert parse_chat(body, tok, len(tok), 4096, "m", "hermes").params.skip_special_tokens is True


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match=r"choose one of \['hermes', 'llama3_json', 'mistral', 'pythonic'\]"):
        get_tool_parser("granite")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tok():
    """The test checkpoints' real tokenizer, with a chat template that renders tools."""
    t = fresh_tokenizer()
    t.chat_template = TOOLS_CHAT_TEMPLATE
    return t


def _chat(tok, **body):
    return parse_chat({"model": "m", **body}, tok, len(tok), 4096, "m", tool_parser="hermes")


def test_tools_and_tool_turns_reach_the_template(tok):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    req = _chat(tok, messages=[{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": None, "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], tools=TOOLS)
    assert req.tool_parser.name == "hermes"
    text = tok.decode(req.prompts[0])
    assert json.dumps(TOOLS[0]) in text  # the tools, listed by the template
    # The call's arguments reach the template as an object (as transformers' templates expect).
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert text.endswith("<|tool|>\nsunny<|end|>\n<|assistant|>\n")
    req = _chat(tok, messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="none")
    assert req.tool_parser is None


def test_forced_tool_choice_sets_the_schema(tok):
    """"required": a list of calls of any tool; a named function: its arguments. Either way the
    whole reply parses into tool_calls."""
    req = _chat(tok, messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="required")
    schema = req.params.guided_json
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "get_weather"}
    [call] = req.tool_parser.extract('[{"name": "get_weather", "parameters": {"city": "Rome"}}]')[1]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    named = _chat(tok, messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.params.guided_json == TOOLS[0]["function"]["parameters"]
    assert named.tool_parser.extract('{"city": "Rome"}') == (None, [{**call, "id": ANY}])
    assert named.tool_parser.extract('{"city": "Ro') == ('{"city": "Ro', [])  # cut short: content


@pytest.mark.parametrize("body, says", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among 'tools'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "a named 'tool_choice' is"),
    ({"tools": TOOLS, "tool_choice": "always"}, "must be 'none', 'auto', 'required'"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "leave out response_format"),
    ({"tool_choice": "auto"}, "'tool_choice' needs 'tools'"),
    ({"tools": [{"type": "function"}]}, "each of 'tools' must be"),
])
def test_bad_tool_requests(tok, body, says):
    with pytest.raises(APIError, match=says):
        _chat(tok, messages=[{"role": "user", "content": "hi"}], **body)


def test_auto_needs_the_server_flags(tok):
    with pytest.raises(APIError, match="--enable-auto-tool-choice and --tool-call-parser"):
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS},
                   tok, len(tok), 4096, "m")
