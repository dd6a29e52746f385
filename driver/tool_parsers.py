"""Tool calls in generated text -> OpenAI's `tool_calls` (vLLM's `--tool-call-parser`).

A parser knows one model family's format:

- `hermes` (Hermes, Qwen2/2.5/3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  any number of them, after optional content;
- `llama3_json` (Llama 3.1/3.2): the whole reply is `{"name": ..., "parameters": {...}}`
  (several joined by `;`), optionally after `<|python_tag|>`;
- `pythonic` (Llama 3.2 and 4, ToolACE): the whole reply is a Python list of calls with
  literal keyword arguments, `[get_weather(city="Paris"), get_time()]`, optionally inside
  `<|python_start|>` ... `<|python_end|>`;
- `mistral` (Mistral, Mixtral): `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}`,
  or (newer tokenizers) `name[ARGS]{...}` per call, after optional content. Those markers are
  special tokens, so the parser asks for them in the text (skip_special_tokens off).

`ForcedToolCalls` serves tool_choice "required" and named functions: structured outputs
make the whole reply the calls' JSON, for any model.

`extract(text)` splits a finished reply into its content (None when empty) and its calls;
a reply whose calls do not parse is all content, as vLLM treats it. For streaming,
`tool_start(text)` says where a call may begin in the text so far (None: not yet), so
that the stream holds back what may turn out to be a call.
"""
from __future__ import annotations

import ast
import json
import re
import uuid


def tool_call(name: str, arguments) -> dict:
    """One call in OpenAI's shape (arguments as a JSON string)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args}}


def _call_of(obj, args_key: str) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    return tool_call(obj["name"], args if args is not None else {})


def _partial_suffix(text: str, marker: str) -> int | None:
    """Where a tail of text that is a proper prefix of marker starts (None: no such tail)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return None


class _AfterMarker:
    """Calls that start at a marker, after optional content: `_calls(tail)` parses the text
    from the first marker on (None: not calls, so the whole reply is content)."""
    START = ""

    def tool_start(self, text: str) -> int | None:
        pos = text.find(self.START)
        return pos if pos >= 0 else _partial_suffix(text, self.START)

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        start = text.find(self.START)
        calls = self._calls(text[start:]) if start >= 0 else None
        if not calls:
            return text, []
        return text[:start].strip() or None, calls

    def _calls(self, tail: str) -> list[dict] | None:
        raise NotImplementedError


class HermesToolParser(_AfterMarker):
    name = "hermes"
    START = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def _calls(self, tail: str) -> list[dict] | None:
        calls = []
        for body in self._CALL.findall(tail):
            try:
                calls.append(_call_of(json.loads(body.strip()), "arguments"))
            except json.JSONDecodeError:
                return None
        return None if None in calls else calls


class Llama3JsonToolParser:
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def tool_start(self, text: str) -> int | None:
        head = text.lstrip()
        maybe = not head or head.startswith(("{", self.TAG)) or self.TAG.startswith(head)
        return 0 if maybe else None

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].lstrip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = _call_of(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return None, calls


class PythonicToolParser:
    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"

    def tool_start(self, text: str) -> int | None:
        head = text.lstrip()
        maybe = not head or head.startswith(("[", self.START)) or self.START.startswith(head)
        return 0 if maybe else None

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        body = text.strip().removeprefix(self.START).removesuffix(self.END).strip()
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            return None, [self._call(node) for node in tree.elts]
        except (SyntaxError, ValueError, TypeError, RecursionError):
            return text, []

    @staticmethod
    def _call(node) -> dict:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("not a call by keywords")
        if any(k.arg is None for k in node.keywords):
            raise ValueError("**kwargs")
        return tool_call(node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords})


class MistralToolParser(_AfterMarker):
    name = "mistral"
    START, ARGS = "[TOOL_CALLS]", "[ARGS]"
    skip_special_tokens = False  # the markers are special tokens

    def _calls(self, tail: str) -> list[dict] | None:
        calls = []
        for part in tail.split(self.START)[1:]:
            part = part.strip()
            try:
                if part.startswith("["):  # a JSON list of calls
                    calls += [_call_of(obj, "arguments") for obj in json.loads(part)]
                else:  # name[ARGS]{...}
                    name, args = part.split(self.ARGS, 1)
                    calls.append(tool_call(name.strip(), json.loads(args)) if name.strip() else None)
            except (json.JSONDecodeError, ValueError, TypeError):
                return None
        return None if None in calls else calls


class ForcedToolCalls:
    """tool_choice "required" or a named function (vLLM's way): structured outputs force the
    reply to be JSON of `schema()`, every bit of it calls: for "required" a list of
    {"name", "parameters"} (one or more), for a named function its arguments object. A reply
    cut short (max_tokens) does not parse and stays content."""

    def __init__(self, tools: list[dict], name: str | None = None):
        self.params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"}
                       for t in tools}
        if name is not None and name not in self.params:
            raise ValueError(f"tool_choice names function {name!r}, which is not among 'tools'")
        self.name = name

    def schema(self) -> dict:
        if self.name is not None:
            return self.params[self.name]
        calls = [{"type": "object", "properties": {"name": {"const": n}, "parameters": p},
                  "required": ["name", "parameters"]} for n, p in self.params.items()]
        return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}

    def tool_start(self, text: str) -> int:
        return 0

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        if self.name is not None:
            return None, [tool_call(self.name, value)]
        return None, [tool_call(c["name"], c["parameters"]) for c in value]


TOOL_PARSERS = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser, PythonicToolParser, MistralToolParser)}


def get_tool_parser(name: str):
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


__all__ = ["TOOL_PARSERS", "get_tool_parser", "tool_call", "ForcedToolCalls", "HermesToolParser",
           "Llama3JsonToolParser", "MistralToolParser", "PythonicToolParser"]
