"""Turns one SchedulerOutput into input tensors, runs the model shard, samples on rank 0.

Each worker keeps a copy of every live sequence's state (token ids, block table,
computed count), created from a NewRequestData and advanced by the deltas of
CachedRequestData and by the tokens it samples itself. The batch order is the
scheduler's: decodes first (one token each), then prefill chunks.

On GPU the device never waits for the host between steps: `execute_model(step N+1)`
queues N+1's forward first and only then waits for step N's sampled tokens, whose
output it returns (`flush` returns the last one). Until they arrive on the host, N's
tokens are PLACEHOLDERs in the states; a decode of N+1 that reads one gets it on the
device, from N's token tensor (rank 0 broadcasts it to the other ranks). A CPU worker
computes synchronously and returns each step's output from the step's own call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from driver.protocol import ModelRunnerOutput, SchedulerOutput
from driver.sampling_params import PoolingParams, SamplingParams
from workers import parallel_state
from ops.prefill_attention import PrefillPlan, flash_supported, plan_prefill
from workers.attention import AttentionMetadata
from workers.cuda_graphs import DecodeGraphs
from workers.input_batch import (PLACEHOLDER, BlockTables, chunk_rows, decode_rows, merge_rows,
                                 num_leading_decodes)
from workers.lora import LoRAManager
from workers.prompt_logprobs import (PromptLogprobs, PromptLogprobsPlan, compute_prompt_logprobs,
                                     plan_prompt_logprobs, prompt_logprobs_to_host, wants_prompt_logprobs)
from workers.staging import StagingBuffer
from workers.sampler import Sampler, SamplerOutput, SamplingRow, to_host


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams
    seq_index: int
    stop_token_ids: tuple[int, ...]
    pending_index: int = -1  # with a PLACEHOLDER last: its row in the step's token tensor
    row: int = -1  # its row in the runner's BlockTables
    sampling_row: SamplingRow | None = None  # rank 0's view for the sampler; shares token_ids
    pooling_params: PoolingParams | None = None  # an embedding request
    lora_id: int = 0  # its adapter's lora_int_id (0: the base weights)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled]: the last scheduled token of each sampling seq
    sample_req_ids: list[str]
    samples_every_token: bool = False  # logits_indices is arange(num_tokens) (decode-only steps)
    graph: tuple[int, bool] | None = None  # a decode-only step run by this (bucket, LoRA) CUDA graph
    prompt_plan: PromptLogprobsPlan | None = None  # rows whose prompt logprobs were asked for
    pooling: bool = False  # a sampling sequence is an embedding request: its hidden row is returned


@dataclass
class _StepInFlight:
    """A step whose sampled tokens are still on their way to the host."""

    step_id: int
    states: list[CachedRequestState]  # the sampling sequences, in order
    tokens: torch.Tensor | None  # [num_sampled] on the device, on every rank
    host: SamplerOutput | None  # its copy in (pinned) host memory; logprobs on rank 0 only
    rows: list[SamplingRow]  # rank 0: what was sampled (for the logprob dicts)
    timer: "_StepTimer"
    prompt: PromptLogprobs | None = None  # rank 0, in host memory
    pooled: tuple[list[str], torch.Tensor] | None = None  # rank 0: embedding requests' vectors, host


def _fill_placeholders(input_ids: torch.Tensor, rows: torch.Tensor, src: torch.Tensor,
                       prev: _StepInFlight | None) -> None:
    """input_ids[rows] = the previous step's sampled tokens[src], still on the device. rows
    ascend, so as many rows as inputs means every row: one kernel instead of two."""
    assert prev is not None and prev.tokens is not None, "a placeholder with no step in flight"
    if rows.shape[0] == input_ids.shape[0]:
        torch.index_select(prev.tokens, 0, src, out=input_ids)
    else:
        input_ids.index_copy_(0, rows, prev.tokens.index_select(0, src))


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list, block_size: int,
                 device: torch.device, rank: int, seed: int = 0, max_model_len: int | None = None,
                 lora: LoRAManager | None = None):
        self.model = model
        self.lora = lora  # with enable_lora
        # On GPU, decode attention is told max_model_len as its context bound in eager steps
        # too: the kernel then splits contexts exactly as inside the CUDA graphs, so eager and
        # graph steps compute bit-identical results.
        self.context_bound = max_model_len if device.type == "cuda" else None
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.rank = rank
        self.sampler = Sampler(seed) if rank == 0 else None
        self.requests: dict[str, CachedRequestState] = {}
        self.block_tables = BlockTables()  # a row per entry of self.requests
        self.staging = StagingBuffer(device)
        self.graphs: DecodeGraphs | None = None  # set by capture_graphs (GPU, not enforce_eager)
        self._prev: _StepInFlight | None = None  # queued, its output not yet returned
        self._returned_at: float | None = None  # when execute_model last returned
        self._prompt_lp_ids: set[str] = set()  # sequences with prompt logprobs still to compute
        self._pooling_ids: set[str] = set()  # live embedding requests
        key_cache = kv_caches[0][0] if kv_caches else None
        # Plan the prefill gather on the host (no per-layer host syncs) where flash runs it.
        self.plan_prefill = key_cache is not None and flash_supported(key_cache.dtype, key_cache.shape[-1],
                                                                      device)

    def update_states(self, so: SchedulerOutput) -> None:
        for request, slot in so.lora_loads:  # (the driver sends them only with enable_lora)
            self.lora.load(request, slot)
        for req_id in so.finished_req_ids:
            state = self.requests.pop(req_id, None)
            self._prompt_lp_ids.discard(req_id)
            self._pooling_ids.discard(req_id)
            if state is not None:
                self.block_tables.remove(state.row)
        for new in so.new_reqs:
            old = self.requests.get(new.req_id)
            if old is not None:  # (the protocol finishes it first; never leak its row)
                self.block_tables.remove(old.row)
            state = self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.token_ids), new.num_prompt_tokens, list(new.block_ids),
                new.num_computed_tokens, new.sampling_params, new.seq_index, tuple(new.stop_token_ids),
                row=self.block_tables.add(new.block_ids))
            state.sampling_row = SamplingRow(state.sampling_params, state.seq_index, state.token_ids,
                                             state.num_prompt_tokens, state.stop_token_ids)
            if wants_prompt_logprobs(new.sampling_params, new.seq_index):
                self._prompt_lp_ids.add(new.req_id)
            if new.pooling_params is not None:
                state.pooling_params = new.pooling_params
                self._pooling_ids.add(new.req_id)
            if new.lora_request is not None:  # (loaded by now: the driver schedules it only so)
                state.lora_id = new.lora_request.lora_int_id
        for delta in so.cached_reqs:
            state = self.requests[delta.req_id]
            if delta.new_block_ids:
                state.block_ids.extend(delta.new_block_ids)
                self.block_tables.append(state.row, delta.new_block_ids)
            state.num_computed_tokens = delta.num_computed_tokens

    def prepare_inputs(self, so: SchedulerOutput, prev: _StepInFlight | None) -> StepInputs:
        """The step's inputs, built on the host and moved to the device in one copy."""
        bs, num_scheduled = self.block_size, so.num_scheduled_tokens
        states = [self.requests[r] for r in so.req_ids]
        table_rows = np.array([s.row for s in states], dtype=np.intp)
        num_decodes = num_leading_decodes(num_scheduled)
        prompt_plan = self._plan_prompt_logprobs(so, states)
        pooling = bool(self._pooling_ids) and not self._pooling_ids.isdisjoint(so.req_ids)
        lora_slots = self.lora.slots_of(states) if self.lora is not None else None
        if num_decodes == len(states) and self.graphs is not None and prompt_plan is None and not pooling:
            bucket = self.graphs.bucket(num_decodes, lora=lora_slots is not None)
            if bucket is not None:
                return self._prepare_graph_step(states, table_rows, bucket, prev, lora_slots)
        if self.lora is not None:
            self.lora.set_groups(lora_slots, num_scheduled)
        parts = []
        if num_decodes:  # the leading decodes, all at once
            parts.append(decode_rows(states[:num_decodes], table_rows[:num_decodes], self.block_tables, bs))
        if num_decodes < len(states):  # prefill chunks, one by one
            parts.append(chunk_rows(states[num_decodes:], num_scheduled[num_decodes:], bs))
        r = merge_rows(parts)
        query_start = np.zeros(len(states) + 1, dtype=np.int32)
        np.cumsum(r.query_lens, out=query_start[1:])
        arrays = [r.input_ids, r.positions, r.slots, r.sample_rows, self.block_tables.gather(table_rows),
                  r.context_lens, query_start]
        prefill = states[num_decodes:] if self.plan_prefill else []
        planned = plan_prefill(num_scheduled[num_decodes:], r.context_lens[num_decodes:].tolist(),
                               [s.block_ids for s in prefill], bs) if prefill else []
        arrays += planned
        if len(r.gather_rows):
            arrays += [r.gather_rows, r.gather_src]
        ids, pos, slot_mapping, rows, tables, ctx, qsl, *extra = self.staging.to_device(arrays)
        plan = None
        if prefill:
            cu_q, cu_k, *slots = extra[:len(planned)]  # kv_slots only where a chunk has cached context
            plan = PrefillPlan(cu_q, cu_k, slots[0] if slots else None, max_q=max(num_scheduled[num_decodes:]),
                               max_k=int(r.context_lens[num_decodes:].max()))
            extra = extra[len(planned):]
        if extra:
            _fill_placeholders(ids, extra[0], extra[1], prev)
        meta = AttentionMetadata(slot_mapping=slot_mapping, block_tables=tables, context_lens=ctx,
                                 query_start_loc=qsl, num_decodes=int(num_decodes),
                                 max_query_len=max(num_scheduled),
                                 max_context_len=self.context_bound or int(r.context_lens.max()), prefill=plan)
        return StepInputs(ids, pos, meta, rows, r.sample_ids, len(r.sample_rows) == len(r.input_ids),
                          prompt_plan=prompt_plan, pooling=pooling)

    def _plan_prompt_logprobs(self, so: SchedulerOutput, states: list[CachedRequestState]
                              ) -> PromptLogprobsPlan | None:
        if not self._prompt_lp_ids or self._prompt_lp_ids.isdisjoint(so.req_ids):
            return None  # (the common step: no set lookups per sequence)
        plan = plan_prompt_logprobs(states, so.num_scheduled_tokens, self.device)
        for s, n in zip(states, so.num_scheduled_tokens):
            if s.num_computed_tokens + n >= s.num_prompt_tokens - 1:  # its prompt is done
                self._prompt_lp_ids.discard(s.req_id)
        return plan

    def _prepare_graph_step(self, states: list[CachedRequestState], table_rows: np.ndarray, bucket: int,
                            prev: _StepInFlight | None, lora_slots: np.ndarray | None) -> StepInputs:
        """A decode-only step for bucket's CUDA graph (its LoRA variant with lora_slots): its
        inputs go straight into the buffer the graph reads, by one copy (and one gather of the
        tokens still on the device)."""
        r = decode_rows(states, table_rows, self.block_tables, self.block_size)
        r.lora_slots = lora_slots
        x, b = self.graphs.inputs[bucket], len(states)
        x.stage(self.staging, r, self.block_tables.gather(table_rows))
        if len(r.gather_rows):
            n = len(r.gather_rows)
            _fill_placeholders(x.input_ids[:b], x.gather_rows[:n], x.gather_src[:n], prev)
        return StepInputs(x.input_ids[:b], x.positions[:b], x.meta(b, self.graphs.max_model_len),
                          x.sample_rows[:len(r.sample_rows)], r.sample_ids, len(r.sample_rows) == b,
                          (bucket, lora_slots is not None))

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Decode CUDA graphs over the (already allocated) KV cache."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, max_model_len,
                                   self.block_size, self.device, lora=self.lora is not None)
        self.graphs.capture()

    def _logits(self, inputs: StepInputs) -> tuple[torch.Tensor | None, PromptLogprobs | None,
                                                   torch.Tensor | None]:
        """Run the step's forward -> logits [num_sampled, vocab] float32 (None: none sample),
        the prompt logprobs asked for (rank 0), and the sampled rows' hidden states [num_sampled,
        hidden] when an embedding request is among them."""
        if inputs.graph is not None:  # the graph ends in the logits of every row
            logits = self.graphs.run(inputs.meta.num_seqs, *inputs.graph)
            if not inputs.sample_req_ids:
                return None, None, None
            return (logits if inputs.samples_every_token else logits[inputs.logits_indices]), None, None
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)  # [T, H]
        prompt = None
        if inputs.prompt_plan is not None:
            prompt = compute_prompt_logprobs(self.model, hidden, inputs.prompt_plan, self.rank)
        if not inputs.sample_req_ids:
            return None, prompt, None
        # Every rank joins the logits all-gather; only rank 0 samples.
        if not inputs.samples_every_token:  # (else the gather is a copy of all of it)
            hidden = hidden[inputs.logits_indices]
        return self.model.compute_logits(hidden), prompt, hidden if inputs.pooling else None

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> list[ModelRunnerOutput] | None:
        """Queue step `so` on the device; return the outputs of the steps finished now: the
        one queued before it (GPU) or this one (CPU). None on ranks other than 0."""
        timer = _StepTimer(self.device)
        if self._returned_at is not None:  # idle since the last call: the driver's and Ray's leg
            timer.timings["call_gap_s"] = timer.start - self._returned_at
        self.update_states(so)
        prev, self._prev = self._prev, None
        logits, inputs, prompt, hidden = None, None, None, None
        if so.req_ids:
            inputs = self.prepare_inputs(so, prev)
            timer.lap("prepare_s")
            logits, prompt, hidden = self._logits(inputs)
            timer.lap("forward_s")
        outs = [self._finish(prev)]  # this step is queued: now wait for the previous one's tokens
        timer.lap("wait_prev_s")  # (the GPU's time, not the host's: kept out of sample_s)
        self._prev = self._sample(so.step_id, inputs, logits, timer, prompt, hidden)
        if self.device.type == "cpu":  # nothing to overlap: answer now
            outs.append(self._finish(self._prev))
            self._prev = None
        self._returned_at = time.perf_counter()
        return self._rank0([o for o in outs if o is not None])

    def flush(self) -> list[ModelRunnerOutput] | None:
        """The output of the last queued step, if not returned yet. None on other ranks."""
        prev, self._prev = self._prev, None
        out = self._finish(prev)
        self._returned_at = time.perf_counter()
        return self._rank0([out] if out is not None else [])

    def _rank0(self, outs: list) -> list | None:
        return outs if self.rank == 0 else None

    def _sample(self, step_id: int, inputs: StepInputs | None, logits: torch.Tensor | None,
                timer: "_StepTimer", prompt: PromptLogprobs | None = None,
                hidden: torch.Tensor | None = None) -> _StepInFlight:
        """Sample (rank 0), share the tokens with every rank, start their copy (and that of
        the prompt logprobs and embeddings) to the host, before the step's end event."""
        ids = inputs.sample_req_ids if inputs is not None else []
        states = [self.requests[r] for r in ids]
        if prompt is not None:
            prompt = PromptLogprobs(prompt.plan, *map(_to_host, (prompt.logprobs, prompt.top_logprobs,
                                                                 prompt.top_ids)))
        pooled = self._pool(states, hidden) if hidden is not None and self.rank == 0 else None
        if not ids:
            timer.end()
            return _StepInFlight(step_id, [], None, None, [], timer, prompt)
        rows = [s.sampling_row for s in states] if self.rank == 0 else []
        if self.rank == 0:
            sampled = self.sampler.sample(logits, rows)
        else:
            sampled = SamplerOutput(torch.empty(len(ids), dtype=torch.long, device=self.device), [])
        parallel_state.broadcast_from_rank0(sampled.tokens)
        for i, state in enumerate(states):
            state.token_ids.append(PLACEHOLDER)
            state.pending_index = i
        host = sampled.replace_tensors([_to_host(t) for t in sampled.tensors()])
        timer.lap("sample_s")
        timer.end()
        return _StepInFlight(step_id, states, sampled.tokens, host, rows, timer, prompt, pooled)

    @staticmethod
    def _pool(states: list[CachedRequestState], hidden: torch.Tensor) -> tuple[list[str], torch.Tensor] | None:
        """The embedding requests among the sampling rows: (ids, their vectors [n, hidden] float32,
        on their way to the host). hidden: the rows' final hidden states (after the final norm)."""
        rows = [i for i, s in enumerate(states) if s.pooling_params is not None]
        if not rows:
            return None
        vectors = hidden[rows].float()
        unit = [states[i].pooling_params.normalize for i in rows]
        if any(unit):
            norms = vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            scale = torch.tensor(unit, device=vectors.device).unsqueeze(1)
            vectors = torch.where(scale, vectors / norms, vectors)
        return [states[i].req_id for i in rows], _to_host(vectors)

    def _finish(self, step: _StepInFlight | None) -> ModelRunnerOutput | None:
        """Wait for a step's tokens on the host, fill its placeholders; rank 0's output."""
        if step is None:
            return None
        timings = step.timer.wait()
        tokens, logprobs = [], []
        if step.states:
            if self.rank == 0:
                tokens, logprobs = to_host(step.host, step.rows)
            else:
                tokens = step.host.tokens.tolist()
            for state, token in zip(step.states, tokens):
                # Still the newest: the next step's tokens are appended only after this.
                assert state.token_ids[-1] == PLACEHOLDER
                state.token_ids[-1] = token
        if self.rank != 0:
            return None
        prompt = prompt_logprobs_to_host(step.prompt) if step.prompt is not None else {}
        pooled = dict(zip(step.pooled[0], step.pooled[1].tolist())) if step.pooled is not None else {}
        return ModelRunnerOutput(step.step_id, [s.req_id for s in step.states], tokens, logprobs, prompt, pooled,
                                 timings)


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A host copy of t, queued on the stream (pinned memory: the copy is asynchronous)."""
    if t is None or t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


class _StepTimer:
    """Per-step timings for metrics, without syncing the host: host phases by the clock,
    the step's span on the device (its first input copy to its last copy out) by events.
    `gpu_step_s` is that span; on the CPU it is the host time of the whole step."""

    def __init__(self, device: torch.device):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.events = None
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now

    def end(self) -> None:
        self.timings["worker_step_s"] = time.perf_counter() - self.start  # host time, wait_prev_s included
        if self.events is not None:
            self.events[1].record()

    def wait(self) -> dict[str, float]:
        if self.events is None:
            self.timings["gpu_step_s"] = self.timings["worker_step_s"]
        else:
            self.events[1].synchronize()
            self.timings["gpu_step_s"] = self.events[0].elapsed_time(self.events[1]) / 1e3
        return self.timings
