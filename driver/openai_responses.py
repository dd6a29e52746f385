"""OpenAI's Responses API (POST /v1/responses), served as a chat completion: a request becomes
the chat request it means, and the chat reply (or its stream of chunks) becomes a response
object (or its stream of events), so both share the chat path's template, sampling, stop
strings, reasoning and structured outputs.

Taken: `input` (a string, or message items whose content is a string or input_text /
output_text parts), `instructions` (a leading system message), `max_output_tokens`,
`temperature`, `top_p`, `stream`, `text.format` (text, json_object, json_schema), `metadata`
(echoed), and the sampling extensions the chat API takes. Refused with a 400 that says so:
tools, previous_response_id and background (this server keeps no responses), and input items
of other kinds (images, files, tool calls).
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


def chat_body(body: dict) -> dict:
    """The chat completion request a Responses request means."""
    if unsupported := sorted(k for k in ("tools", "previous_response_id", "background", "conversation")
                             if body.get(k)):
        raise APIError(f"{unsupported} are not supported by this server's Responses API (it keeps no "
                       f"responses and runs no tools); use /v1/chat/completions for tools", param=unsupported[0])
    if unknown := sorted(set(body) - _PASSED - _IGNORED - {"input", "instructions", "max_output_tokens",
                                                           "stream", "text", "metadata", "tool_choice"}):
        raise APIError(f"unknown Responses API fields {unknown}", param=unknown[0])
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    messages += _messages(body.get("input"))
    chat = {k: v for k, v in body.items() if k in _PASSED}
    chat["messages"] = messages
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


def _messages(items) -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise APIError("'input' must be a string or a non-empty list of messages", param="input")
    out = []
    for item in items:
        if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
            raise APIError("'input' items must be messages ({'role', 'content'}); other kinds of item (tool "
                           "calls, images, files) are not supported", param="input")
        content = item.get("content")
        if isinstance(content, list):
            if any(p.get("type") not in ("input_text", "output_text") for p in content):
                raise APIError("message content parts must be input_text or output_text", param="input")
            content = "".join(p.get("text", "") for p in content)
        out.append({"role": item["role"], "content": content})
    return out


class ResponseBuilder:
    """One response's object and events, from the chat reply (or its chunks)."""

    def __init__(self, body: dict):
        self.body, self.id, self.created = body, f"resp_{uuid.uuid4().hex}", int(time.time())
        self.message_id, self.reasoning_id = f"msg_{uuid.uuid4().hex}", f"rs_{uuid.uuid4().hex}"
        self.sequence = 0

    def response(self, message: dict | None, finish_reason: str | None, usage: dict | None) -> dict:
        """The response object; message None: in progress."""
        done = message is not None
        status = "in_progress" if not done else "incomplete" if finish_reason == "length" else "completed"
        # The message is output 0 (as the stream's events say); reasoning, if any, follows it.
        output = [self.message(message.get("content") or "", "completed")] if done else []
        if done and message.get("reasoning_content"):
            output.append({"type": "reasoning", "id": self.reasoning_id, "summary": [],
                           "content": [{"type": "reasoning_text", "text": message["reasoning_content"]}]})
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "model": b.get("model"),
                "status": status, "output": output, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
                "metadata": b.get("metadata") or {}, "parallel_tool_calls": False, "tool_choice": "none",
                "tools": [], "temperature": b.get("temperature"), "top_p": b.get("top_p"), "store": False,
                "text": b.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
                "usage": _usage(usage) if usage else None}

    def message(self, text: str, status: str) -> dict:
        parts = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": parts}

    def event(self, kind: str, **fields) -> str:
        self.sequence += 1
        data = {"type": kind, "sequence_number": self.sequence - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """The chat stream's SSE chunks as the Responses API's events."""
        yield self.event("response.created", response=self.response(None, None, None))
        yield self.event("response.in_progress", response=self.response(None, None, None))
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        yield self.event("response.output_item.added", output_index=0, item=self.message("", "in_progress"))
        yield self.event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                         part={"type": "output_text", "text": "", "annotations": []})
        text, reasoning, reason, usage = [], [], None, None
        async with contextlib.aclosing(chunks):  # (leaving early closes the chat stream: its request aborts)
            async for sse in chunks:
                if not sse.startswith("data: {"):
                    continue  # ([DONE])
                chunk = json.loads(sse[len("data: "):])
                if "error" in chunk:
                    yield self.event("error", code=chunk["error"].get("code"), message=chunk["error"]["message"],
                                     param=chunk["error"].get("param"))
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    reasoning.append(delta.get("reasoning_content") or "")
                    if delta.get("content"):
                        text.append(delta["content"])
                        yield self.event("response.output_text.delta", delta=delta["content"], logprobs=[], **where)
                    reason = choice.get("finish_reason") or reason
        whole = "".join(text)
        part = {"type": "output_text", "text": whole, "annotations": []}
        yield self.event("response.output_text.done", text=whole, logprobs=[], **where)
        yield self.event("response.content_part.done", item_id=self.message_id, output_index=0, content_index=0,
                         part=part)
        yield self.event("response.output_item.done", output_index=0, item=self.message(whole, "completed"))
        final = self.response({"content": whole, "reasoning_content": "".join(reasoning)}, reason, usage)
        yield self.event("response.completed" if final["status"] == "completed" else "response.incomplete",
                         response=final)


def _usage(chat_usage: dict) -> dict:
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


__all__ = ["ResponseBuilder", "chat_body"]
