"""Continuous batching under a token budget (vLLM v1 style), one step at a time.

The unit of scheduling is a Sequence; its group (request) gives the sampling params,
the arrival order, the priority and the n > 1 fork. Queues, each kept sorted by
(priority, arrival, seq_index), where priority (lower first, vLLM's) is 0 unless
scheduling_policy is "priority":
  running  - has GPU blocks (or is about to get them); may be skipped for budget
  swapped  - its blocks are on the CPU
  waiting  - holds no blocks (never admitted, or preempted by recompute)

A step: (1) running sequences, FCFS, preempting the latest arrival when blocks run out;
(2) if nothing was preempted, swapped sequences come back in; (3) if nothing was
preempted and nothing is left swapped, waiting sequences are admitted, FCFS, stopping
at the first that does not fit (blocks, max_num_seqs, or with LoRA an adapter slot).
The batch lists decodes first, then prefill chunks.

Worker contract (see driver/protocol.py): per step, forget `finished_req_ids` first,
then register `new_reqs`, apply `cached_reqs` deltas, then do the block operations in
the order swap_out, swap_in, copy, and only then run the forward. A sequence samples
a token iff num_computed_tokens + num_scheduled == len(token_ids) after the deltas, and
every worker appends that token to its own copy (the driver never sends it back).

Async scheduling: schedule() advances num_computed_tokens at once, and a sequence that
will sample counts the token as pending (`num_pending`) until update_from_output brings
it. So step N+1 can be scheduled while step N runs: a decode whose input token is still
pending is scheduled as usual (the workers already hold that token). At most K steps are
in flight (the engine's steps_in_flight, 2 by default), and step N is always updated
before step N+K is scheduled: a sequence has at most K tokens pending.
"""
from __future__ import annotations

import bisect
import time

from driver.block_manager import BlockManager
from driver.config import CacheConfig, SchedulerConfig
from driver.lora import LoRASlots
from driver.protocol import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from driver.sampling_params import SamplingParams
from driver.sequence import Sequence, SequenceGroup, SequenceStatus

