"""The engine loop: schedule, broadcast to the workers, update, detokenize, emit.

    submit(scheduler.schedule())               # every TP rank runs it; rank 0 replies
    if async_scheduling:                       # (and on, until steps_in_flight, 2, are queued)
        submit(scheduler.schedule())           # step N+1, queued while step N runs
    so, result = collect(oldest step)
    groups = scheduler.update_from_output(so, result)
    return [make_output(g) for g in groups]    # detokenize, stop strings, outputs

With async scheduling the driver's work (update, detokenize, schedule) and the Ray round
trip overlap the GPU's: the workers find their next step already queued.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass

from driver.config import EngineConfig
from driver.detokenizer import IncrementalDetokenizer, find_stop
from driver.guided import set_vocab, structured_regex, token_bytes
from driver.lora import LoRARequest, check_adapter
from driver.metrics import EngineMetrics
from driver.outputs import CompletionOutput, RequestOutput
from driver.protocol import ModelRunnerOutput
from driver.sampling_params import PoolingParams, SamplingParams, check_token_ids_in_vocab
from driver.scheduler import Scheduler
from driver.sequence import Sequence, SequenceGroup, SequenceStatus
from driver.tokenizer import encode_prompt, load_tokenizer

logger = logging.getLogger("raytp.engine")


class EngineDeadError(RuntimeError):
    """A worker failed; this engine can serve no more requests."""


@dataclass
class _TextState:
    detok: IncrementalDetokenizer
    num_detokenized: int = 0  # output tokens already turned into text
    text: str = ""  # the completion's text so far, cut at a stop string


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from executor.ray_executor import RayExecutor  # Ray only when an engine is made

        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer)
        self.executor = RayExecutor(config)
        vocab = token_bytes(self.tokenizer)  # structured outputs: the driver and rank 0 read token bytes
        set_vocab(vocab)
        self.executor.run_all("set_guided_vocab", vocab)
        eos = eos_token_ids(config, self.tokenizer)
        self.scheduler = Scheduler(config.scheduler, config.cache, config.model.max_model_len,
                                   self.executor.num_gpu_blocks, self.executor.num_cpu_blocks,
                                   eos_token_ids=eos,
                                   max_loras=config.lora.max_loras if config.lora.enable_lora else 0)
        self.metrics = EngineMetrics()
        self.groups: dict[str, SequenceGroup] = {}
        self.texts: dict[str, _TextState] = {}
        self._ids = itertools.count()
        self._in_flight: deque = deque()  # (SchedulerOutput, executor handle), oldest first
        s = config.scheduler
        self._max_in_flight = s.steps_in_flight if s.async_scheduling else 1
        self.dead: Exception | None = None
        self._loras: dict[int, LoRARequest] = {}  # adapters seen, by lora_int_id

    # ---- requests ----

    def add_request(self, prompt: str | list[int], params: SamplingParams | PoolingParams | None = None,
                    request_id: str | None = None, lora_request: LoRARequest | None = None,
                    priority: int = 0) -> str:
        """Generate (SamplingParams) or embed (PoolingParams: the prompt's last hidden state),
        with the base weights or an adapter (lora_request, with enable_lora); priority (lower
        first) with scheduling_policy "priority"."""
        self._check_alive()
        self._check_lora(lora_request)
        pooling = params if isinstance(params, PoolingParams) else None
        if pooling is not None:  # one forward over the prompt; its one sampled token is dropped
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, token_ids = prompt, encode_prompt(self.tokenizer, prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        vocab = self.config.model.arch.vocab_size
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.truncate_prompt_tokens is not None and len(token_ids) > params.truncate_prompt_tokens:
            text, token_ids = None, token_ids[-params.truncate_prompt_tokens:]  # its last tokens, as vLLM
        check_token_ids_in_vocab(params, vocab)
        if params.bad_words:
            params = dataclasses.replace(params, bad_words_token_ids=bad_words_token_ids(self.tokenizer, params.bad_words))
        if params.guided_choice is not None:  # each choice as the tokenizer spells it
            params = dataclasses.replace(params, choice_token_ids=tuple(
                tuple(self.tokenizer.encode(c, add_special_tokens=False)) for c in params.guided_choice))
        if params.guided_regex is not None or params.guided_json is not None or params.guided_grammar is not None:
            params = dataclasses.replace(params, structured_regex=structured_regex(params))
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        group = SequenceGroup.create(request_id, text, token_ids, params)
        group.pooling_params, group.lora_request, group.priority = pooling, lora_request, int(priority)
        group.seqs[0].lora_id = lora_request.lora_int_id if lora_request else 0
        self.scheduler.add_request(group)  # raises on a prompt longer than max_model_len
        self.groups[request_id] = group
        return request_id

    def _check_lora(self, lora: LoRARequest | None) -> None:
        if lora is None:
            return
        c = self.config.lora
        if not c.enable_lora:
            raise ValueError("a LoRA request needs an engine started with enable_lora=True (--enable-lora)")
        known = self._loras.get(lora.lora_int_id)
        if known is not None and known.lora_path != lora.lora_path:
            raise ValueError(f"lora_int_id {lora.lora_int_id} is already {known.lora_path!r}; give "
                             f"{lora.lora_path!r} its own id")
        if known is None:
            check_adapter(lora.lora_path, c.max_lora_rank)  # here: a bad adapter fails its own request
            self._loras[lora.lora_int_id] = lora

    def abort_request(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is not None:
            self.scheduler.abort_request(request_id)
            for seq in group.seqs:
                self.texts.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_unfinished_work(self) -> bool:
        """Requests left, or steps still in flight (those of requests aborted meanwhile too)."""
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        """Run (at least) one step and return the outputs of the oldest one in flight."""
        self._check_alive()
        start = time.perf_counter()
        while len(self._in_flight) < self._max_in_flight:
            so = self.scheduler.schedule()
            if so.is_empty:
                break
            self._in_flight.append((so, self._call(self.executor.submit, so)))
        if not self._in_flight:
            return []
        so, handle = self._in_flight.popleft()
        submitted = time.perf_counter()
        result = self._call(self.executor.collect, handle)
        collected = time.perf_counter()
        groups = self.scheduler.update_from_output(so, result)
        self._record_prompt_results(result)
        outputs = [self._make_output(g) for g in groups]
        end = time.perf_counter()
        self.metrics.record_step(so, result, end - start, self.scheduler)
        self.metrics.record_driver({"schedule_submit_s": submitted - start, "collect_s": collected - submitted,
                                    "update_outputs_s": end - collected})
        return outputs

    def _call(self, fn, arg):
        try:
            return fn(arg)
        except Exception as e:
            self.fail(e)
            raise EngineDeadError(f"the engine stopped: {e}") from e

    def _record_prompt_results(self, result: ModelRunnerOutput) -> None:
        """Prompt logprobs and embeddings. Only a request's first sequence computes them, and its
        seq_id is the request id; a request aborted meanwhile is gone from self.groups."""
        for seq_id, (start, dicts) in result.prompt_logprobs.items():
            if seq_id in self.groups:
                self.groups[seq_id].prompt_logprobs[start:start + len(dicts)] = dicts
        for seq_id, embedding in result.pooled.items():
            if seq_id in self.groups:
                self.groups[seq_id].embedding = embedding

    def _make_output(self, group: SequenceGroup) -> RequestOutput:
        # An embedding request's one sampled token is an artifact of running its prompt: not an output.
        completions = [] if group.pooling_params else [self._completion(group, seq) for seq in group.seqs]
        finished = group.is_finished
        if finished:
            self.groups.pop(group.request_id, None)
            for seq in group.seqs:
                self.texts.pop(seq.seq_id, None)
            self.metrics.record_finished(group)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions,
                             finished, group.seqs[0].num_cached_tokens, prompt_logprobs=group.prompt_logprobs,
                             embedding=group.embedding)

    def _completion(self, group: SequenceGroup, seq: Sequence) -> CompletionOutput:
        params = group.sampling_params
        text = self._detokenize(seq, params, group.stop_token_ids) if params.detokenize else ""
        reason = seq.status.value if seq.status.is_finished else None
        logprobs = list(seq.output_logprobs) if params.logprobs is not None else None
        # output_token_ids is a fresh slice: the output never aliases the sequence's list.
        return CompletionOutput(seq.seq_index, text, seq.output_token_ids, reason, logprobs)

    def _detokenize(self, seq: Sequence, params: SamplingParams, stop_token_ids) -> str:
        """The completion's text so far; ends the sequence at a stop string (excluded). A stop
        token that ended it is not text either (vLLM v1's), even where it is not special."""
        state = self.texts.get(seq.seq_id)
        if state is None:
            state = self.texts[seq.seq_id] = _TextState(IncrementalDetokenizer(
                self.tokenizer, seq.token_ids[:seq.num_prompt_tokens], params.skip_special_tokens))
        new_ids = seq.token_ids[seq.num_prompt_tokens + state.num_detokenized:]
        if not new_ids or seq.status == SequenceStatus.FINISHED_ABORTED:
            return state.text
        state.num_detokenized += len(new_ids)
        if seq.status == SequenceStatus.FINISHED_STOPPED and new_ids[-1] in stop_token_ids \
                and not params.include_stop_str_in_output:
            new_ids = new_ids[:-1]
        delta = state.detok.step(new_ids) if new_ids else ""
        state.text += delta
        if params.stop and delta:
            state.text, stopped = find_stop(state.text, params.stop, len(delta), params.include_stop_str_in_output)
            if stopped:
                self.scheduler.finish_seq(seq, SequenceStatus.FINISHED_STOPPED)
        return state.text

    # ---- lifecycle ----

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped earlier: {self.dead}")

    def fail(self, error: Exception) -> None:
        """Stop serving: the workers go, and every later call raises EngineDeadError."""
        self.dead = error
        logger.error("engine failed: %s", error)
        self.executor.shutdown()

    def shutdown(self) -> None:
        self.executor.shutdown()


def bad_words_token_ids(tokenizer, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """vLLM's spellings of bad words: each word alone, and after a space where that starts with
    another token and takes as many (so "ban" also bans " ban" mid-sentence)."""
    if tokenizer is None:
        raise ValueError("bad_words need the model's tokenizer, and this engine has none")
    out = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if not alone:  # (nothing the tokenizer spells: nothing to ban)
            continue
        out.append(tuple(alone))
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(tuple(spaced))
    return tuple(out)


def eos_token_ids(config: EngineConfig, tokenizer) -> tuple[int, ...]:
    """The ids that end a sequence: the model config's, else the tokenizer's EOS."""
    if config.model.arch.eos_token_ids:
        return tuple(config.model.arch.eos_token_ids)
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
