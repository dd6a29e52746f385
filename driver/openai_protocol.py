"""OpenAI API requests -> (prompt token ids, SamplingParams), checked field by field.

Every problem becomes an APIError that renders as OpenAI's error body, naming the field
and what it accepts, so a client sees a 400 that says how to fix the request. Fields the
OpenAI clients send and raytp ignores (user, metadata, store, ...) pass silently; fields
whose meaning raytp does not implement (suffix, the deprecated functions, ...) are refused.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from driver.sampling_params import SamplingParams, check_token_ids_in_vocab
from driver.tokenizer import apply_chat_template, encode_prompt
from driver.tool_parsers import ForcedToolCalls, get_tool_parser

MAX_TOP_LOGPROBS = 20
_UNSUPPORTED = ("suffix", "functions", "function_call")
_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """One API call: a prompt per choice group (completions may batch prompts)."""

    model: str
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: bool = False  # chat: return logprobs (params.logprobs is the top-k count)
    prompt_logprobs: int | None = None  # vLLM's extension: return them, with this top-k
    tool_parser: object | None = None  # chat with tools: parses the calls out of the reply (driver/tool_parsers.py)
    priority: int = 0  # vLLM's extension, with --scheduling-policy priority: lower first
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage in every chunk


def _field(body: dict, name: str, kinds: tuple, default=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python, but not in JSON: true is no token count.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise APIError(f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, "
                       f"got {type(value).__name__} {value!r}", param=name)
    return value


def check_model(body: dict, served: str | tuple[str, ...]) -> str:
    """served: the served model's name, or it and its LoRA adapters' names."""
    names = (served,) if isinstance(served, str) else served
    model = body.get("model")
    shown = ", ".join(f"'{n}'" for n in names)
    if not isinstance(model, str) or not model:
        raise APIError(f"'model' is required: this server serves {shown}", param="model")
    if model not in names:
        raise APIError(f"The model '{model}' does not exist; this server serves {shown}",
                       status=404, param="model", code="model_not_found")
    return model


def check_length(num_prompt: int, max_tokens: int | None, max_model_len: int, param: str) -> None:
    if max_tokens is None and num_prompt < max_model_len:
        return
    total = num_prompt + (max_tokens or 0)
    if total > max_model_len or num_prompt >= max_model_len:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                       f"requested {total} tokens ({num_prompt} in the prompt, {max_tokens or 0} in the "
                       f"completion). Please reduce the length of the prompt or of '{param}'.",
                       param=param, code="context_length_exceeded")


def _check_ids(ids: list, vocab_size: int, param: str = "prompt", allow_empty: bool = False) -> list[int]:
    if not ids and not allow_empty:
        raise APIError(f"'{param}' is empty; give at least one token", param=param)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise APIError(f"{param} token ids must be integers in [0, {vocab_size})", param=param)
    return list(ids)


def _completion_prompts(body: dict, tokenizer, vocab_size: int,
                        param: str = "prompt") -> tuple[list[list[int]], list[str | None]]:
    prompt = body.get(param)
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(f"'{param}' must be a string, a list of strings, a list of token ids or a list of "
                       "lists of token ids", param=param)
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise APIError(f"'{param}' is empty; give at least one character", param=param)
            ids.append(_check_ids(encode_prompt(tokenizer, p), vocab_size, param))
            texts.append(p)
        elif isinstance(p, list):
            ids.append(_check_ids(p, vocab_size, param))
            texts.append(None)
        else:
            raise APIError(f"each {param} must be a string or a list of token ids, got {type(p).__name__}",
                           param=param)
    return ids, texts


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise APIError(f"messages[{i}] needs a 'role' in {_ROLES}", param="messages")
        msg = {"role": m["role"]}
        content = m.get("content")
        if m["role"] == "assistant" and m.get("tool_calls"):  # a turn that called tools
            msg["tool_calls"] = _template_tool_calls(m["tool_calls"], i)
            content = "" if content is None else content
        if m["role"] == "tool":
            msg.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise APIError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                               f"are supported", param="messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({**msg, "content": content})
    return out


def _template_tool_calls(calls, i: int) -> list[dict]:
    """An assistant turn's OpenAI tool_calls, with each call's arguments (a JSON string in the API)
    as the object that chat templates expect (as vLLM and transformers pass them)."""
    if not isinstance(calls, list):
        raise APIError(f"messages[{i}].tool_calls must be a list", param="messages")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(f"messages[{i}].tool_calls: each needs a 'function' with a 'name'", param="messages")
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            raise APIError(f"messages[{i}].tool_calls: arguments of {fn['name']!r} are not valid JSON",
                           param="messages") from None
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _tools(body: dict, tool_parser: str | None) -> tuple[list[dict] | None, object | None]:
    """The request's tools (for the template) and the parser of its reply's tool calls: the
    server's --tool-call-parser for tool_choice "auto", ForcedToolCalls for "required" or a
    named function (structured outputs then force the calls), None for "none"."""
    tools = _field(body, "tools", (list,), None)
    for t in tools or ():
        if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str)):
            raise APIError("each of 'tools' must be {'type': 'function', 'function': {'name': ..., ...}}",
                           param="tools")
    choice = body.get("tool_choice") or ("auto" if tools else "none")
    if choice == "none":
        return tools, None
    if not tools:
        raise APIError("'tool_choice' needs 'tools'", param="tool_choice")
    if choice == "required":
        return tools, ForcedToolCalls(tools)
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError("a named 'tool_choice' is {'type': 'function', 'function': {'name': ...}}",
                           param="tool_choice")
        try:
            return tools, ForcedToolCalls(tools, fn["name"])
        except ValueError as e:
            raise APIError(str(e), param="tool_choice") from None
    if choice != "auto":
        raise APIError("'tool_choice' must be 'none', 'auto', 'required' or a named function", param="tool_choice")
    if tool_parser is None:
        raise APIError("\"auto\" tool choice needs the server started with --enable-auto-tool-choice and "
                       "--tool-call-parser (hermes, llama3_json, mistral or pythonic)", param="tool_choice")
    return tools, get_tool_parser(tool_parser)


def _structured(body: dict) -> dict:
    """Structured outputs as SamplingParams fields: vLLM's structured_outputs (choice, regex,
    json, grammar), its older guided_choice / guided_regex / guided_json / guided_grammar, or
    OpenAI's response_format (json_schema: that schema; json_object: any JSON object)."""
    structured = _field(body, "structured_outputs", (dict,), {})
    unknown = sorted(set(structured) - {"choice", "regex", "json", "grammar"})
    if unknown:
        raise APIError(f"structured_outputs supports 'choice', 'regex', 'json' and 'grammar' (got {unknown}); "
                       f"raytp has no structural tags", param="structured_outputs")
    out = {"guided_choice": structured.get("choice", _field(body, "guided_choice", (list,))),
           "guided_regex": structured.get("regex", _field(body, "guided_regex", (str,))),
           "guided_grammar": structured.get("grammar", _field(body, "guided_grammar", (str,))),
           "guided_json": structured.get("json", _field(body, "guided_json", (dict, str)))}
    fmt = _field(body, "response_format", (dict,), {})
    kind = fmt.get("type", "text")
    if kind != "text" and out["guided_json"] is not None:
        raise APIError("give 'response_format' or a JSON schema of vLLM's fields, not both", param="response_format")
    if kind == "json_object":
        out["guided_json"] = {"type": "object"}
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise APIError("'response_format' of type 'json_schema' needs {'json_schema': {'name': ..., "
                           "'schema': {...}}}", param="response_format")
        out["guided_json"] = spec["schema"]
    elif kind != "text":
        raise APIError("'response_format' type must be 'text', 'json_object' or 'json_schema'",
                       param="response_format")
    return {k: v for k, v in out.items() if v is not None}


