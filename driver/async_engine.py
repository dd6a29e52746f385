"""The server's side of an engine: asyncio callers add requests and read each one's outputs
as a stream; the engine itself steps in its own process (driver/engine_core.py).

    outputs = engine.generate(prompt_token_ids, params, request_id)  # added, or raises
    async for out in outputs:
        ...   # RequestOutput, cumulative; the last one has finished=True

One reader task takes the core's per-step deltas and turns them into each request's
cumulative outputs. Everything here runs on the server's event loop (no locks). A stream
whose reader goes away (the client disconnected, the task was cancelled) aborts its
request, so its KV blocks go back to the allocator on the core's next turn. Once the engine
dies (a worker, or the core itself), every open stream and every later request gets
EngineDeadError: nothing waits forever.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator

from driver.config import EngineConfig
from driver.engine import EngineDeadError
from driver.engine_core import OutputDelta, start_engine_core
from driver.lora import LoRARequest
from driver.outputs import CompletionOutput, RequestOutput
from driver.request_metrics import RequestMetrics
from driver.sampling_params import PoolingParams, SamplingParams

logger = logging.getLogger("raytp.async_engine")


class EngineOverloadedError(RuntimeError):
    """More requests in flight than the server takes; the client should retry later."""


class RequestStream:
    """One request's outputs: deltas applied in order, read by one asyncio task."""

    def __init__(self, request_id: str, prompt: list[int], counted: bool = True):
        self.request_id = request_id
        self.output = RequestOutput(request_id, None, prompt, [], False)
        self.arrived = time.monotonic()
        self.first_token: float | None = None  # when the first output token came
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False  # the reader has seen the last output
        self.counted = counted  # takes a place of max_num_requests (not one reserved earlier)

    def apply(self, delta: OutputDelta) -> None:
        if delta.error is not None:
            self._queue.put_nowait(delta.error)
            return
        done = {c.index: c for c in self.output.outputs}
        for d in delta.completions:
            old = done.get(d.index) or CompletionOutput(d.index, "", [], None, [] if d.logprobs is not None else None)
            logprobs = old.logprobs + d.logprobs if d.logprobs is not None else None
            done[d.index] = CompletionOutput(d.index, old.text[:d.text_start] + d.text, old.token_ids + d.token_ids,
                                             d.finish_reason, logprobs)
        # A fresh object per delta: a reader holding the previous one never sees it change.
        self.output = RequestOutput(self.request_id, None, self.output.prompt_token_ids,
                                    [done[i] for i in sorted(done)], delta.finished, delta.num_cached_tokens,
                                    prompt_logprobs=delta.prompt_logprobs or self.output.prompt_logprobs,
                                    embedding=delta.embedding)
        if self.first_token is None and any(d.token_ids for d in delta.completions):
            self.first_token = time.monotonic()
        self._queue.put_nowait(self.output)

    def fail(self, error: BaseException) -> None:
        self._queue.put_nowait(error)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        # Outputs are cumulative: a reader that fell behind takes only the newest.
        while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, max_num_requests: int = 1024):
        self.config = config
        self.max_num_requests = max_num_requests
        self.core = start_engine_core(config)
        self.dead: Exception | None = None
        self._streams: dict[str, RequestStream] = {}  # added, not yet finished or aborted
        self._reserved = 0  # places of max_num_requests held by reserve()
        self.metrics = RequestMetrics()  # latency histograms of the requests served here
        self._reader: asyncio.Task | None = None

    def generate(self, prompt: list[int], params: SamplingParams | PoolingParams, request_id: str,
                 lora_request: LoRARequest | None = None, priority: int = 0,
                 reserved: bool = False) -> AsyncIterator[RequestOutput]:
        """Adds the request now (raising EngineOverloadedError or EngineDeadError at once) and
        returns its outputs; leaving them early (closing, cancellation) aborts the request.
        A caller that never iterates them must abort() the request itself. `reserved`: the
        request takes one of the places its caller holds from reserve(), not a new one."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped earlier: {self.dead}")
        if not reserved:
            self._check_capacity(1)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self._reader is None:
            # In a fresh context: the request's would make the core's output stream a child of
            # this request's Ray task, which Ray cancels with it when its client disconnects.
            self._reader = asyncio.get_running_loop().create_task(self._read(), context=contextvars.Context())
        stream = self._streams[request_id] = RequestStream(request_id, prompt, counted=not reserved)
        self.core.add.remote(request_id, prompt, params, lora_request, priority)
        return self._outputs(stream)

    def reserve(self, places: int) -> None:
        """Holds `places` of max_num_requests until release() (a beam search's beams, added
        anew each step), or raises EngineOverloadedError."""
        self._check_capacity(places)
        self._reserved += places

    def release(self, places: int) -> None:
        self._reserved -= places

    def _check_capacity(self, places: int) -> None:
        taken = self._reserved + sum(s.counted for s in self._streams.values())
        if taken + places > self.max_num_requests:
            raise EngineOverloadedError(f"the server is at its limit of {self.max_num_requests} requests in "
                                        f"flight (max_num_requests); retry later")

    async def _outputs(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None and self.dead is None:
            self.core.abort.remote(request_id)

    async def _read(self) -> None:
        """Deliver the core's deltas until it dies; then fail whatever is still open."""
        try:
            async for ref in self.core.outputs.remote():
                deltas, dead = await ref
                for delta in deltas:
                    self._deliver(delta)
                if dead is not None:
                    self._die(dead)
                    return
            self._die(EngineDeadError("the engine's output stream ended"))
        except Exception as e:  # the core's process is gone
            if self.dead is None:  # not by shutdown()
                logger.exception("lost the engine core")
                self._die(EngineDeadError(f"the engine stopped: {e}"))

    def _deliver(self, delta: OutputDelta) -> None:
        stream = self._streams.get(delta.request_id)
        if stream is None:  # aborted meanwhile
            return
        stream.apply(delta)
        if delta.finished:
            del self._streams[delta.request_id]
            if delta.error is None:
                tokens = max((len(c.token_ids) for c in stream.output.outputs), default=0)
                self.metrics.finished(stream.arrived, stream.first_token, tokens)

    def _die(self, error: EngineDeadError) -> None:
        self.dead = error
        for stream in self._streams.values():
            stream.fail(error)
        self._streams.clear()

    async def stats(self) -> dict:
        """A snapshot for /metrics: this server's requests in flight, the core's counters."""
        stats = {"requests_in_flight": len(self._streams)}
        if self.dead is None:
            stats.update(await self.core.stats.remote())
        return stats

    def shutdown(self) -> None:
        import ray

        self.dead = self.dead or EngineDeadError("the server shut its engine down")
        try:
            ray.get(self.core.shutdown.remote(), timeout=30)
        except Exception:  # already dead, or stuck: the kill below still frees its workers
            pass
        ray.kill(self.core)


__all__ = ["AsyncLLMEngine", "EngineOverloadedError", "RequestStream"]
