"""Turns one SchedulerOutput into input tensors, runs the model shard, samples on rank 0.

Each worker keeps a copy of every live sequence's state (token ids, block table,
computed count), created from a NewRequestData and advanced by the deltas of
CachedRequestData. The batch order is the scheduler's: decodes first (one token
each), then prefill chunks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from driver.protocol import ModelRunnerOutput, SchedulerOutput
from driver.sampling_params import SamplingParams
from workers.attention import AttentionMetadata
from workers.cuda_graphs import DecodeGraphs
from workers.staging import StagingBuffer
from workers.sampler import Sampler, SamplingRow


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


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled]: the last scheduled token of each sampling seq
    sample_req_ids: list[str]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list, block_size: int,
                 device: torch.device, rank: int, seed: int = 0, max_model_len: int | None = None):
        self.model = model
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
        self.staging = StagingBuffer(device)
        self.graphs: DecodeGraphs | None = None  # set by capture_graphs (GPU, not enforce_eager)

    def update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in so.new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.token_ids), new.num_prompt_tokens, list(new.block_ids),
                new.num_computed_tokens, new.sampling_params, new.seq_index, tuple(new.stop_token_ids))
        for delta in so.cached_reqs:
            state = self.requests[delta.req_id]
            state.token_ids.extend(delta.new_token_ids)
            state.block_ids.extend(delta.new_block_ids)
            state.num_computed_tokens = delta.num_computed_tokens

    def prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        """The step's inputs, built on the host and moved to the device in one copy."""
        bs = self.block_size
        states = [self.requests[r] for r in so.req_ids]
        input_ids, positions, slots, sample_rows, sample_ids = [], [], [], [], []
        context_lens, query_start, num_decodes = [], [0], 0
        for state, n in zip(states, so.num_scheduled_tokens):
            start = state.num_computed_tokens
            end = start + n
            pos = np.arange(start, end, dtype=np.int64)
            table = np.asarray(state.block_ids, dtype=np.int64)
            input_ids.append(np.asarray(state.token_ids[start:end], dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            context_lens.append(end)
            query_start.append(query_start[-1] + n)
            if n == 1 and num_decodes == len(context_lens) - 1:  # still in the leading decodes
                num_decodes += 1
            if end == len(state.token_ids):  # reached the newest token: its logits are sampled
                sample_rows.append(query_start[-1] - 1)
                sample_ids.append(state.req_id)
        block_tables = np.zeros((len(states), max(len(s.block_ids) for s in states)), dtype=np.int32)
        for i, state in enumerate(states):
            block_tables[i, :len(state.block_ids)] = state.block_ids
        ids, pos, slot_mapping, rows, tables, ctx, qsl = self.staging.to_device([
            np.concatenate(input_ids), np.concatenate(positions),
            np.concatenate(slots), np.asarray(sample_rows, dtype=np.int64), block_tables,
            np.asarray(context_lens, dtype=np.int32), np.asarray(query_start, dtype=np.int32)])
        meta = AttentionMetadata(slot_mapping=slot_mapping, block_tables=tables, context_lens=ctx,
                                 query_start_loc=qsl, num_decodes=int(num_decodes),
                                 max_query_len=max(so.num_scheduled_tokens),
                                 max_context_len=self.context_bound or max(context_lens))
        return StepInputs(ids, pos, meta, rows, sample_ids)

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Decode CUDA graphs over the (already allocated) KV cache."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, max_model_len,
                                   self.block_size, self.device)
        self.graphs.capture()

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        clock = _Clock(self.device)
        self.update_states(so)
        if not so.req_ids:
            return ModelRunnerOutput(so.step_id) if self.rank == 0 else None
        inputs = self.prepare_inputs(so)
        clock.lap("prepare_s")
        hidden = self._forward(inputs)  # [T, H]
        clock.lap("forward_s", sync=True)
        tokens, logprobs = [], []
        if inputs.sample_req_ids:
            # Every rank joins the logits all-gather; only rank 0 samples and replies.
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_sampled, vocab]
            if self.rank == 0:
                rows = [self._sampling_row(self.requests[r]) for r in inputs.sample_req_ids]
                tokens, logprobs = self.sampler(logits, rows)
            clock.lap("sample_s", sync=True)
        if self.rank != 0:
            return None
        return ModelRunnerOutput(so.step_id, inputs.sample_req_ids if tokens else [], tokens,
                                 logprobs, clock.timings)

    @staticmethod
    def _sampling_row(state: CachedRequestState) -> SamplingRow:
        return SamplingRow(state.sampling_params, state.seq_index, state.token_ids,
                           state.num_prompt_tokens, state.stop_token_ids)


class _Clock:
    """Per-step phase timings for metrics; `sync` waits for the device so that a phase
    includes its GPU time (the sampler syncs anyway, so this costs little)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str, sync: bool = False) -> None:
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.timings["worker_step_s"] = now - self.start
        self.last = now