def _prompt_logprobs(body: dict, stream: bool) -> int | None:
    k = _field(body, "prompt_logprobs", (int,), None, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    if k is not None and stream:
        raise APIError("'prompt_logprobs' is not available with 'stream': true", param="prompt_logprobs")
    return k


def _sampling_params(body: dict, max_tokens: int | None, logprobs: int | None, vocab_size: int,
                     prompt_logprobs: int | None = None) -> SamplingParams:
    for name in _UNSUPPORTED:
        if body.get(name):
            raise APIError(f"'{name}' is not supported by this server; leave it out", param=name)
    n = _field(body, "n", (int,), 1)
    best_of = _field(body, "best_of", (int,), n)
    if best_of != n:
        raise APIError("'best_of' must equal 'n' (raytp returns every sampled completion)", param="best_of")
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    stop_ids = _field(body, "stop_token_ids", (list,), [])
    num = (int, float)
    try:
        params = SamplingParams(
            n=n, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, stop=stop,
            stop_token_ids=stop_ids,
            temperature=float(_field(body, "temperature", num, 1.0)), top_p=float(_field(body, "top_p", num, 1.0)),
            top_k=_field(body, "top_k", (int,), -1), min_p=float(_field(body, "min_p", num, 0.0)),
            seed=_field(body, "seed", (int,)),
            presence_penalty=float(_field(body, "presence_penalty", num, 0.0)),
            frequency_penalty=float(_field(body, "frequency_penalty", num, 0.0)),
            repetition_penalty=float(_field(body, "repetition_penalty", num, 1.0)),
            ignore_eos=_field(body, "ignore_eos", (bool,), False),
            min_tokens=_field(body, "min_tokens", (int,), 0),
            skip_special_tokens=_field(body, "skip_special_tokens", (bool,), True),
            logit_bias=_field(body, "logit_bias", (dict,)),
            include_stop_str_in_output=_field(body, "include_stop_str_in_output", (bool,), False),
            **_structured(body),
            allowed_token_ids=_field(body, "allowed_token_ids", (list,)),
            bad_words=_field(body, "bad_words", (list,), []))
        check_token_ids_in_vocab(params, vocab_size)
        return params
    except ValueError as e:  # SamplingParams names the field: "SamplingParams.top_p must be ..."
        msg = str(e)
        param = msg.split(".", 1)[1].split(" ", 1)[0] if msg.startswith("SamplingParams.") else None
        raise APIError(msg.replace("SamplingParams.", "'", 1).replace(" ", "' ", 1) if param else msg,
                       param=param) from e


def _chat_ids(body: dict, tokenizer, tools: list[dict] | None = None) -> list[int]:
    messages = _chat_messages(body)
    try:
        return apply_chat_template(tokenizer, messages, **({"tools": tools} if tools else {}))
    except ValueError as e:
        raise APIError(str(e), param="messages") from e
    except Exception as e:  # the template itself raised (e.g. roles out of order)
        raise APIError(f"the chat template rejected the messages: {e}", param="messages") from e


def _stream_options(body: dict) -> tuple[bool, bool, bool]:
    """stream; include_usage (a last chunk with the usage); vLLM's continuous_usage_stats (every
    chunk carries the usage so far)."""
    stream = _field(body, "stream", (bool,), False)
    opts = _field(body, "stream_options", (dict,), {})
    return (stream, bool(opts.get("include_usage", False)) and stream,
            bool(opts.get("continuous_usage_stats", False)) and stream)


def _truncate(body: dict, prompts: list[list[int]], texts: list[str | None]) -> None:
    """vLLM's truncate_prompt_tokens, in place: a longer prompt keeps its last k tokens (and
    echoes as their text)."""
    k = _field(body, "truncate_prompt_tokens", (int,), None, "an integer >= 1")
    if k is not None and k < 1:
        raise APIError(f"'truncate_prompt_tokens' must be >= 1, got {k}", param="truncate_prompt_tokens")
    for i, ids in enumerate(prompts):
        if k is not None and len(ids) > k:
            prompts[i], texts[i] = ids[-k:], None


def parse_completion(body: dict, tokenizer, vocab_size: int, max_model_len: int,
                     served_model_name: str | tuple[str, ...]) -> ParsedRequest:
    model = check_model(body, served_model_name)
    prompts, texts = _completion_prompts(body, tokenizer, vocab_size)
    _truncate(body, prompts, texts)
    max_tokens = _field(body, "max_tokens", (int,), 16)  # OpenAI's default for completions
    for ids in prompts:
        check_length(len(ids), max_tokens, max_model_len, "max_tokens")
    logprobs = _field(body, "logprobs", (int,), None, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    echo = _field(body, "echo", (bool,), False)
    stream, usage, continuous = _stream_options(body)
    prompt_k = _prompt_logprobs(body, stream)
    # echo with logprobs scores the echoed prompt too (the legacy API's way, as lm-eval uses it).
    wanted = [k for k in (prompt_k, logprobs if echo else None) if k is not None]
    params = _sampling_params(body, max_tokens, logprobs, vocab_size, max(wanted) if wanted else None)
    return ParsedRequest(model, prompts, texts, params, stream, usage, echo=echo, logprobs=logprobs is not None,
                         prompt_logprobs=prompt_k, priority=_field(body, "priority", (int,), 0),
                         continuous_usage=continuous)


def parse_chat(body: dict, tokenizer, vocab_size: int, max_model_len: int,
               served_model_name: str | tuple[str, ...], tool_parser: str | None = None) -> ParsedRequest:
    """tool_parser: the server's --tool-call-parser when --enable-auto-tool-choice is on."""
    model = check_model(body, served_model_name)
    tools, calls_parser = _tools(body, tool_parser)
    prompts, texts = [_check_ids(_chat_ids(body, tokenizer, tools), vocab_size)], [None]
    _truncate(body, prompts, texts)
    [ids] = prompts
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _field(body, param, (int,), None)  # None: up to the context limit
    check_length(len(ids), max_tokens, max_model_len, param)
    want_logprobs = _field(body, "logprobs", (bool,), False)
    top = _field(body, "top_logprobs", (int,), None, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    if top is not None and not want_logprobs:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    stream, usage, continuous = _stream_options(body)
    prompt_k = _prompt_logprobs(body, stream)
    params = _sampling_params(body, max_tokens, (top or 0) if want_logprobs else None, vocab_size, prompt_k)
    if not getattr(calls_parser, "skip_special_tokens", True):  # (its markers are special tokens)
        params = dataclasses.replace(params, skip_special_tokens=False)
    if isinstance(calls_parser, ForcedToolCalls):
        if any(getattr(params, f"guided_{k}") is not None for k in ("json", "regex", "choice", "grammar")):
            raise APIError("a forced 'tool_choice' ('required' or a named function) sets the reply's structure "
                           "itself: leave out response_format and the guided fields", param="tool_choice")
        params = dataclasses.replace(params, guided_json=calls_parser.schema())
    return ParsedRequest(model, prompts, texts, params, stream, usage, logprobs=want_logprobs,
                         prompt_logprobs=prompt_k, tool_parser=calls_parser,
                         priority=_field(body, "priority", (int,), 0), continuous_usage=continuous)


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[list[int]]
    base64: bool  # encoding_format "base64" (the openai client's default): float32 bytes


def parse_embeddings(body: dict, tokenizer, vocab_size: int, max_model_len: int,
                     served_model_name: str | tuple[str, ...]) -> EmbeddingRequest:
    model = check_model(body, served_model_name)
    inputs, _ = _completion_prompts(body, tokenizer, vocab_size, param="input")
    for ids in inputs:
        if len(ids) >= max_model_len:
            raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, an input "
                           f"has {len(ids)} tokens; shorten it below {max_model_len}.", param="input",
                           code="context_length_exceeded")
    fmt = _field(body, "encoding_format", (str,), "float")
    if fmt not in ("float", "base64"):
        raise APIError(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    if body.get("dimensions") is not None:
        raise APIError("'dimensions' is not supported: embeddings have the model's hidden size",
                       param="dimensions")
    return EmbeddingRequest(model, inputs, fmt == "base64")


def parse_tokenize(body: dict, tokenizer, served_model_name: str | tuple[str, ...]) -> list[int]:
    """vLLM's /tokenize: a 'prompt' string, or chat 'messages' through the template."""
    check_model(body, served_model_name)
    if "messages" in body:
        return _chat_ids(body, tokenizer, _field(body, "tools", (list,), None))
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError("'prompt' must be a string (or send chat 'messages')", param="prompt")
    return encode_prompt(tokenizer, prompt)


def parse_detokenize(body: dict, vocab_size: int, served_model_name: str | tuple[str, ...]) -> list[int]:
    """vLLM's /detokenize: 'tokens', a list of token ids."""
    check_model(body, served_model_name)
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise APIError("'tokens' must be a list of token ids", param="tokens")
    return _check_ids(tokens, vocab_size, param="tokens", allow_empty=True)


__all__ = ["APIError", "ParsedRequest", "parse_completion", "parse_chat", "parse_embeddings", "parse_tokenize",
           "parse_detokenize", "check_length", "MAX_TOP_LOGPROBS"]
