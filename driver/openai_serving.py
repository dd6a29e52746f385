"""The OpenAI API over an AsyncLLMEngine: /v1/completions and /v1/chat/completions, whole
or streamed (server-sent events), with usage and logprobs in OpenAI's shapes.

A call with several prompts (completions) or n > 1 is one engine request per prompt; choice
`i * n + j` is prompt i's completion j. Leaving a call early (the client disconnected,
the task was cancelled) closes every engine stream, which aborts its request.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import numpy as np

from driver.async_engine import AsyncLLMEngine, EngineOverloadedError
from driver.beam_search import BeamSearch, BeamSearchParams, api_beam_params
from driver.config import generation_defaults
from driver.detokenizer import next_stream_delta
from driver.engine import EngineDeadError, eos_token_ids
from driver.openai_protocol import (APIError, ParsedRequest, parse_chat, parse_completion, parse_detokenize,
                                    parse_embeddings, parse_tokenize)
from driver.openai_responses import ResponseBuilder, chat_body
from driver.lora import LoRARequest
from driver.outputs import CompletionOutput, RequestOutput
from driver.sampling_params import PoolingParams, SamplingParams
from driver.tokenizer import load_chat_template, load_tokenizer
from driver.reasoning_parsers import Spans, get_reasoning_parser

logger = logging.getLogger("raytp.openai_serving")


def engine_error(e: Exception) -> APIError:
    """What a client is told when the engine refuses or loses a request."""
    if isinstance(e, EngineOverloadedError):
        return APIError(str(e), status=503, type="server_error", code="overloaded")
    if isinstance(e, EngineDeadError):
        return APIError(f"{e}; the replica restarts its engine after a failed health check",
                        status=500, type="server_error", code="engine_dead")
    if isinstance(e, ValueError):
        return APIError(str(e))
    return APIError(f"internal error: {type(e).__name__}: {e}", status=500, type="server_error")


async def merge(gens: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index, item) from several async iterators as items arrive. Closes all of them when it
    ends, fails, is cancelled, or is closed: iterate it inside `aclosing` so that leaving the
    loop early closes it at once."""
    if len(gens) == 1:  # the common call: no futures or waits per item
        try:
            async for item in gens[0]:
                yield 0, item
        finally:
            await gens[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(g)): i for i, g in enumerate(gens)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(gens[i]))] = i
                yield i, item
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for g in gens:
            await g.aclose()


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_name: str, stream_interval: int = 1,
                 tool_parser: str | None = None, lora_modules: dict[str, str] | None = None,
                 reasoning_parser: str | None = None, chat_template: str | None = None,
                 generation_config: str = "auto"):
        self.engine = engine
        # Each adapter is a model of its own to clients (vLLM's --lora-modules), ids from 1.
        modules = (lora_modules or {}).items()
        self.loras = {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(modules, start=1)}
        self.stream_interval = stream_interval
        self.tool_parser = tool_parser  # with --enable-auto-tool-choice: --tool-call-parser's name
        self.reasoning_parser = reasoning_parser  # --reasoning-parser: chat replies' reasoning_content
        # The engine detokenizes in its own process; this one tokenizes prompts, renders chat
        # templates and spells out logprobs' tokens.
        self.tokenizer = load_tokenizer(engine.config.model.tokenizer)
        if chat_template is not None:  # (--chat-template: in place of the tokenizer's own)
            self.tokenizer.chat_template = load_chat_template(chat_template)
        self.model_name = served_model_name
        # Where a request leaves a sampling field out: the checkpoint's choice (vLLM's way).
        self.sampling_defaults = generation_defaults(engine.config.model.model) if generation_config == "auto" else {}
        if self.sampling_defaults:
            logger.info("sampling defaults from the checkpoint's generation_config.json: %s", self.sampling_defaults)
        self.names = (served_model_name, *self.loras)  # what clients may send as `model`
        self.created = int(time.time())

    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "raytp",
                "max_model_len": self.engine.config.model.max_model_len}
        adapters = [{**card, "id": name, "root": lora.lora_path, "parent": self.model_name}
                    for name, lora in self.loras.items()]
        return {"object": "list", "data": [card, *adapters]}

    async def tokenize(self, body: dict) -> dict:
        ids = parse_tokenize(body, self.tokenizer, self.names)
        return {"count": len(ids), "max_model_len": self.engine.config.model.max_model_len, "tokens": ids}

    async def detokenize(self, body: dict) -> dict:
        ids = parse_detokenize(body, self.engine.config.model.arch.vocab_size, self.names)
        return {"prompt": self.tokenizer.decode(ids)}

    async def embeddings(self, body: dict) -> dict:
        m = self.engine.config.model
        req = parse_embeddings(body, self.tokenizer, m.arch.vocab_size, m.max_model_len, self.names)
        call_id = f"embd-{uuid.uuid4().hex}"
        finals = await _collect(self._open(req.inputs, PoolingParams(), call_id, self.loras.get(req.model)))
        data = [{"object": "embedding", "index": i, "embedding": _encode(out.embedding, req.base64)}
                for i, out in enumerate(finals)]
        tokens = sum(len(ids) for ids in req.inputs)
        return {"id": call_id, "object": "list", "created": int(time.time()), "model": req.model, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def completions(self, body: dict) -> dict | AsyncIterator[str]:
        return await self._serve(body, chat=False)

    async def chat_completions(self, body: dict) -> dict | AsyncIterator[str]:
        return await self._serve(body, chat=True)

    async def responses(self, body: dict) -> dict | AsyncIterator[str]:
        """OpenAI's Responses API, as the chat completion it means (driver/openai_responses.py)."""
        chat = chat_body(body)
        builder, result = ResponseBuilder(body), await self._serve(chat, chat=True)
        if chat.get("stream"):
            return builder.events(result)
        choice = result["choices"][0]
        return builder.response(choice["message"], choice["finish_reason"], result["usage"])

    async def _serve(self, body: dict, chat: bool) -> dict | AsyncIterator[str]:
        m = self.engine.config.model
        body = {**self.sampling_defaults, **body}
        if chat:
            req = parse_chat(body, self.tokenizer, m.arch.vocab_size, m.max_model_len, self.names,
                             self.tool_parser)
        else:
            req = parse_completion(body, self.tokenizer, m.arch.vocab_size, m.max_model_len, self.names)
        call_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            beam = api_beam_params(body, req.params, req.stream)
        except ValueError as e:
            raise APIError(str(e), param="use_beam_search") from None
        if beam is not None:
            return await self._beam_search(req, call_id, beam, chat)
        gens = self._open(req.prompts, req.params, call_id, self.loras.get(req.model), req.priority)
        if req.stream:
            return self._stream(req, call_id, gens, chat)
        finals = await _collect(gens)
        choices = [self._choice(req, i, out, c, chat) for i, out in enumerate(finals) for c in out.outputs]
        kind = "chat.completion" if chat else "text_completion"
        response = {"id": call_id, "object": kind, "created": int(time.time()), "model": req.model,
                    "choices": choices, "usage": self._usage(req, finals)}
        if chat and req.prompt_logprobs is not None:  # (vLLM's place for them in chat)
            response["prompt_logprobs"] = self._prompt_logprobs(req, finals[0])
        return response

    async def _beam_search(self, req: ParsedRequest, call_id: str, beam: BeamSearchParams, chat: bool) -> dict:
        """vLLM's use_beam_search: the n best beams of each prompt as its n choices, whole."""
        search = BeamSearch(req.prompts, beam, eos_token_ids(self.engine.config, self.tokenizer))
        places = len(req.prompts) * beam.beam_width  # held from the start: never refused midway
        try:
            self.engine.reserve(places)
        except Exception as e:
            raise engine_error(e) from e
        try:
            for step in range(beam.max_tokens):
                beams = search.beams()
                if not beams:
                    break
                gens = self._open([b.tokens for b in beams], search.step_params, f"{call_id}-{step}",
                                  self.loras.get(req.model), reserved=True)
                search.advance([out.outputs[0].logprobs[0] for out in await _collect(gens)])
        finally:
            self.engine.release(places)
        choices, generated = [], 0
        for i, (prompt, result) in enumerate(zip(req.prompts, search.results())):
            for j, b in enumerate(result.sequences):
                text = self.tokenizer.decode(b.tokens[len(prompt):], skip_special_tokens=True)
                generated += len(b.tokens) - len(prompt)
                body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                choices.append({"index": i * beam.beam_width + j, **body, "logprobs": None,
                                "finish_reason": b.finish_reason})
        prompt_tokens = sum(len(p) for p in req.prompts)
        return {"id": call_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                          "total_tokens": prompt_tokens + generated}}

    def _open(self, prompts: list[list[int]], params: SamplingParams | PoolingParams, call_id: str,
              lora: LoRARequest | None = None, priority: int = 0,
              reserved: bool = False) -> list[AsyncIterator[RequestOutput]]:
        if priority and self.engine.config.scheduler.scheduling_policy != "priority":
            raise APIError("'priority' needs the server started with --scheduling-policy priority",
                           param="priority")
        gens = []
        try:
            for i, ids in enumerate(prompts):
                gens.append(self.engine.generate(ids, params, f"{call_id}-{i}", lora, priority, reserved))
        except Exception as e:  # overloaded or dead: take back the prompts already added
            for i in range(len(gens)):
                self.engine.abort(f"{call_id}-{i}")
            raise engine_error(e) from e
        return gens

    async def _stream(self, req: ParsedRequest, call_id: str, gens: list, chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": call_id, "object": kind, "created": int(time.time()), "model": req.model}
        sent: dict[int, tuple[int, int]] = {}  # choice index -> (chars, tokens) already sent
        finals: list[RequestOutput | None] = [None] * len(gens)
        try:
            async with aclosing(merge(gens)) as outputs:  # a client gone away aborts its requests
                async for i, out in outputs:
                    finals[i] = out
                    for c in out.outputs:
                        chunk = self._delta(req, i, out, c, chat, sent)
                        if chunk is not None:
                            usage = {"usage": self._usage(req, finals)} if req.continuous_usage else {}
                            yield _sse({**head, "choices": [chunk], **usage})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(req, finals)})
        except (EngineDeadError, ValueError, RuntimeError) as e:  # mid-stream: an error event
            yield _sse(engine_error(e).body())
        yield "data: [DONE]\n\n"

    def _delta(self, req: ParsedRequest, i: int, out: RequestOutput, c: CompletionOutput, chat: bool,
               sent: dict) -> dict | None:
        index = i * req.params.n + c.index
        first = index not in sent
        chars, tokens = sent.get(index, (0, 0))
        new_ids, new_lps = c.token_ids[tokens:], (c.logprobs or [])[tokens:]
        # A chunk per stream_interval tokens (the first and the last at once); nothing while a
        # step brought no token (a prefill chunk).
        due = len(new_ids) >= self.stream_interval or (first and (new_ids or chat)) or c.finish_reason
        if not due:
            return None
        echo = self._prompt_text(req, i) if first and req.echo else ""  # the prompt leads the first delta
        if echo and req.logprobs:  # (with its logprobs)
            new_ids, new_lps = req.prompts[i] + new_ids, out.prompt_logprobs + new_lps
        end, calls, spans = self._sendable(req, c, chat)
        # The tail that could start a stop string waits until the choice ends (vLLM v1's
        # hold-back): a stream never sends text that the whole response would not have.
        done = c.finish_reason is not None and (end == len(c.text) or calls is not None)
        new_text = next_stream_delta(c.text[:end], chars, req.params.stop or (), done)
        new_end = chars + len(new_text)
        sent[index] = (new_end, len(c.token_ids))
        logprobs = self._logprobs(req, new_ids, new_lps, chat) if req.logprobs else None
        if not chat:
            return {"index": index, "text": echo + new_text, "logprobs": logprobs, "finish_reason": c.finish_reason}
        reasoning = c.text[max(chars, spans.start):min(new_end, spans.end)]  # (the tags are never sent)
        content = c.text[max(chars, spans.content):new_end]
        delta = {"role": "assistant"} if first else {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content or first or (new_ids and not reasoning):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        return {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": "tool_calls" if calls else c.finish_reason}

    def _sendable(self, req: ParsedRequest, c: CompletionOutput, chat: bool) -> tuple[int, list | None, Spans]:
        """How much of a choice's text a stream may send by now, its tool calls once it ended with
        some, and where its reasoning and content lie (all content without a reasoning parser)."""
        text, finished = c.text, c.finish_reason is not None
        spans, end = Spans(0, 0, 0), len(text)
        if chat and self.reasoning_parser:  # a tail that may begin the end tag waits
            spans, end = get_reasoning_parser(self.reasoning_parser).spans(text, finished)
        calls = None
        if req.tool_parser:  # what may be a tool call (in the content) waits until the choice ends
            cut, calls = _stream_tool_calls(req.tool_parser, text[spans.content:], finished)
            end = min(end, spans.content + cut)
        return end, calls, spans

    def _choice(self, req: ParsedRequest, i: int, out: RequestOutput, c: CompletionOutput, chat: bool) -> dict:
        index = i * req.params.n + c.index
        ids, lps = c.token_ids, c.logprobs or []
        if req.echo and req.logprobs and not chat:  # the echoed prompt's tokens lead
            ids, lps = out.prompt_token_ids + ids, out.prompt_logprobs + lps
        logprobs = self._logprobs(req, ids, lps, chat) if req.logprobs else None
        if chat:
            message, reason = self._message(req, c)
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
        text = self._prompt_text(req, i) + c.text if req.echo else c.text
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(req, out)
        return choice

    def _message(self, req: ParsedRequest, c: CompletionOutput) -> tuple[dict, str | None]:
        """A whole chat choice's message (reasoning and tool calls parsed out) and finish reason."""
        message = {"role": "assistant", "content": c.text}
        if self.reasoning_parser:
            message["reasoning_content"], message["content"] = get_reasoning_parser(self.reasoning_parser).split(c.text)
        if req.tool_parser and message["content"]:
            content, calls = req.tool_parser.extract(message["content"])
            if calls:
                return {**message, "content": content, "tool_calls": calls}, "tool_calls"
        return message, c.finish_reason

    def _prompt_logprobs(self, req: ParsedRequest, out: RequestOutput) -> list[dict | None]:
        """vLLM's shape: per prompt token (None for the first), {token id: {logprob, decoded_token}}
        for the token itself and the top k there."""
        k = req.prompt_logprobs
        rows = []
        for t, d in zip(out.prompt_token_ids, out.prompt_logprobs):
            if d is None:
                rows.append(None)
                continue
            keep = {t: d[t], **dict(sorted(d.items(), key=lambda kv: -kv[1])[:k])}
            rows.append({str(u): {"logprob": v, "decoded_token": self.tokenizer.decode([u])}
                         for u, v in keep.items()})
        return rows

    def _prompt_text(self, req: ParsedRequest, i: int) -> str:
        text = req.prompt_texts[i]
        return text if text is not None else self.tokenizer.decode(req.prompts[i])

    def _logprobs(self, req: ParsedRequest, token_ids: list[int], lps: list[dict | None], chat: bool) -> dict:
        """OpenAI's logprobs object for these tokens: per token its own logprob and the top k."""
        k = req.params.logprobs or 0
        rows = []
        for t, d in zip(token_ids, lps):
            if d is None:  # the first prompt token (echo): nothing comes before it
                rows.append((self.tokenizer.decode([t]), None, None))
                continue
            top = sorted(d.items(), key=lambda kv: -kv[1])[:k]
            rows.append((self.tokenizer.decode([t]), d.get(t),
                         [(self.tokenizer.decode([u]), lp) for u, lp in top]))
        if chat:
            entry = lambda s, lp: {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(s, lp), "top_logprobs": [entry(u, v) for u, v in top]}
                                for s, lp, top in rows]}
        offsets, pos = [], 0
        for s, _, _ in rows:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": [s for s, _, _ in rows], "token_logprobs": [lp for _, lp, _ in rows],
                "top_logprobs": [None if top is None else dict(top) for _, _, top in rows], "text_offset": offsets}

    @staticmethod
    def _usage(req: ParsedRequest, finals: list[RequestOutput | None]) -> dict:
        prompt = sum(len(ids) for ids in req.prompts)
        completion = sum(len(c.token_ids) for out in finals if out is not None for c in out.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream_tool_calls(parser, text: str, finished: bool) -> tuple[int, list[dict] | None]:
    """How much of the (content) text a stream may send by now, and the tool calls once the
    choice ended with some (its content is then the text before them)."""
    cut = parser.tool_start(text)
    if cut is None:
        return len(text), None
    if not finished:
        return cut, None
    _, calls = parser.extract(text)
    return (cut, calls) if calls else (len(text), None)


async def _collect(gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Each stream's last output (leaving early closes every stream: their requests abort)."""
    finals: list[RequestOutput | None] = [None] * len(gens)
    try:
        async with aclosing(merge(gens)) as outputs:
            async for i, out in outputs:
                finals[i] = out
    except Exception as e:
        raise engine_error(e) from e
    return finals


def _encode(vector: list[float], as_base64: bool) -> list[float] | str:
    """OpenAI's encodings of an embedding: floats, or base64 of its float32 bytes (little-endian)."""
    if not as_base64:
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


__all__ = ["OpenAIServing", "merge", "engine_error"]
