"""workers/input_batch.py and ModelRunner.prepare_inputs: the vectorized decode path and
the persistent block tables give exactly the tensors of the plain per-sequence build
(the reference below), over real scheduler steps with two steps in flight (so decode
inputs are placeholders), chunked prefill, prefix hits, n > 1 forks and preemption."""
from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest
import torch

from ops.prefill_attention import context_slots
from tests.unit.test_scheduler import add, make_sched
from workers.cuda_graphs import DecodeGraphs
from workers.input_batch import PLACEHOLDER, BlockTables, num_leading_decodes
from workers.model_runner import ModelRunner, _StepTimer

BS, VOCAB, NUM_BLOCKS = 4, 50, 16


def reference_inputs(runner: ModelRunner, so, prev) -> dict:
    """The plain build: per sequence, every array from its own state."""
    bs, states = runner.block_size, [runner.requests[r] for r in so.req_ids]
    ids, pos, slots, rows, sample_ids, ctx, qsl, gather = [], [], [], [], [], [], [0], []
    for state, n in zip(states, so.num_scheduled_tokens):
        start, end = state.num_computed_tokens, state.num_computed_tokens + n
        p = np.arange(start, end)
        ids += state.token_ids[start:end]
        pos += p.tolist()
        slots += (np.asarray(state.block_ids)[p // bs] * bs + p % bs).tolist()
        ctx.append(end)
        qsl.append(qsl[-1] + n)
        if state.token_ids[end - 1] == PLACEHOLDER:
            gather.append((qsl[-1] - 1, state.pending_index))
        if end == len(state.token_ids):
            rows.append(qsl[-1] - 1)
            sample_ids.append(state.req_id)
    ids = torch.tensor(ids, dtype=torch.int64)
    for row, src in gather:
        ids[row] = prev.tokens[src]
    tables = torch.zeros(len(states), max(len(s.block_ids) for s in states), dtype=torch.int32)
    for i, s in enumerate(states):
        tables[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
    nd = num_leading_decodes(so.num_scheduled_tokens)
    out = dict(input_ids=ids, positions=torch.tensor(pos, dtype=torch.int64),
               slot_mapping=torch.tensor(slots, dtype=torch.int64),
               logits_indices=torch.tensor(rows, dtype=torch.int64), block_tables=tables,
               context_lens=torch.tensor(ctx, dtype=torch.int32),
               query_start_loc=torch.tensor(qsl, dtype=torch.int32), sample_ids=sample_ids,
               num_decodes=nd, max_query_len=max(so.num_scheduled_tokens), max_context_len=max(ctx))
    if nd < len(states):  # the flash plan: cumulative lengths, and each key's slot if any is cached
        q_lens, ctxs = so.num_scheduled_tokens[nd:], ctx[nd:]
        cu = lambda lens: torch.tensor(np.cumsum([0] + list(lens)), dtype=torch.int32)
        out["plan"] = [cu(q_lens), cu(ctxs)]
        if list(q_lens) != ctxs:
            slots = [s.block_ids[p // bs] * bs + p % bs for s, c in zip(states[nd:], ctxs) for p in range(c)]
            out["plan"].append(torch.tensor(slots, dtype=torch.int64))
    return out


def check_inputs(runner: ModelRunner, so, prev) -> object:
    want = reference_inputs(runner, so, prev)
    got = runner.prepare_inputs(so, prev)
    m = got.meta
    tables = m.block_tables
    if got.graph is not None:  # the graph's buffer: a fixed width; past each row's blocks, unread
        check_graph_padding(runner.graphs, len(so.req_ids), got.graph[0])
        tables = tables[:, :want["block_tables"].shape[1]]
    pairs = [(got.input_ids, "input_ids"), (got.positions, "positions"), (m.slot_mapping, "slot_mapping"),
             (got.logits_indices, "logits_indices"), (tables, "block_tables"),
             (m.context_lens, "context_lens"), (m.query_start_loc, "query_start_loc")]
    for t, name in pairs:
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
    assert got.sample_req_ids == want["sample_ids"]
    every = torch.equal(want["logits_indices"], torch.arange(len(want["input_ids"])))
    assert got.samples_every_token == every
    bound = runner.graphs.max_model_len if got.graph is not None else want["max_context_len"]
    assert (m.num_decodes, m.max_query_len, m.max_context_len) == \
        (want["num_decodes"], want["max_query_len"], bound)
    if "plan" in want:
        plan = [m.prefill.cu_q, m.prefill.cu_k] + ([] if m.prefill.kv_slots is None else [m.prefill.kv_slots])
        assert len(plan) == len(want["plan"])
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(plan, want["plan"]))
        assert m.prefill.max_q == max(so.num_scheduled_tokens[want["num_decodes"]:])
        if m.prefill.kv_slots is not None:  # the unplanned flash path derives the same slots on the device
            nd, cu_k = want["num_decodes"], m.prefill.cu_k
            slots = context_slots(tables[nd:], m.context_lens[nd:], cu_k, int(cu_k[-1]), BS)
            assert torch.equal(slots, m.prefill.kv_slots)
    else:
        assert m.prefill is None
    return got


def check_graph_padding(graphs: DecodeGraphs, b: int, bucket: int) -> None:
    """Rows b..bucket-1 of a graph step write no cache slot and read one valid block."""
    x = graphs.inputs[bucket]
    assert x.n == bucket and (x.slot_mapping[b:] == -1).all() and (x.context_lens[b:] == 1).all()
    assert (x.input_ids[b:] == 0).all() and (x.positions[b:] == 0).all()
    assert (x.lora_slots == -1).all()  # (no adapters here)
    assert ((x.block_tables[b:, 0] >= 0) & (x.block_tables[b:, 0] < NUM_BLOCKS)).all()


def cpu_graphs(max_num_seqs: int, max_model_len: int) -> DecodeGraphs:
    """The decode graphs' input side on the CPU: prepare_inputs takes the graph path (nothing
    replays here; tests/gpu/test_engine_gpu.py runs the graphs themselves)."""
    graphs = DecodeGraphs(None, [], max_num_seqs, max_model_len, BS, torch.device("cpu"))
    graphs.graphs = dict.fromkeys((b, False) for b in graphs.buckets)  # as if captured: bucket() answers
    return graphs


def run_engine(sched, runner: ModelRunner, seed: int, depth: int = 2, max_steps: int = 3000) -> dict:
    """The engine loop (`depth` steps in flight) over the runner, on the GPU's order of work:
    the runner prepares step N+1 before step N's tokens arrive. Returns counters."""
    rng, outputs, pending = torch.Generator().manual_seed(seed), {}, deque()
    seen = dict.fromkeys(["steps", "placeholders", "mixed", "preempted", "graph", "gathered", "in_place",
                          "max_pending"], 0)

    def worker_step(so) -> None:
        runner.update_states(so)
        prev, runner._prev = runner._prev, None
        inputs = logits = None
        if so.req_ids:
            states = [runner.requests[r] for r in so.req_ids]
            seen["placeholders"] += any(s.token_ids[s.num_computed_tokens + n - 1] == PLACEHOLDER
                                        for s, n in zip(states, so.num_scheduled_tokens))
            inputs = check_inputs(runner, so, prev)
            seen["steps"] += 1
            seen["mixed"] += 0 < inputs.meta.num_decodes < len(so.req_ids)
            if inputs.meta.prefill is not None:
                seen["gathered" if inputs.meta.prefill.kv_slots is not None else "in_place"] += 1
            seen["graph"] += inputs.graph is not None
            logits = torch.randn(len(inputs.sample_req_ids), VOCAB, generator=rng)
        out = runner._finish(prev)
        if out is not None:
            outputs[out.step_id] = out
        runner._prev = runner._sample(so.step_id, inputs, logits, _StepTimer(runner.device))

    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        while len(pending) < depth:
            so = sched.schedule()
            if so.is_empty:
                break
            seen["max_pending"] = max([seen["max_pending"]] + [q.num_pending for q in sched.live_seqs()])
            worker_step(so)
            pending.append(so)
        so = pending.popleft()
        if so.step_id not in outputs:
            out = runner._finish(runner._prev)
            runner._prev = None
            outputs[out.step_id] = out
        sched.update_from_output(so, outputs.pop(so.step_id))
        seen["preempted"] = sched.num_preempted_total
    assert not sched.has_unfinished_requests()
    return seen


@pytest.mark.parametrize("depth", [2, 3])  # the engine's steps in flight
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph_inputs"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prepare_inputs_matches_the_plain_build(seed, graphs, depth):
    random.seed(seed)
    sched = make_sched(num_gpu=NUM_BLOCKS, bs=BS, max_model_len=64, max_num_seqs=6, budget=12)
    prefix = [random.randrange(3, VOCAB) for _ in range(9)]  # shared: prefix-cache hits
    for i in range(10):
        prompt = (prefix if i % 2 else []) + [random.randrange(3, VOCAB) for _ in range(random.randint(1, 20))]
        add(sched, f"r{i}", prompt, n=1 if i % 3 else 2, temperature=0.0,
            max_tokens=random.randint(1, 24), ignore_eos=True)
    runner = ModelRunner(None, [], BS, torch.device("cpu"), rank=0)
    runner.plan_prefill = True  # build the flash plan too (pure numpy)
    if graphs:  # decode-only steps of up to 4 rows (buckets 1, 2, 4) take the graph path
        runner.graphs = cpu_graphs(4, 64)
    seen = run_engine(sched, runner, seed, depth)
    assert seen["steps"] > 20 and seen["placeholders"] and seen["mixed"] and seen["preempted"], seen
    assert seen["gathered"] and seen["in_place"], seen  # prefill plans with and without cached context
    assert seen["max_pending"] == depth, seen  # a sequence sampling in every step in flight
    assert bool(seen["graph"]) == graphs, seen


def test_block_tables_rows_are_reused_zeroed_and_grow():
    t = BlockTables(num_rows=2, width=2)
    a = t.add([5, 6, 7])  # wider than the array
    b = t.add([1])
    c = t.add([2, 3])  # more rows than the array
    assert (a, b, c) == (0, 1, 2)
    np.testing.assert_array_equal(t.gather(np.array([c, a, b])), [[2, 3, 0], [5, 6, 7], [1, 0, 0]])
    t.remove(a)
    t.append(b, [9])
    d = t.add([4])  # a's row, zero-padded again
    assert d == a
    np.testing.assert_array_equal(t.gather(np.array([d, b])), [[4, 0], [1, 9]])
    assert t.gather(np.array([d])).dtype == np.int32
