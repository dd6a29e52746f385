"""OpenAI's Responses API (/v1/responses) through the official `openai` client: a response is
the chat completion its input means (same text, token for token), whole or streamed as the
API's events; json_schema formats and max_output_tokens work; what the server cannot do is
refused with a 400 that says so. (Function tools: tests/integration/test_openai_tools.py.)"""
import json

import openai
import pytest

from tests.integration.conftest import MODEL


def test_a_response_is_the_chat_reply(client):
    kw = dict(model=MODEL, temperature=0, max_output_tokens=12)
    out = client.responses.create(input="Tell me a story", instructions="Be brief.", metadata={"k": "v"}, **kw)
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}])
    assert out.object == "response" and out.id.startswith("resp_") and out.metadata == {"k": "v"}
    assert out.output_text == chat.choices[0].message.content
    assert (out.usage.input_tokens, out.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert out.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    # Message items, with content parts, say the same as a string.
    items = client.responses.create(input=[{"role": "system", "content": [{"type": "input_text", "text": "Be brief."}]},
                                           {"role": "user", "content": "Tell me a story"}], **kw)
    assert items.output_text == out.output_text


def test_streamed_events_add_up_to_the_response(client):
    kw = dict(model=MODEL, input="Hello there", temperature=0, max_output_tokens=10)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_json_schema_format(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = client.responses.create(model=MODEL, input="Answer", max_output_tokens=40, temperature=0,
                                  text={"format": {"type": "json_schema", "name": "a", "schema": schema}})
    assert out.status == "completed" and isinstance(json.loads(out.output_text)["ok"], bool)


@pytest.mark.parametrize("extra, says", [
    ({"tools": [{"type": "web_search"}]}, "only function tools"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "--enable-auto-tool-choice"),
    ({"previous_response_id": "resp_x"}, "keeps no responses"),
    ({"input": [{"type": "input_image", "image_url": "http://x"}]}, "items must be messages, function_call"),
    ({"extra_body": {"bogus": 1}}, "unknown Responses API fields ['bogus']"),
])
def test_what_it_cannot_do_is_refused(client, extra, says):
    with pytest.raises(openai.BadRequestError, match=says.replace("[", r"\[").replace("]", r"\]")):
        client.responses.create(**{"model": MODEL, "input": "hi", **extra})
