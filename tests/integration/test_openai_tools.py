"""Tool calling through the OpenAI API (vLLM's --enable-auto-tool-choice --tool-call-parser
hermes), end to end: a scripted checkpoint whose greedy reply to any chat is a Hermes-style
tool call, served by Ray Serve, read with the official `openai` client, whole and streamed;
and tool_choice "required" / named functions, forced by structured outputs."""
import json

import httpx
import openai
import pytest
from ray import serve

from benchmarks.common import free_port
from driver import serve as raytp_serve
from driver.config import EngineConfig, ServeConfig
from tests.checkpoints import make_scripted_checkpoint

MODEL = "tool-llama"
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    ckpt = make_scripted_checkpoint(str(tmp_path_factory.mktemp("tools")),
                                    ["<tool_call>", json.dumps(CALL), "</tool_call>"])
    port = free_port()
    engine_cfg = EngineConfig.create(ckpt, device="cpu", dtype="float32", max_model_len=512)
    serve_cfg = ServeConfig(host="127.0.0.1", port=port, served_model_name=MODEL, replica_num_cpus=0,
                            enable_auto_tool_choice=True, tool_call_parser="hermes")
    raytp_serve.run(engine_cfg, serve_cfg, blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_tool_call_comes_back_as_tool_calls(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL["arguments"]

    # The next turn carries the call and its result back through the chat template.
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    again = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0)
    assert again.usage.prompt_tokens > out.usage.prompt_tokens
    assert again.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_streamed_tool_calls_equal_the_whole_response(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0,
                                                 stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""  # nothing of the call as text
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
        [(0, "get_weather", CALL["arguments"])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_responses_api_function_calls(client):
    """The Responses API's function tools: the call comes back as a function_call item (whole
    and streamed), and the next turn carries it and its output back as input items."""
    tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
              "parameters": t["function"]["parameters"]} for t in TOOLS]
    out = client.responses.create(model=MODEL, input=ASK[0]["content"], tools=tools, temperature=0)
    [call] = out.output
    assert call.type == "function_call" and call.name == "get_weather" and out.status == "completed"
    assert json.loads(call.arguments) == CALL["arguments"] and call.call_id.startswith("chatcmpl-tool-")
    events = list(client.responses.create(model=MODEL, input=ASK[0]["content"], tools=tools, temperature=0,
                                          stream=True))
    assert [e.type for e in events][2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                                             "response.function_call_arguments.done", "response.output_item.done"]
    assert json.loads(events[-1].response.output[0].arguments) == CALL["arguments"]
    again = client.responses.create(model=MODEL, tools=tools, temperature=0, input=[
        {"role": "user", "content": ASK[0]["content"]},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 C"}])
    assert again.usage.input_tokens > out.usage.input_tokens and again.output[0].type == "function_call"


def test_without_tools_the_reply_is_text(client, url):
    out = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0)
    assert out.choices[0].message.content == "<tool_call>" + json.dumps(CALL) + "</tool_call>"
    assert not out.choices[0].message.tool_calls and out.choices[0].finish_reason == "stop"
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.content.startswith("<tool_call>")
    with_tools = httpx.post(url + "/tokenize", json={"model": MODEL, "messages": ASK, "tools": TOOLS}).json()
    plain = httpx.post(url + "/tokenize", json={"model": MODEL, "messages": ASK}).json()
    assert with_tools["count"] > plain["count"] + 20  # the template lists the tools


def test_forced_tool_choice_makes_the_reply_the_calls(client):
    """tool_choice "required" / a named function: structured outputs force the calls' JSON (no
    tool parser involved), whatever the model prefers; they come back as tool_calls."""
    # (enums, not free strings: this model's random words would run to max_tokens)
    units = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]}
    cities = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": name, "parameters": params}}
             for name, params in (("get_weather", cities), ("get_time", units))]
    kw = dict(model=MODEL, messages=ASK, tools=tools, temperature=1.0, seed=2, n=4, max_tokens=200)
    named = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "get_time"}}, **kw)
    required = client.chat.completions.create(tool_choice="required", **kw)
    finished = [c for out in (named, required) for c in out.choices if c.finish_reason == "tool_calls"]
    assert sum(c in named.choices for c in finished) >= 2 and sum(c in required.choices for c in finished) >= 2
    for c in finished:
        assert c.message.content is None and c.message.tool_calls
        for call in c.message.tool_calls:
            args = json.loads(call.function.arguments)
            assert call.function.name == "get_time" if c in named.choices else call.function.name in ("get_weather",
                                                                                                    "get_time")
            assert args in ({"unit": "c"}, {"unit": "f"}) if call.function.name == "get_time" else \
                args["city"] in ("Paris", "Rome")
    chunks = list(client.chat.completions.create(stream=True, **{**kw, "n": 1}, tool_choice={
        "type": "function", "function": {"name": "get_time"}}))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_time"] and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_bad_tool_choice_is_refused_with_the_reason(client):
    with pytest.raises(openai.BadRequestError, match="not among 'tools'"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="leave out response_format"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="'tool_choice' needs 'tools'"):
        client.chat.completions.create(model=MODEL, messages=ASK, tool_choice="auto")
