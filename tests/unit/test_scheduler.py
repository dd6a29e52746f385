"""Scheduler on hand-built inputs (no model, no Ray): budget, deltas, prefix cache,
preemption, n > 1 forks, aborts, stops, and random-operation property tests."""
import random

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from driver.config import CacheConfig, SchedulerConfig
from driver.protocol import ModelRunnerOutput
from driver.sampling_params import SamplingParams
from driver.scheduler import Scheduler
from driver.sequence import SequenceGroup, SequenceStatus

BS = 4
EOS = 0
_S = SequenceStatus


def make_sched(num_gpu=32, num_cpu=16, *, bs=BS, max_model_len=64, max_num_seqs=8, budget=64,
               chunked=True, mode="recompute", prefix=True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, chunked, mode),
                     CacheConfig(block_size=bs, enable_prefix_caching=prefix),
                     max_model_len, num_gpu, num_cpu, eos_token_ids=(EOS,))


def add(sched: Scheduler, rid: str, prompt, **params) -> SequenceGroup:
    group = SequenceGroup.create(rid, None, list(prompt), SamplingParams(**params))
    sched.add_request(group)
    return group


class FakeWorker:
    """Mirrors workers/model_runner.py's request states and simulates the KV cache: a slot
    holds the hash of the token prefix it was computed for, so a wrong block id, copy or
    swap, a stale prefix hit, or a write into a shared block shows up on a later read."""

    def __init__(self, bs: int = BS):
        self.bs, self.reqs, self.gpu, self.cpu = bs, {}, {}, {}

    def _move(self, src: dict, dst: dict, pairs) -> None:
        snap = {s: dict(src.get(s, {})) for s, _ in pairs}  # gather, then scatter (as torch)
        for s, d in pairs:
            dst[d] = dict(snap[s])

    def run(self, so, token=7) -> tuple[list[str], list[int]]:
        """Run `so`; like the model runner, sample (`token`: an id or a function of the
        seq id) where the scheduled tokens reach the end, and keep the sampled token."""
        for rid in so.finished_req_ids:
            assert self.reqs.pop(rid, None) is not None, f"{rid} finished but not known to workers"
        for new in so.new_reqs:
            assert new.req_id not in self.reqs, f"{new.req_id} sent in full twice"
            self.reqs[new.req_id] = [list(new.token_ids), list(new.block_ids), new.num_computed_tokens]
        for d in so.cached_reqs:
            tokens, blocks, computed = self.reqs[d.req_id]
            assert d.num_computed_tokens == computed, f"{d.req_id}: computed count moved"
            self.reqs[d.req_id] = [tokens, blocks + d.new_block_ids, computed]
        self._move(self.gpu, self.cpu, so.blocks_to_swap_out)
        self._move(self.cpu, self.gpu, so.blocks_to_swap_in)
        self._move(self.gpu, self.gpu, so.blocks_to_copy)
        sampled, values = [], []
        for rid, n in zip(so.req_ids, so.num_scheduled_tokens):
            tokens, blocks, start = self.reqs[rid]
            for p in range(start + n):
                slot = (blocks[p // self.bs], p % self.bs)
                want = hash(tuple(tokens[:p + 1]))
                if p < start:  # attention reads the context
                    assert self.gpu.get(slot[0], {}).get(slot[1]) == want, f"{rid}: bad K/V at {p}"
                else:
                    self.gpu.setdefault(slot[0], {})[slot[1]] = want
            self.reqs[rid][2] = start + n
            if start + n == len(tokens):
                value = token(rid) if callable(token) else token
                tokens.append(value)
                sampled.append(rid)
                values.append(value)
        return sampled, values


def fake_step(sched: Scheduler, so, token=7, worker: FakeWorker | None = None) -> list[str]:
    """Answer `so` as the workers would. Then, if no other step is in flight, the worker's
    copy of every running sequence must equal the driver's."""
    ids = [q.seq_id for q, _, samples in sched._in_flight.get(so.step_id, []) if samples]
    if worker is not None:
        got, tokens = worker.run(so, token)
        assert got == ids, "the driver and the worker disagree on which sequences sample"
    else:
        tokens = [token(r) if callable(token) else token for r in ids]
    sched.update_from_output(so, ModelRunnerOutput(so.step_id, ids, tokens))
    if worker is not None and not sched._in_flight:
        for q in sched.running:
            if q.num_tokens_sent:
                assert worker.reqs[q.seq_id] == [q.token_ids, q.block_table, q.num_computed_tokens], \
                    f"{q.seq_id}: worker state differs"
    return ids


def check_invariants(sched: Scheduler) -> None:
    """The scheduler's invariants: queue/status agreement, table coverage and exact block refcounts."""
    bm = sched.block_manager
    for status, queue in ((_S.RUNNING, sched.running), (_S.SWAPPED, sched.swapped),
                          (_S.WAITING, sched.waiting)):
        assert queue == sorted(queue, key=sched._key), f"{status} queue out of order"
        for seq in queue:
            assert seq.status is status, f"{seq.seq_id} is {seq.status} in the {status} queue"
            assert bm.is_swapped_out(seq) == (status is _S.SWAPPED)
            assert len(seq.block_table) * sched.block_size >= seq.num_computed_tokens
            assert seq.num_computed_tokens <= seq.num_tokens + seq.num_pending
    for seq in sched.waiting:
        assert not seq.block_table and seq.num_computed_tokens == 0, f"{seq.seq_id} waits holding blocks"
    pending: dict = {}  # seq -> tokens its steps in flight sample
    for entries in sched._in_flight.values():
        for seq, _, samples in entries:
            pending[seq] = pending.get(seq, 0) + samples
    for seq in sched.live_seqs():
        assert seq.num_pending == pending.get(seq, 0), f"{seq.seq_id}: pending count off"
    assert sched._num_seq_slots() <= sched.config.max_num_seqs
    bm.check_invariants(sched.live_seqs())


def check(sched: Scheduler, so=None) -> None:
    """Invariants after any operation; for a fresh `so` also the batch limits and order."""
    check_invariants(sched)
    a = sched.block_manager.gpu
    assert a.prefix_cache_hits <= a.prefix_cache_queries
    if so is not None:
        assert so.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(so.req_ids) <= sched.config.max_num_seqs and len(set(so.req_ids)) == len(so.req_ids)
        decodes = [n == 1 and samples for _, n, samples in sched._in_flight.get(so.step_id, [])]
        assert decodes == sorted(decodes, reverse=True), "a prefill chunk before a decode"


def step(sched: Scheduler, token=7, worker=None):
    so = sched.schedule()
    check(sched, so)
    fake_step(sched, so, token, worker)
    check(sched)
    return so


def batch(so) -> list[tuple[str, int]]:
    return list(zip(so.req_ids, so.num_scheduled_tokens))


def assert_all_free(sched: Scheduler) -> None:
    check_invariants(sched)
    bm = sched.block_manager
    assert (bm.num_free_gpu_blocks, bm.num_free_cpu_blocks) == (bm.gpu.num_blocks, bm.cpu.num_blocks)


def run_to_completion(sched: Scheduler, worker: FakeWorker | None = None, token=7) -> None:
    """Step until every request is done; then no block is held and the workers forget all."""
    for _ in range(5000):
        if not sched.has_unfinished_requests():
            break
        step(sched, token, worker)
    assert not sched.has_unfinished_requests()
    assert_all_free(sched)
    if worker is not None:
        worker.run(sched.schedule())
        assert worker.reqs == {}


# ---- 1. FCFS and the token budget -------------------------------------------------------

def test_decodes_first_then_prefill_chunks_under_budget():
    s = make_sched(budget=10)
    add(s, "A", range(100, 106))
    assert batch(step(s)) == [("A", 6)]
    add(s, "B", range(200, 220))
    add(s, "C", range(300, 308))
    assert batch(step(s)) == [("A", 1), ("B", 9)]
    assert batch(step(s)) == [("A", 1), ("B", 9)]
    assert batch(step(s)) == [("A", 1), ("B", 2), ("C", 7)]  # B done, C gets the rest
    assert batch(step(s)) == [("A", 1), ("B", 1), ("C", 1)]


def test_one_token_chunk_is_batched_with_the_decodes():
    s = make_sched(budget=8)
    add(s, "A", range(100, 119))
    step(s), step(s)
    add(s, "B", [100])  # a 1-token prompt: its only chunk samples, like a decode
    assert batch(step(s)) == [("B", 1), ("A", 3)]


def test_max_num_seqs_is_respected():
    s = make_sched(max_num_seqs=2)
    for rid in "ABC":
        add(s, rid, range(100, 104), max_tokens=2)
    assert step(s).req_ids == ["A", "B"] and s.num_waiting == 1
    assert step(s).req_ids == ["A", "B"]  # both finish (2 tokens)
    assert step(s).req_ids == ["C"]


def test_max_num_batched_tokens_is_respected():
    s = make_sched(budget=5)
    for i in range(3):
        add(s, f"R{i}", range(100, 107), max_tokens=3)
    while s.has_unfinished_requests():
        assert 0 < step(s).total_num_scheduled_tokens <= 5


def test_without_chunked_prefill_a_prompt_is_all_or_nothing():
    s = make_sched(budget=16, max_model_len=16, chunked=False)
    add(s, "A", range(100, 110))
    add(s, "B", range(200, 210))
    add(s, "C", range(300, 303))  # would fit in step 1, but FCFS stops at B
    assert batch(step(s)) == [("A", 10)]
    add(s, "D", range(400, 406))  # 1 + 10 + 3 + 6 > 16: D waits whole
    assert batch(step(s)) == [("A", 1), ("B", 10), ("C", 3)]
    assert batch(step(s)) == [("A", 1), ("B", 1), ("C", 1), ("D", 6)]


# ---- 2. Deltas ---------------------------------------------------------------------------

def test_request_sent_in_full_once_then_as_deltas():
    s, w = make_sched(budget=4), FakeWorker()
    add(s, "A", range(100, 106), max_tokens=4)
    so = step(s, 7, w)  # a partial chunk: 4 of 6
    (new,) = so.new_reqs
    assert (new.token_ids, new.num_computed_tokens, so.cached_reqs) == (list(range(100, 106)), 0, [])
    assert len(new.block_ids) == 1
    so = step(s, 8, w)
    (d,) = so.cached_reqs
    assert so.new_reqs == [] and (len(d.new_block_ids), d.num_computed_tokens) == (1, 4)
    for tok, new_blocks in ((9, 0), (10, 0), (11, 1)):  # positions 6, 7 (block 1), 8 (block 2)
        so = step(s, tok, w)
        (d,) = so.cached_reqs  # no tokens: the worker keeps the ones it sampled
        assert len(d.new_block_ids) == new_blocks
    assert w.reqs["A"][0] == list(range(100, 106)) + [8, 9, 10, 11]
    assert s.get_num_unfinished_requests() == 0 and so.finished_req_ids == []
    so = s.schedule()
    assert so.finished_req_ids == ["A"] and not so.req_ids
    w.run(so)
    assert w.reqs == {} and s.schedule().finished_req_ids == []  # reported once
    assert_all_free(s)


# ---- 3. Prefix caching ---------------------------------------------------------------------

def test_prefix_hit_on_two_full_blocks():
    s, w = make_sched(bs=16, num_gpu=16), FakeWorker(16)
    a = list(range(100, 140))
    add(s, "A", a)
    step(s, 7, w)
    assert (s.block_manager.gpu.prefix_cache_queries, s.block_manager.gpu.prefix_cache_hits) == (1, 0)
    b = add(s, "B", a[:32] + list(range(500, 508)))
    so = step(s, 7, w)
    assert batch(so) == [("A", 1), ("B", 8)] and so.new_reqs[0].num_computed_tokens == 32
    assert b.seqs[0].num_cached_tokens == 32
    assert b.seqs[0].block_table[:2] == s.running[0].block_table[:2]
    assert (s.block_manager.gpu.prefix_cache_queries, s.block_manager.gpu.prefix_cache_hits) == (3, 2)
    assert s.block_manager.prefix_cache_hit_rate == pytest.approx(2 / 3)


def test_fully_cached_prompt_still_computes_its_last_token():
    s, w = make_sched(bs=16, num_gpu=16), FakeWorker(16)
    a = list(range(100, 133))  # 2 full blocks + 1
    add(s, "A", a, max_tokens=1)
    step(s, 7, w)
    b = add(s, "B", a, max_tokens=1)
    so = step(s, 7, w)
    assert batch(so) == [("B", 1)] and b.seqs[0].num_cached_tokens == 32
    assert b.seqs[0].status is _S.FINISHED_LENGTH
    c = add(s, "C", a[:32], max_tokens=1)  # all blocks full: the last one is recomputed
    assert batch(step(s, 7, w)) == [("C", 16)] and c.seqs[0].num_cached_tokens == 16
    assert_all_free(s)


# ---- 4. Preemption ---------------------------------------------------------------------------

def _two_growing_requests(mode: str, num_cpu: int):
    s, w = make_sched(num_gpu=4, num_cpu=num_cpu, max_model_len=16, mode=mode, prefix=False), FakeWorker()
    add(s, "A", range(100, 106), max_tokens=8)
    add(s, "B", range(200, 206), max_tokens=8)
    for _ in range(3):
        assert step(s, 7, w).req_ids == ["A", "B"]  # 4 blocks in use, B at 9 tokens
    so = step(s, 7, w)  # A needs a 5th block: B, the latest arrival, is preempted
    assert so.req_ids == ["A"] and so.finished_req_ids == ["B"] and s.num_preempted_total == 1
    return s, w, so


def test_preemption_by_recompute():
    s, w, so = _two_growing_requests("recompute", num_cpu=4)
    assert so.blocks_to_swap_out == [] and s.num_swapped_out_total == 0
    (b,) = s.waiting
    assert b.seq_id == "B" and b.block_table == [] and b.num_computed_tokens == 0
    while s.running:
        so = step(s, 7, w)
    so = step(s, 7, w)
    (new,) = so.new_reqs
    assert new.req_id == "B" and len(new.token_ids) == 9 and new.num_computed_tokens == 0
    run_to_completion(s, w)
    assert b.status is _S.FINISHED_LENGTH and b.num_output_tokens == 8


def test_preemption_by_swap():
    s, w, so = _two_growing_requests("swap", num_cpu=4)
    (b,) = s.swapped
    cpu_blocks = [c for _, c in so.blocks_to_swap_out]
    assert len(cpu_blocks) == 2 and b.block_table == cpu_blocks
    assert s.num_swapped_out_total == 1 and s.block_manager.num_free_cpu_blocks == 2
    while s.running:
        so = step(s, 7, w)
        assert so.blocks_to_swap_in == []
    so = step(s, 7, w)
    assert [c for c, _ in so.blocks_to_swap_in] == cpu_blocks and s.num_swapped == 0
    assert b.block_table[:2] == [g for _, g in so.blocks_to_swap_in]
    (new,) = so.new_reqs
    assert new.req_id == "B" and new.num_computed_tokens == 8 and batch(so) == [("B", 1)]
    run_to_completion(s, w)
    assert b.status is _S.FINISHED_LENGTH and b.num_output_tokens == 8


def test_swap_falls_back_to_recompute_when_cpu_pool_is_full():
    s, w, so = _two_growing_requests("swap", num_cpu=1)
    assert so.blocks_to_swap_out == [] and s.num_swapped_out_total == 0 and s.num_waiting == 1
    run_to_completion(s, w)


# ---- 5. n > 1 ----------------------------------------------------------------------------------

def test_fork_shares_blocks_and_copies_the_partial_last_block_on_write():
    s, w = make_sched(), FakeWorker()
    g = add(s, "R", range(100, 106), n=2, max_tokens=3)
    so = step(s, 7, w)
    assert batch(so) == [("R", 5)] and len(g.seqs) == 1  # the prompt minus one token
    shared = list(g.seqs[0].block_table)
    so = step(s, lambda rid: 7 if rid == "R" else 8, w)
    parent, child = g.seqs
    assert g.forked and child.seq_id == "R-1" and batch(so) == [("R", 1), ("R-1", 1)]
    assert so.blocks_to_copy == [(shared[1], parent.block_table[1])]  # parent writes first
    assert child.block_table == shared and parent.block_table[0] == shared[0]
    assert s.block_manager.gpu.ref_counts[shared[0]] == 2 and s.block_manager.num_cow_copies == 1
    assert so.finished_req_ids == ["R"] and {n.req_id for n in so.new_reqs} == {"R", "R-1"}  # resent
    run_to_completion(s, w)
    assert [q.output_token_ids for q in g.seqs] == [[7, 7, 7], [8, 7, 7]]


def test_fork_at_admission_when_prefix_reaches_the_fork_point():
    s, w = make_sched(), FakeWorker()
    add(s, "A", range(100, 109), max_tokens=1)
    step(s, 7, w)
    g = add(s, "B", range(100, 109), n=3, max_tokens=2)
    so = step(s, 7, w)  # 8 tokens cached: admitted and forked, nothing to compute yet
    assert so.req_ids == [] and len(g.seqs) == 3 and s.num_running == 3
    so = step(s, 7, w)
    assert batch(so) == [("B", 1), ("B-1", 1), ("B-2", 1)] and so.blocks_to_copy == []
    run_to_completion(s, w)


# ---- 6. Aborts, stops, errors -----------------------------------------------------------------

@pytest.mark.parametrize("state", ["waiting", "mid_prefill", "running", "swapped", "in_flight", "forked"])
def test_abort_in_any_state_frees_every_block(state):
    s, w = make_sched(num_gpu=4, num_cpu=4, max_model_len=16, budget=4, mode="swap"), FakeWorker()
    a = add(s, "A", range(100, 106), max_tokens=8, n=2 if state == "forked" else 1).seqs[0]
    victim = "A"
    if state == "swapped":
        add(s, "B", range(200, 202), max_tokens=8)
        for _ in range(8):
            step(s, 7, w)
        (victim,) = [q.seq_id for q in s.swapped]
    steps = {"waiting": 0, "mid_prefill": 1, "running": 3, "swapped": 0, "in_flight": 1, "forked": 3}
    for _ in range(steps[state]):
        step(s, 7, w)
    assert state != "forked" or s.num_running == 2
    so = s.schedule() if state == "in_flight" else None
    s.abort_request(victim)
    if so is not None:
        assert fake_step(s, so, 7, w) == ["A"] and a.num_output_tokens == 0  # its token is dropped
    s.abort_request("A")
    run_to_completion(s, w)


def test_stop_tokens_eos_min_tokens_and_lengths():
    s = make_sched(max_model_len=10)
    g = {rid: add(s, rid, range(100, 104), **kw).seqs[0] for rid, kw in {
        "stop": dict(stop_token_ids=(5,)), "eos": {}, "ignore": dict(ignore_eos=True, max_tokens=3),
        "min": dict(min_tokens=3), "max": dict(max_tokens=2), "len": dict(max_tokens=None)}.items()}
    so = s.schedule()
    assert {n.req_id: n.stop_token_ids for n in so.new_reqs} == {
        "stop": (EOS, 5), "eos": (EOS,), "ignore": (), "min": (EOS,), "max": (EOS,), "len": (EOS,)}
    toks = {"stop": 5, "eos": EOS, "ignore": EOS, "min": EOS, "max": 9, "len": 9}
    fake_step(s, so, toks.get)
    run_to_completion(s, token=toks.get)
    assert {r: (q.status, q.num_output_tokens) for r, q in g.items()} == {
        "stop": (_S.FINISHED_STOPPED, 1), "eos": (_S.FINISHED_STOPPED, 1),
        "ignore": (_S.FINISHED_LENGTH, 3), "min": (_S.FINISHED_STOPPED, 3),
        "max": (_S.FINISHED_LENGTH, 2), "len": (_S.FINISHED_LENGTH, 6)}
    assert g["stop"].output_token_ids == [5]


def test_add_request_errors():
    s = make_sched(num_gpu=4, max_model_len=32, max_num_seqs=2)
    add(s, "dup", [1, 2], max_tokens=2)
    for rid, prompt, kw, msg in [("long", range(33), {}, "max_model_len=32"), ("empty", [], {}, "empty"),
                                 ("wide", [1, 2], dict(n=3), "max_num_seqs"), ("dup", [1], {}, "already"),
                                 ("big", range(10), dict(max_tokens=20), "KV blocks")]:  # 8 blocks of 4
        with pytest.raises(ValueError, match=msg):
            add(s, rid, prompt, **kw)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_sched(budget=8, max_model_len=16, chunked=False)
    check_invariants(s)


# ---- 7. Async scheduling: step N+1 scheduled before step N's tokens are known ---------------

def test_async_decode_is_scheduled_with_its_token_in_flight():
    s, w = make_sched(), FakeWorker()
    a = add(s, "A", range(100, 106), max_tokens=3).seqs[0]
    so0 = s.schedule()  # the whole prompt: samples
    so1 = s.schedule()  # scheduled before so0's token is known
    assert batch(so1) == [("A", 1)] and so1.cached_reqs[0].num_computed_tokens == 6
    assert a.num_pending == 2 and a.num_tokens == 6
    assert fake_step(s, so0, 7, w) == ["A"] and a.output_token_ids == [7]
    so2 = s.schedule()  # the third token is the last: with two in flight, A is not scheduled
    assert batch(so2) == [("A", 1)]
    assert fake_step(s, so1, 8, w) == ["A"]
    assert batch(s.schedule()) == []  # max_tokens reached once so2's token comes: no wasted step
    fake_step(s, so2, 9, w)
    assert a.status is _S.FINISHED_LENGTH and a.output_token_ids == [7, 8, 9]
    assert w.reqs["A"][0] == list(range(100, 106)) + [7, 8, 9]
    run_to_completion(s, w)


def test_async_stop_token_in_flight_drops_the_extra_step():
    s, w = make_sched(), FakeWorker()
    a = add(s, "A", range(100, 104)).seqs[0]
    so0, so1 = s.schedule(), s.schedule()
    fake_step(s, so0, EOS, w)  # EOS: A ends, but so1 already runs it once more
    assert a.status is _S.FINISHED_STOPPED and s.block_manager.num_free_gpu_blocks == 32
    so2 = s.schedule()  # the workers forget A only after so1 ran
    fake_step(s, so1, 9, w)
    assert a.output_token_ids == [EOS] and so2.finished_req_ids == ["A"]
    fake_step(s, so2, 9, w)
    assert w.reqs == {}
    assert_all_free(s)


def test_async_preemption_with_a_token_in_flight():
    for mode in ("recompute", "swap"):
        s, w = make_sched(num_gpu=4, num_cpu=4, max_model_len=16, mode=mode, prefix=False), FakeWorker()
        add(s, "A", range(100, 106), max_tokens=8)
        b = add(s, "B", range(200, 206), max_tokens=8).seqs[0]
        prev = s.schedule()
        for _ in range(4):  # B is preempted while its token from the previous step is in flight
            nxt = s.schedule()
            fake_step(s, prev, 7, w)
            prev = nxt
        assert s.num_preempted_total == 1 and b.num_pending == 0 and b.status is not _S.RUNNING
        while s.has_unfinished_requests():
            nxt = s.schedule()
            fake_step(s, prev, 7, w)
            prev = nxt
            check(s)
        fake_step(s, prev, 7, w)
        assert b.output_token_ids == [7] * 8
        run_to_completion(s, w)


# ---- 8. Property tests ---------------------------------------------------------------------------

BANK = [[100 + 10 * k + i % 7 for i in range(24)] for k in range(3)]  # shared prefixes
# ("add", prompt len, n, max_tokens, prefix bank, shared len, min_tokens, ignore_eos, seed)
ADD = st.tuples(st.just("add"), st.integers(1, 24), st.integers(1, 3), st.one_of(st.none(), st.integers(1, 16)),
                st.integers(0, 2), st.sampled_from([0, 4, 8, 9, 16, 24]), st.integers(0, 3), st.booleans(),
                st.integers(0, 99))
# ("step", token seed, request aborted between schedule() and the output, if any)
STEP = st.tuples(st.just("step"), st.integers(0, 2**16), st.one_of(st.none(), st.none(), st.integers(0, 40)))
ABORT = st.tuples(st.just("abort"), st.integers(0, 40))
STOP = st.tuples(st.just("stop"), st.integers(0, 40))  # the engine's stop-string finish_seq
OPS = st.lists(st.one_of(ADD, ADD, STEP, STEP, STEP, ABORT, STOP), min_size=8, max_size=50)


def _random_token(seed: int):
    rng = random.Random(seed)
    return lambda rid: rng.choice([EOS, 5] + list(range(10, 30)))


def _add_op(s: Scheduler, ids: list, op) -> None:
    _, plen, n, max_tokens, k, shared, min_tokens, flag, seed = op
    tail = [random.Random(seed).randrange(10, 60) for _ in range(plen)]
    prompt = (BANK[k][:min(shared, plen)] + tail)[:plen]
    kw = dict(n=n, max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens or 3),
              ignore_eos=flag, stop_token_ids=(5,) if seed % 2 else ())
    done = [r for r in ids if r not in s._groups]
    rid = done[seed % len(done)] if seed % 3 == 0 and done else f"r{len(ids)}"  # reuse a finished id
    if n > s.config.max_num_seqs:
        with pytest.raises(ValueError):
            add(s, rid, prompt, **kw)
        return
    add(s, rid, prompt, **kw)
    if rid not in ids:
        ids.append(rid)


@pytest.mark.parametrize("depth", [1, 2, 3], ids=["sync", "async", "async3"])  # steps in flight
@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("chunked", [True, False])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, num_gpu=st.integers(8, 24), num_cpu=st.integers(0, 16), max_num_seqs=st.integers(1, 6),
       budget=st.integers(1, 24), prefix=st.booleans(), finish=st.sampled_from(["abort", "complete"]))
