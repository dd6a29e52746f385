"""Mistral's tool calls through the OpenAI API (--tool-call-parser mistral): its `[TOOL_CALLS]`
marker is a special token, which replies drop by default, so a request under this parser
keeps special tokens in the text; the call comes back as tool_calls, whole and streamed. The
server runs with --chat-template, a file in place of the tokenizer's template."""
import json

import httpx
import openai
import pytest
from ray import serve

from benchmarks.common import free_port
from driver import serve as raytp_serve
from driver.config import EngineConfig, ServeConfig
from tests.checkpoints import TOOLS_CHAT_TEMPLATE, make_scripted_checkpoint

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ckpt = make_scripted_checkpoint(str(tmp_path_factory.mktemp("mistral")), ["[TOOL_CALLS]", json.dumps([CALL])],
                                    special=("[TOOL_CALLS]",))
    port = free_port()
    engine_cfg = EngineConfig.create(ckpt, device="cpu", dtype="float32", max_model_len=512)
    # (--chat-template: a file in place of the tokenizer's template; same generation prompt)
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text("{{ 'Tools below. ' }}" + TOOLS_CHAT_TEMPLATE)
    serve_cfg = ServeConfig(host="127.0.0.1", port=port, served_model_name="m", replica_num_cpus=0,
                            enable_auto_tool_choice=True, tool_call_parser="mistral", chat_template=str(template))
    raytp_serve.run(engine_cfg, serve_cfg, blocking=False)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    serve.shutdown()


def test_the_chat_template_given_replaces_the_tokenizers(client):
    url = str(client.base_url).removesuffix("/v1/")
    ids = httpx.post(url + "/tokenize", json={"model": "m", "messages": ASK}).json()["tokens"]
    assert httpx.post(url + "/detokenize", json={"model": "m", "tokens": ids}).json()["prompt"].startswith("Tools below.")


def test_mistral_tool_calls_whole_and_streamed(client):
    out = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0)
    [call] = out.choices[0].message.tool_calls or pytest.fail(repr(out.choices[0].message.content))
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL["arguments"]
    chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [("get_weather", CALL["arguments"])]
    # Without tools the reply is text, special tokens dropped as usual.
    plain = client.chat.completions.create(model="m", messages=ASK, temperature=0)
    assert plain.choices[0].message.content == json.dumps([CALL])
