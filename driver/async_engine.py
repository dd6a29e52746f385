"""The engine loop for a server: one thread owns the LLMEngine and steps it while any
work is left; asyncio callers add requests and read each one's outputs as a stream.

    outputs = engine.generate(prompt_token_ids, params, request_id)  # added, or raises
    async for out in outputs:
        ...   # RequestOutput, cumulative; the last one has finished=True

Invariants: only the loop thread touches the LLMEngine (it is not thread-safe); requests
and aborts reach it through one queue. A stream whose reader goes away (the client
disconnected, the task was cancelled) aborts its request, so its KV blocks go back to the
allocator on the loop's next turn. Once a worker dies, every open stream and every later
request gets EngineDeadError: nothing waits forever.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from driver.config import EngineConfig
from driver.engine import EngineDeadError, LLMEngine
from driver.outputs import RequestOutput
from driver.sampling_params import SamplingParams

logger = logging.getLogger("raytp.async_engine")


class EngineOverloadedError(RuntimeError):
    """More requests in flight than the server takes; the client should retry later."""


class RequestStream:
    """One request's outputs, put by the loop thread, read by one asyncio task."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:  # from the loop thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

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
        self.engine = LLMEngine(config)
        self.config = config
        self.max_num_requests = max_num_requests
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # the loop thread's
        self._num_requests = 0  # accepted and not yet finished or aborted; under _lock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="raytp-engine-loop", daemon=True)
        self._thread.start()

    # ---- asyncio side ----

    @property
    def dead(self) -> Exception | None:
        return self.engine.dead

    def generate(self, prompt: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """Adds the request now (raising EngineOverloadedError or EngineDeadError at once) and
        returns its outputs; leaving them early (closing, cancellation) aborts the request.
        A caller that never iterates them must abort() the request itself."""
        return self._outputs(self._add(prompt, params, request_id))

    async def _outputs(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def _add(self, prompt: list[int], params: SamplingParams, request_id: str) -> RequestStream:
        if self.engine.dead is not None:
            raise EngineDeadError(f"the engine stopped earlier: {self.engine.dead}")
        with self._lock:
            if self._num_requests >= self.max_num_requests:
                raise EngineOverloadedError(
                    f"the server is at its limit of {self.max_num_requests} requests in flight "
                    f"(max_num_requests); retry later")
            self._num_requests += 1
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._inbox.put(("add", stream, prompt, params))
        self._wake.set()
        return stream

    def stats(self) -> dict:
        """A snapshot for /metrics (read racily from another thread: counters only)."""
        s = self.engine.scheduler
        bm = s.block_manager
        return {"requests_in_flight": self._num_requests, "num_running": s.num_running,
                "num_waiting": s.num_waiting, "num_swapped": s.num_swapped,
                "num_gpu_blocks": bm.gpu.num_blocks, "num_free_gpu_blocks": bm.num_free_gpu_blocks,
                "prompt_tokens_total": self.engine.metrics.num_prompt_tokens,
                "generation_tokens_total": self.engine.metrics.num_generated_tokens,
                "requests_finished_total": self.engine.metrics.num_finished,
                "engine_steps_total": self.engine.metrics.num_steps}

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ---- the loop thread ----

    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()
            self._drain_inbox()
            if self.engine.dead is not None or not self.engine.has_unfinished_work():
                self._wake.wait(timeout=1.0)
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                # A worker died, or a step's outputs could not be made: the scheduler's state is
                # unknown either way, so the engine stops (Serve's health check replaces it).
                logger.exception("engine loop stopped")
                if self.engine.dead is None:
                    self.engine.fail(e)
                self._fail_all(e if isinstance(e, EngineDeadError) else EngineDeadError(f"the engine stopped: {e}"))
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        self._forget(out.request_id)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                self._start(*msg[1:])
            elif msg[1] in self._streams:
                self.engine.abort_request(msg[1])
                self._forget(msg[1])

    def _start(self, stream: RequestStream, prompt: list[int], params: SamplingParams) -> None:
        try:
            if self.engine.dead is not None:
                raise EngineDeadError(f"the engine stopped earlier: {self.engine.dead}")
            self.engine.add_request(prompt, params, stream.request_id)
        except Exception as e:  # bad input the caller did not catch, or a dead engine
            with self._lock:
                self._num_requests -= 1
            stream.put(e)
            return
        self._streams[stream.request_id] = stream

    def _forget(self, request_id: str) -> None:
        del self._streams[request_id]
        with self._lock:
            self._num_requests -= 1

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put(error)
            self._forget(request_id)


__all__ = ["AsyncLLMEngine", "EngineOverloadedError", "RequestStream"]
