"""OpenAI's Responses API (POST /v1/responses), served as a chat completion: a request becomes
the chat request it means, and the chat reply (or its stream of chunks) becomes a response
object (or its stream of events), so both share the chat path's template, sampling, stop
strings, reasoning, tool parsing and structured outputs.

Taken: `input` (a string, or items: messages whose content is a string or input_text /
output_text parts, function_call and function_call_output), `instructions` (a leading system
message), function `tools` and `tool_choice` (the server's --tool-call-parser reads the calls,
as for chat), `max_output_tokens`, `temperature`, `top_p`, `stream`, `text.format` (text,
json_object, json_schema), `metadata` (echoed), and the sampling extensions the chat API
takes. Refused with a 400 that says so: previous_response_id and background (this server keeps
no responses), tools of other kinds, and other input items (images, files).
"""
from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from driver.openai_protocol import APIError

_PASSED = {"model", "temperature", "top_p", "top_k", "min_p", "seed", "user", "stop", "repetition_penalty",
           "presence_penalty", "frequency_penalty", "logit_bias", "bad_words", "min_tokens", "ignore_eos",
           "priority", "structured_outputs", "guided_regex", "guided_json", "guided_choice", "guided_grammar"}
_IGNORED = {"store", "truncation", "parallel_tool_calls", "service_tier", "include", "reasoning", "prompt_cache_key"}
_OWN = {"input", "instructions", "max_output_tokens", "stream", "text", "metadata", "tools", "tool_choice"}


def chat_body(body: dict) -> dict:
    """The chat completion request a Responses request means."""
    if unsupported := sorted(k for k in ("previous_response_id", "background", "conversation") if body.get(k)):
        raise APIError(f"{unsupported} are not supported: this server keeps no responses; send the whole "
                       f"conversation as 'input'", param=unsupported[0])
    if unknown := sorted(set(body) - _PASSED - _IGNORED - _OWN):
        raise APIError(f"unknown Responses API fields {unknown}", param=unknown[0])
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    messages += _messages(body.get("input"))
    chat = {k: v for k, v in body.items() if k in _PASSED}
    chat["messages"] = messages
    if body.get("tools"):
        chat["tools"] = [_tool(t) for t in body["tools"]]
    if body.get("tool_choice") is not None:
        choice = body["tool_choice"]
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}} \
            if isinstance(choice, dict) else choice
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("stream"):
        chat["stream"], chat["stream_options"] = True, {"include_usage": True}
    fmt = (body.get("text") or {}).get("format")
    if fmt and fmt.get("type") == "json_schema":  # (name and schema sit in the format itself)
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "schema"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
    elif fmt:
        chat["response_format"] = {"type": fmt.get("type")}
    return chat


def _tool(tool) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not tool.get("name"):
        raise APIError("only function tools ({'type': 'function', 'name', 'parameters'}) are supported",
                       param="tools")
    spec = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": spec}