_S = SequenceStatus


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 max_model_len: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 eos_token_ids: tuple[int, ...] = (), max_loras: int = 0):
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        if not scheduler_config.enable_chunked_prefill and \
                scheduler_config.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens "
                f"({scheduler_config.max_num_batched_tokens}) must be >= max_model_len "
                f"({max_model_len}), else a long prompt could never be scheduled")
        self.block_manager = BlockManager(cache_config.block_size, num_gpu_blocks, num_cpu_blocks,
                                          cache_config.enable_prefix_caching)
        self.lora_slots = LoRASlots(max_loras) if max_loras else None  # with enable_lora
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self._groups: dict[str, SequenceGroup] = {}  # unfinished requests
        self._group_of: dict[str, SequenceGroup] = {}  # live seq id -> its group
        self._keys: dict[str, tuple[int, int, int]] = {}  # live seq id -> (priority, arrival, seq_index)
        self._unforked: set[str] = set()  # live parents of n > 1 groups not forked yet
        self._next_arrival = 0
        # Ids the workers know that they must forget; drained into the next SchedulerOutput.
        self._pending_finished: list[str] = []
        # step_id -> the (seq, num_tokens, samples) it scheduled, in batch order; objects, not
        # ids, so an id reused after an abort cannot be confused with the old sequence.
        self._in_flight: dict[int, list[tuple[Sequence, int, bool]]] = {}
        self._step_id = 0
        self.num_preempted_total = 0
        self.num_swapped_out_total = 0
        self.num_preempted_last_step = 0
        self.num_scheduled_tokens_last_step = 0

    # ---- requests ------------------------------------------------------------------
    def add_request(self, group: SequenceGroup) -> None:
        n_prompt, p = len(group.prompt_token_ids), group.sampling_params
        if n_prompt == 0:
            raise ValueError("prompt is empty; give at least one token")
        if n_prompt > self.max_model_len:
            raise ValueError(f"prompt has {n_prompt} tokens, more than max_model_len="
                             f"{self.max_model_len}; shorten the prompt or raise max_model_len")
        if p.n > self.config.max_num_seqs:
            raise ValueError(f"n={p.n} is more than max_num_seqs={self.config.max_num_seqs}")
        if group.request_id in self._groups:
            raise ValueError(f"request id {group.request_id!r} is already running")
        if group.priority and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority {group.priority} needs scheduling_policy='priority' "
                             f"(--scheduling-policy priority)")
        # The most K/V positions one sequence stores: every token but the last sampled one.
        final = min(self.max_model_len, n_prompt + (p.max_tokens or self.max_model_len))
        need = -(-max(n_prompt, final - 1) // self.block_size)
        if need > self.block_manager.gpu.num_blocks:
            raise ValueError(f"one sequence of this request needs {need} KV blocks, more than "
                             f"the {self.block_manager.gpu.num_blocks} the cache holds")
        arrival = self._next_arrival
        self._next_arrival += 1
        self._groups[group.request_id] = group
        group.set_stop_token_ids(self.eos_token_ids)
        if not group.forked:
            self._unforked.add(group.seqs[0].seq_id)
        for seq in group.seqs:
            self._track(seq, group, arrival)
            if not seq.status.is_finished:
                seq.status = _S.WAITING
                bisect.insort(self.waiting, seq, key=self._key)

    def abort_request(self, request_id: str) -> None:
        """End a request in any state; ids the workers know are forgotten next step."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for seq in group.seqs:
            if not seq.status.is_finished:
                self._finish(seq, _S.FINISHED_ABORTED)

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        """For the engine: end one sequence (e.g. on a stop string)."""
        if not seq.status.is_finished and seq.seq_id in self._group_of:
            self._finish(seq, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    def _track(self, seq: Sequence, group: SequenceGroup, arrival: int) -> None:
        self._group_of[seq.seq_id] = group
        self._keys[seq.seq_id] = (group.priority, arrival, seq.seq_index)

    def _key(self, seq: Sequence) -> tuple[int, int, int]:
        return self._keys[seq.seq_id]

    def _queue(self, status: SequenceStatus) -> list[Sequence]:
        return {_S.WAITING: self.waiting, _S.RUNNING: self.running, _S.SWAPPED: self.swapped}[status]

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self._queue(seq.status).remove(seq)
        self.block_manager.free(seq)
        seq.status = status
        if seq.num_tokens_sent > 0:
            self._pending_finished.append(seq.seq_id)
        group = self._group_of.pop(seq.seq_id)
        del self._keys[seq.seq_id]
        self._unforked.discard(seq.seq_id)
        if group.is_finished:
            self._groups.pop(group.request_id, None)

    # ---- schedule -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(step_id=self._step_id)
        self._step_id += 1
        scheduled: list[tuple[Sequence, int]] = []
        resend: set[str] = set()  # known seqs whose table changed in place (copy-on-write)
        budget = self.config.max_num_batched_tokens
        preempted_before = self.num_preempted_total
        if self._unforked:
            for seq in [s for s in self.running if s.seq_id in self._unforked]:
                self._maybe_fork(seq)
        budget = self._schedule_running(budget, scheduled, resend, out)
        self.num_preempted_last_step = self.num_preempted_total - preempted_before
        if not self.num_preempted_last_step:
            budget = self._schedule_swapped(budget, scheduled, out)
            if not self.swapped:
                self._schedule_waiting(budget, scheduled)
        entries = self._build_output(out, scheduled, resend)
        if self.lora_slots is not None:
            out.lora_loads = self.lora_slots.take_loads()
        if entries:
            self._in_flight[out.step_id] = entries
        return out

    def _num_new_tokens(self, seq: Sequence, budget: int, num_computed: int | None = None) -> int:
        """Tokens to schedule for seq now: its uncomputed ones (an unforked parent only up
        to the fork point), chunked to the budget, or all-or-nothing without chunking."""
        group = self._group_of[seq.seq_id]
        limit = len(seq.token_ids) + seq.num_pending if group.forked else group.prefill_target
        computed = seq.num_computed_tokens if num_computed is None else num_computed
        wanted = limit - computed
        if wanted <= 0 or budget <= 0 or self._ends_with_pending(seq, group.sampling_params):
            return 0
        if self.config.enable_chunked_prefill:
            return min(wanted, budget)
        return wanted if wanted <= budget else 0

    def _ends_with_pending(self, seq: Sequence, p: SamplingParams) -> bool:
        """Whether the tokens in flight surely end seq (length limits): no step for it then."""
        if not seq.num_pending:
            return False
        num_tokens = len(seq.token_ids) + seq.num_pending  # (no properties: runs per decode)
        return (p.max_tokens is not None and num_tokens - seq.num_prompt_tokens >= p.max_tokens) or \
            num_tokens >= self.max_model_len

    def _schedule_running(self, budget: int, scheduled: list, resend: set,
                          out: SchedulerOutput) -> int:
        i, running, append_slots = 0, self.running, self.block_manager.append_slots
        while i < len(running):  # (preemption shrinks it)
            seq = running[i]
            num_new = self._num_new_tokens(seq, budget)
            if num_new == 0:
                i += 1
                continue
            copies = append_slots(seq, num_new)
            while copies is None:
                # Out of blocks: the last in order (the latest arrival; with priorities, of
                # the lowest priority) gives its blocks up, possibly seq itself. Victims sort
                # after seq, so none was scheduled this step.
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    return budget
                copies = append_slots(seq, num_new)
            if copies:
                out.blocks_to_copy.extend(copies)
                if seq.num_tokens_sent > 0:
                    resend.add(seq.seq_id)
            scheduled.append((seq, num_new))
            budget -= num_new
            i += 1
        return budget

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.num_preempted_total += 1
        if seq.num_tokens_sent > 0:
            self._pending_finished.append(seq.seq_id)  # workers forget it; resent in full
        bm = self.block_manager
        if self.config.preemption_mode == "swap" and bm.can_swap_out(seq):
            out.blocks_to_swap_out.extend(bm.swap_out(seq))
            seq.status = _S.SWAPPED
            self.num_swapped_out_total += 1
            seq.num_tokens_sent = seq.num_blocks_sent = 0
            bisect.insort(self.swapped, seq, key=self._key)
        else:  # recompute (also the fallback when the CPU pool is full)
            bm.free(seq)
            seq.reset_for_recompute()
            bisect.insort(self.waiting, seq, key=self._key)

    def _can_admit(self, seq: Sequence, slots: int) -> bool:
        """Room among the running (max_num_seqs, an adapter slot), and no token of seq in
        flight (resuming without it would lose it; two steps in flight rule that out)."""
        return not seq.num_pending and slots + self._slots(seq) <= self.config.max_num_seqs and \
            (self.lora_slots is None or self.lora_slots.can_run(seq.lora_id, self.running))

    def _start_running(self, seq: Sequence, queue: list[Sequence]) -> None:
        queue.pop(0)
        if self.lora_slots is not None and seq.lora_id:
            self.lora_slots.acquire(self._group_of[seq.seq_id].lora_request, self.running)
        seq.status = _S.RUNNING
        bisect.insort(self.running, seq, key=self._key)

    def _num_seq_slots(self) -> int:
        """Running sequences, counting an unforked parent as the n it will become."""
        return sum(self._slots(s) for s in self.running)

    def _slots(self, seq: Sequence) -> int:
        group = self._group_of[seq.seq_id]
        return 1 if group.forked else group.sampling_params.n

    def _schedule_swapped(self, budget: int, scheduled: list, out: SchedulerOutput) -> int:
        if not self.swapped:
            return budget
        bm, slots = self.block_manager, self._num_seq_slots()
        while self.swapped:
            seq = self.swapped[0]
            if not self._can_admit(seq, slots):
                break
            num_new = self._num_new_tokens(seq, budget)
            # An unforked parent is forked right after reaching its target while running,
            # so a swapped one always has tokens left to compute.
            if num_new == 0 or not bm.can_swap_in(seq, num_new):
                break
            self._start_running(seq, self.swapped)
            out.blocks_to_swap_in.extend(bm.swap_in(seq))
            copies = bm.append_slots(seq, num_new)
            assert copies == [], "swapped-in blocks are private: no copy-on-write"
            slots += self._slots(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        return budget

    def _schedule_waiting(self, budget: int, scheduled: list) -> None:
        if not self.waiting or budget <= 0:
            return
        bm, slots = self.block_manager, self._num_seq_slots()
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if not self._can_admit(seq, slots):
                break
            num_cached = bm.num_cached_prefix_tokens(seq)
            num_new = self._num_new_tokens(seq, budget, num_computed=num_cached)
            group = self._group_of[seq.seq_id]
            # num_new == 0 is fine only for an unforked parent whose cached prefix already
            # reaches the fork point (or a 1-token prompt): it is admitted and forked now.
            ready_to_fork = not group.forked and num_cached >= group.prefill_target
            if (num_new == 0 and not ready_to_fork) or not bm.can_allocate(seq, num_new):
                break
            self._start_running(seq, self.waiting)
            assert bm.allocate_prefix(seq) == num_cached
            copies = bm.append_slots(seq, num_new)
            assert copies == [], "a freshly admitted sequence shares nothing to copy"
            slots += self._slots(seq)
            if num_new:
                scheduled.append((seq, num_new))
                budget -= num_new
            self._maybe_fork(seq)

    def _maybe_fork(self, parent: Sequence) -> None:
        """n > 1: once the parent has computed all prompt tokens but the last, its group
        forks; children share its blocks and join the running queue."""
        group = self._group_of.get(parent.seq_id)
        if group is None or group.forked or parent.num_computed_tokens < group.prefill_target:
            return
        arrival = self._keys[parent.seq_id][1]
        self._unforked.discard(parent.seq_id)
        for child in group.fork():
            self.block_manager.fork(parent, child)
            child.status = _S.RUNNING
            self._track(child, group, arrival)
            bisect.insort(self.running, child, key=self._key)

    def _build_output(self, out: SchedulerOutput, scheduled: list,
                      resend: set) -> list[tuple[Sequence, int, bool]]:
        # Decodes (exactly one uncomputed token) first, then prefill chunks; stable order.
        chunks = [s.num_uncomputed_tokens != 1 for s, _ in scheduled]
        if any(chunks):  # (all decodes, the steady state: already in order)
            order = sorted(range(len(scheduled)), key=chunks.__getitem__)
            scheduled = [scheduled[i] for i in order]
        entries = []
        req_ids, counts, cached = out.req_ids, out.num_scheduled_tokens, out.cached_reqs
        for seq, num_new in scheduled:
            if resend and seq.seq_id in resend:
                # Copy-on-write replaced a table entry the workers know: a delta cannot say
                # that, so the workers forget the sequence and get it in full again.
                self._pending_finished.append(seq.seq_id)
                seq.num_tokens_sent = seq.num_blocks_sent = 0
            num_tokens, table = len(seq.token_ids), seq.block_table
            if seq.num_tokens_sent == 0:
                # Only a sequence with nothing pending is sent in full (a fresh copy on the
                # workers would lack the pending token): copy-on-write happens only at a
                # child's first step, and resumed sequences got their token before resuming.
                assert not seq.num_pending, f"{seq.seq_id} sent in full with a token in flight"
                out.new_reqs.append(NewRequestData.from_seq(seq, self._group_of[seq.seq_id]))
            else:
                assert seq.num_tokens_sent == num_tokens, "workers know every known token"
                cached.append(CachedRequestData(seq.seq_id, table[seq.num_blocks_sent:],
                                                seq.num_computed_tokens))
            seq.num_tokens_sent = num_tokens
            seq.num_blocks_sent = len(table)
            req_ids.append(seq.seq_id)
            counts.append(num_new)
            seq.num_computed_tokens += num_new  # now, so the next step can be scheduled early
            samples = seq.num_computed_tokens == num_tokens + seq.num_pending
            seq.num_pending += samples
            entries.append((seq, num_new, samples))
        out.finished_req_ids = self._pending_finished
        self._pending_finished = []
        self.num_scheduled_tokens_last_step = out.total_num_scheduled_tokens
        return entries

    # ---- results ------------------------------------------------------------------------
    def update_from_output(self, sched_out: SchedulerOutput,
                           runner_out: ModelRunnerOutput) -> list[SequenceGroup]:
        """Append the sampled tokens, register newly full blocks, apply stop conditions.
        Returns the groups that got a new token or finished, in batch order."""
        sampled = {r: i for i, r in enumerate(runner_out.req_ids)}
        touched: dict[str, SequenceGroup] = {}
        now = time.monotonic()
        mark_computed, running = self.block_manager.mark_computed, _S.RUNNING
        tokens, logprobs = runner_out.sampled_token_ids, runner_out.logprobs
        num_logprobs = len(logprobs)
        for seq, _, samples in self._in_flight.pop(sched_out.step_id, []):
            seq.num_pending -= samples
            if seq.status is running:  # before a stop frees the blocks
                mark_computed(seq)
            if samples and not seq.status.is_finished:  # (else aborted or stopped since)
                i = sampled[seq.seq_id]
                self._append_sampled(seq, tokens[i], logprobs[i] if i < num_logprobs else None,
                                     now, touched)
        return list(touched.values())

    def _append_sampled(self, seq: Sequence, token: int, logprobs: dict[int, float] | None,
                        now: float, touched: dict[str, SequenceGroup]) -> None:
        seq.append_token(token, logprobs)
        if seq.num_tokens_sent:  # the workers appended it themselves
            seq.num_tokens_sent += 1
        group = self._group_of[seq.seq_id]
        if group.first_token_time is None:
            group.first_token_time = now
        touched[group.request_id] = group
        status = group.stop_status(seq, token, self.max_model_len)
        if status is not None:
            self._finish(seq, status)

    # ---- stats and checks -----------------------------------------------------------------
    num_running = property(lambda self: len(self.running))
    num_waiting = property(lambda self: len(self.waiting))
    num_swapped = property(lambda self: len(self.swapped))

    def live_seqs(self) -> list[Sequence]:
        return self.running + self.swapped + self.waiting


__all__ = ["Scheduler"]
