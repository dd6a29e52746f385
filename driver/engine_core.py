"""The engine core: an LLMEngine stepped by its own thread in its own Ray actor (process),
as vLLM v1's EngineCore runs beside its API server.

A server's process streams HTTP responses; every chunk costs it Python time under its GIL.
With the engine loop in that same process, each step waited for that work (W2 at
saturation: 1.27-1.33x the offline wall time; 1.05-1.15x since). Here the loop has a
process to itself, and the server (driver/async_engine.py) only sends requests and reads
each step's deltas.

    core = start_engine_core(config)              # owned by the caller: dies with it
    core.add.remote(request_id, prompt_ids, params)
    async for ref in core.outputs.remote():       # one message per step, for all requests
        deltas, dead = await ref

Invariants: only the loop thread touches the LLMEngine (it is not thread-safe); adds and
aborts reach it through one queue, in the order the caller sent them (an async actor runs
its calls in submission order, and these never await). Every added request gets exactly
one last delta (finished, or with an error), until a fatal error: the message that
carries it (`dead`) is the stream's last, and the server refuses later requests itself.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import uuid
from typing import NamedTuple

from driver.config import EngineConfig
from driver.engine import EngineDeadError, LLMEngine
from driver.lora import LoRARequest
from driver.metrics import RayMetrics
from driver.outputs import RequestOutput
from driver.sampling_params import PoolingParams, SamplingParams

logger = logging.getLogger("raytp.engine_core")


class CompletionDelta(NamedTuple):
    index: int
    token_ids: list[int]  # new since the last delta
    text_start: int  # the text is now text[:text_start] + text (a stop string can cut it back)
    text: str
    logprobs: list | None  # new since the last delta, when requested
    finish_reason: str | None


class OutputDelta(NamedTuple):
    """What one step changed in one request; NamedTuples: a step's message pickles fast."""
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_cached_tokens: int = 0
    error: Exception | None = None  # the request could not be added, or the engine died
    # In a request's first delta, when asked: complete by then (its first token comes after).
    prompt_logprobs: list | None = None
    embedding: list | None = None  # an embedding request's, in its last delta


def make_delta(out: RequestOutput, sent: dict[int, tuple[int, int]]) -> OutputDelta:
    """The change since `sent` (completion index -> tokens and chars already sent), which it
    updates."""
    prompt_logprobs = out.prompt_logprobs if not sent else None
    completions = []
    for c in out.outputs:
        tokens, chars = sent.get(c.index, (0, 0))
        start = min(chars, len(c.text))
        logprobs = c.logprobs[tokens:] if c.logprobs is not None else None
        completions.append(CompletionDelta(c.index, c.token_ids[tokens:], start, c.text[start:], logprobs,
                                           c.finish_reason))
        sent[c.index] = (len(c.token_ids), len(c.text))
    return OutputDelta(out.request_id, completions, out.finished, out.num_cached_tokens,
                       prompt_logprobs=prompt_logprobs, embedding=out.embedding)