def _messages(items) -> list[dict]:
    """Input items as chat messages: a run of function_call items is one assistant turn with
    those tool_calls; a function_call_output is a tool turn."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise APIError("'input' must be a string or a non-empty list of items", param="input")
    out: list[dict] = []
    for item in items:
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if out and out[-1].get("tool_calls") and out[-1]["role"] == "assistant":
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output", "")})
        elif kind == "message" and "role" in item:
            out.append({"role": item["role"], "content": _text(item.get("content"))})
        else:
            raise APIError("'input' items must be messages, function_call or function_call_output; other "
                           "kinds (images, files) are not supported", param="input")
    return out


def _text(content) -> str | None:
    if not isinstance(content, list):
        return content
    if any(not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text") for p in content):
        raise APIError("message content parts must be input_text or output_text", param="input")
    return "".join(p.get("text", "") for p in content)


class ResponseBuilder:
    """One response's object and events, from the chat reply (or its chunks). Output items, in
    the order the model writes them: the reasoning (if any), the message (where there is
    text), then the function calls."""

    def __init__(self, body: dict):
        self.body, self.id, self.created = body, f"resp_{uuid.uuid4().hex}", int(time.time())
        self.message_id, self.reasoning_id = f"msg_{uuid.uuid4().hex}", f"rs_{uuid.uuid4().hex}"
        self.sequence = 0

    def response(self, message: dict | None, finish_reason: str | None, usage: dict | None) -> dict:
        """The response object for a chat reply's message; None: in progress."""
        done = message is not None
        status = "in_progress" if not done else "incomplete" if finish_reason == "length" else "completed"
        output = []
        if done and message.get("reasoning_content"):
            output.append(self.reasoning(message["reasoning_content"], "completed"))
        if done and message.get("content"):
            output.append(self.message(message["content"], "completed"))
        if done:
            output += [self.function_call(c) for c in message.get("tool_calls") or []]
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "model": b.get("model"),
                "status": status, "output": output, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
                "metadata": b.get("metadata") or {}, "parallel_tool_calls": True,
                "tool_choice": b.get("tool_choice") or "auto", "tools": b.get("tools") or [],
                "temperature": b.get("temperature"), "top_p": b.get("top_p"), "store": False,
                "text": b.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
                "usage": _usage(usage) if usage else None}

    def message(self, text: str, status: str) -> dict:
        parts = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": parts}

    def reasoning(self, text: str, status: str) -> dict:
        parts = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
        return {"type": "reasoning", "id": self.reasoning_id, "status": status, "summary": [], "content": parts}

    @staticmethod
    def function_call(call: dict) -> dict:
        return {"type": "function_call", "id": f"fc_{call['id'].rsplit('-', 1)[-1]}", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}

    def event(self, kind: str, **fields) -> str:
        self.sequence += 1
        data = {"type": kind, "sequence_number": self.sequence - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """The chat stream's SSE chunks as the Responses API's events."""
        yield self.event("response.created", response=self.response(None, None, None))
        yield self.event("response.in_progress", response=self.response(None, None, None))
        stream = _EventState(self)
        async with contextlib.aclosing(chunks):  # (leaving early closes the chat stream: its request aborts)
            async for sse in chunks:
                if not sse.startswith("data: {"):
                    continue  # ([DONE])
                chunk = json.loads(sse[len("data: "):])
                if "error" in chunk:
                    err = chunk["error"]
                    yield self.event("error", code=err.get("code"), message=err["message"], param=err.get("param"))
                    return
                for event in stream.take(chunk):
                    yield event
        for event in stream.close():
            yield event
        final = self.response(stream.reply(), stream.finish_reason, stream.usage)
        yield self.event("response.completed" if final["status"] == "completed" else "response.incomplete",
                         response=final)


# Per streamed text item: (the chat delta's field, its part type, its delta and done events).
_TEXT_ITEMS = {"reasoning": ("reasoning_content", "reasoning_text", "response.reasoning_text"),
               "message": ("content", "output_text", "response.output_text")}


class _EventState:
    """What a stream has said so far; each chat chunk becomes the events it means. A text item
    (reasoning, message) opens at its first text and closes when another item begins."""

    def __init__(self, builder: ResponseBuilder):
        self.b, self.calls = builder, []
        self.texts: dict[str, list[str]] = {kind: [] for kind in _TEXT_ITEMS}
        self.indexes: dict[str, int] = {}  # output index of each item opened so far
        self.open: str | None = None  # the text item being written
        self.finish_reason, self.usage = None, None

    def take(self, chunk: dict) -> list[str]:
        events = []
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {})
            for kind, (field, _, _) in _TEXT_ITEMS.items():
                if delta.get(field):
                    events += self._text(kind, delta[field])
            for call in delta.get("tool_calls") or []:
                events += self.close() + self._call(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return events

    def _text(self, kind: str, text: str) -> list[str]:
        b, (_, part, prefix) = self.b, _TEXT_ITEMS[kind]
        item = b.reasoning if kind == "reasoning" else b.message
        events = []
        if self.open != kind:
            events += self.close()
            self.open, self.indexes[kind] = kind, len(self.indexes) + len(self.calls)
            events.append(b.event("response.output_item.added", output_index=self.indexes[kind],
                                  item=item("", "in_progress")))
            if kind == "message":
                events.append(b.event("response.content_part.added", item_id=b.message_id, content_index=0,
                                      output_index=self.indexes[kind],
                                      part={"type": part, "text": "", "annotations": []}))
        self.texts[kind].append(text)
        item_id = b.reasoning_id if kind == "reasoning" else b.message_id
        return events + [b.event(f"{prefix}.delta", item_id=item_id, output_index=self.indexes[kind],
                                 content_index=0, delta=text, **({"logprobs": []} if kind == "message" else {}))]

    def _call(self, call: dict) -> list[str]:
        item, b = ResponseBuilder.function_call(call), self.b
        index = len(self.indexes) + len(self.calls)
        self.calls.append(call)
        return [b.event("response.output_item.added", output_index=index, item={**item, "arguments": "",
                                                                                 "status": "in_progress"}),
                b.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=item["arguments"]),
                b.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=item["arguments"]),
                b.event("response.output_item.done", output_index=index, item=item)]

    def close(self) -> list[str]:
        """The open text item's done events."""
        kind, self.open = self.open, None
        if kind is None:
            return []
        b, (_, part, prefix) = self.b, _TEXT_ITEMS[kind]
        whole, index = "".join(self.texts[kind]), self.indexes[kind]
        item_id, item = (b.reasoning_id, b.reasoning) if kind == "reasoning" else (b.message_id, b.message)
        events = [b.event(f"{prefix}.done", item_id=item_id, output_index=index, content_index=0, text=whole,
                          **({"logprobs": []} if kind == "message" else {}))]
        if kind == "message":
            events.append(b.event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                                  part={"type": part, "text": whole, "annotations": []}))
        return events + [b.event("response.output_item.done", output_index=index, item=item(whole, "completed"))]

    def reply(self) -> dict:
        return {"reasoning_content": "".join(self.texts["reasoning"]), "content": "".join(self.texts["message"]),
                "tool_calls": self.calls}


def _usage(chat_usage: dict) -> dict:
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


__all__ = ["ResponseBuilder", "chat_body"]