def test_random_operations_keep_invariants(depth, mode, chunked, ops, num_gpu, num_cpu, max_num_seqs,
                                           budget, prefix, finish):
    max_model_len = min(40, num_gpu * BS)
    budget = budget if chunked else max_model_len + budget
    s = make_sched(num_gpu, num_cpu, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                   budget=budget, chunked=chunked, mode=mode, prefix=prefix)
    w, ids, in_flight, overlapped = FakeWorker(), [], [], False
    for op in ops:
        if op[0] == "add":
            _add_op(s, ids, op)
        elif op[0] == "step":  # as the engine: schedule step N+1, then answer step N
            in_flight.append(s.schedule())
            check(s, in_flight[-1])
            overlapped |= any(q.num_pending > 1 for q, *_ in s._in_flight.get(in_flight[-1].step_id, []))
            if op[2] is not None and ids:
                s.abort_request(ids[op[2] % len(ids)])
            if len(in_flight) == depth:
                fake_step(s, in_flight.pop(0), _random_token(op[1]), w)
        elif op[0] == "abort" and ids:
            s.abort_request(ids[op[1] % len(ids)])
        elif op[0] == "stop":
            live = [q for q in s.live_seqs() if q.num_output_tokens]
            if live:
                s.finish_seq(live[op[1] % len(live)], _S.FINISHED_STOPPED)
        check(s)
    if finish == "abort":
        for rid in ids:
            s.abort_request(rid)
    for so in in_flight:
        fake_step(s, so, 9, w)
    run_to_completion(s, w, token=9)  # never a stop token: lengths end every request
    bm = s.block_manager  # what this example exercised (--hypothesis-show-statistics)
    event(f"a step ran with its input token in flight: {overlapped}")
    for name, hit in (("preempted", s.num_preempted_total), ("swapped out", s.num_swapped_out_total),
                      ("copy-on-write", bm.num_cow_copies), ("prefix hit", bm.gpu.prefix_cache_hits)):
        event(f"{name}: {bool(hit)}")
    assert not (s._group_of or s._keys or s._in_flight or bm._hashes or bm._num_registered or bm._on_cpu)
    assert bm.num_free_gpu_blocks == num_gpu and bm.num_free_cpu_blocks == num_cpu