class EngineCore:
    """Made with start_engine_core(); the methods are Ray calls."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine: LLMEngine | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._outbox: list[OutputDelta] = []  # under _lock, until outputs() takes it
        self._dead: EngineDeadError | None = None  # sent once with the outbox, then kept
        self._lock = threading.Lock()
        self._notify = lambda: None  # wakes the outputs() reader; set when it starts
        self._sent: dict[str, dict[int, tuple[int, int]]] = {}  # the loop thread's
        self._ray_metrics: RayMetrics | None = None
        self._stop = False

    def start(self, name: str) -> None:
        """Builds the engine (workers, KV cache): its errors reach the caller as they are."""
        self.engine = LLMEngine(self.config)
        self._ray_metrics = RayMetrics(name, os.path.basename(os.path.normpath(self.config.model.model)))
        threading.Thread(target=self._loop, name="raytp-engine-loop", daemon=True).start()

    async def add(self, request_id: str, prompt: list[int], params: SamplingParams | PoolingParams,
                  lora_request: LoRARequest | None = None, priority: int = 0) -> None:
        self._inbox.put(("add", request_id, prompt, params, lora_request, priority))
        self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def outputs(self):
        """The one reader's stream: per message, the deltas of the steps since the last one,
        and the engine's fatal error once it has one."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._notify = lambda: loop.call_soon_threadsafe(ready.set)
        ready.set()  # deltas put before this reader came
        while True:
            await ready.wait()
            ready.clear()
            with self._lock:
                deltas, self._outbox = self._outbox, []
                dead = self._dead
            if deltas or dead is not None:
                yield deltas, dead
            if dead is not None:
                return

    def stats(self) -> dict:
        """Counters for /metrics (read racily from the loop thread's objects)."""
        s = self.engine.scheduler
        bm = s.block_manager
        m = self.engine.metrics
        return {"num_running": s.num_running, "num_waiting": s.num_waiting, "num_swapped": s.num_swapped,
                "num_gpu_blocks": bm.gpu.num_blocks, "num_free_gpu_blocks": bm.num_free_gpu_blocks,
                "num_preemptions_total": s.num_preempted_total,
                "prompt_tokens_total": m.num_prompt_tokens, "generation_tokens_total": m.num_generated_tokens,
                "requests_finished_total": m.num_finished, "engine_steps_total": m.num_steps,
                "engine_step_seconds_total": round(m.step_time_s, 6),
                "device_step_seconds_total": round(m.gpu_time_s, 6)}

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self.engine is not None:
            self.engine.shutdown()

    # ---- the loop thread ----

    def _loop(self) -> None:
        """Steps while there is work. Any error in here (a worker died, a step's outputs could
        not be made, a bug between steps) leaves the scheduler's state unknown, so the engine
        stops: every open request gets the error, and the server's health check replaces it.
        Ending silently would leave requests waiting forever."""
        try:
            while not self._stop:
                self._wake.clear()
                self._drain_inbox()
                self._ray_metrics.publish(self.stats)
                if not self.engine.has_unfinished_work():
                    self._wake.wait(timeout=1.0)
                    continue
                self._send(self._deltas(self.engine.step()))
        except Exception as e:
            if self._stop:  # shutdown() took the workers away mid-step
                return
            logger.exception("engine loop stopped")
            if self.engine.dead is None:
                self.engine.fail(e)
            self._fail_all(e if isinstance(e, EngineDeadError) else EngineDeadError(f"the engine stopped: {e}"))

    def _deltas(self, outputs: list[RequestOutput]) -> list[OutputDelta]:
        deltas = []
        for out in outputs:
            sent = self._sent.get(out.request_id)
            if sent is not None:
                deltas.append(make_delta(out, sent))
                if out.finished:
                    del self._sent[out.request_id]
        return deltas

    def _drain_inbox(self) -> None:
        rejected = []
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "add":
                error = self._start_request(*msg[1:])
                if error is not None:
                    rejected.append(OutputDelta(msg[1], [], True, error=error))
            elif self._sent.pop(msg[1], None) is not None:
                self.engine.abort_request(msg[1])
        self._send(rejected)

    def _start_request(self, request_id: str, prompt: list[int], params: SamplingParams | PoolingParams,
                       lora_request: LoRARequest | None, priority: int) -> Exception | None:
        try:
            if self.engine.dead is not None:
                raise EngineDeadError(f"the engine stopped earlier: {self.engine.dead}")
            self.engine.add_request(prompt, params, request_id, lora_request, priority)
        except Exception as e:  # bad input the server did not catch, or a dead engine
            return e
        self._sent[request_id] = {}
        return None

    def _fail_all(self, error: EngineDeadError) -> None:
        deltas = [OutputDelta(request_id, [], True, error=error) for request_id in self._sent]
        self._sent.clear()
        with self._lock:
            self._outbox.extend(deltas)
            self._dead = error
        self._notify()

    def _send(self, deltas: list[OutputDelta]) -> None:
        if deltas:
            with self._lock:
                self._outbox.extend(deltas)
            self._notify()


def start_engine_core(config: EngineConfig):
    """The engine core actor, on this node (it talks to its caller every step), started:
    its workers are up and its KV cache sized. Raises the engine's own error if not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    # No CPU reserved: like the workers' coordinator before it, it holds no device, and a
    # replica that could be placed can always start its core beside it.
    name = f"raytp-core-{uuid.uuid4().hex[:8]}"
    core = ray.remote(EngineCore).options(
        num_cpus=0, name=name,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        # Ray warns of any blocking ray.get in an async actor; here they are the loop
        # thread's waits on its workers, off the event loop by design.
        runtime_env={"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}}).remote(config)
    try:
        ray.get(core.start.remote(name))
    except ray.exceptions.RayTaskError as e:
        ray.kill(core)
        raise e.cause from None
    return core


__all__ = ["CompletionDelta", "EngineCore", "OutputDelta", "make_delta", "start_engine_core"]
