"""Host arrays of one step's inputs, built without per-sequence numpy calls where possible.

`BlockTables` keeps every live sequence's block table in one persistent array, updated
by the deltas, so a step's block_tables is a single gather. `decode_rows` builds the
inputs of the leading decodes (one token each) for all of them at once; `chunk_rows`
is the general per-sequence path, used for prefill chunks. Both give the same values
for a decode (tests/unit/test_input_batch.py checks them against a plain reference).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PLACEHOLDER = -1  # a sampled token still on its way to the host


class BlockTables:
    """One int32 row per live sequence. Invariant: row r holds its sequence's block ids in
    columns [0, num_blocks[r]) and zeros after them (block_tables are zero-padded)."""

    def __init__(self, num_rows: int = 64, width: int = 16):
        self.tables = np.zeros((num_rows, width), dtype=np.int32)
        self.num_blocks = np.zeros(num_rows, dtype=np.int64)
        self._free_rows = list(range(num_rows - 1, -1, -1))  # a stack: lowest row on top

    def add(self, block_ids: list[int]) -> int:
        """A row for a new sequence, holding block_ids."""
        if not self._free_rows:
            n = self.tables.shape[0]
            self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        row = self._free_rows.pop()
        self.append(row, block_ids)
        return row

    def append(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.tables.shape[1]:
            wider = np.zeros((self.tables.shape[0], max(end, 2 * self.tables.shape[1])), dtype=np.int32)
            wider[:, :self.tables.shape[1]] = self.tables
            self.tables = wider
        self.tables[row, start:end] = block_ids
        self.num_blocks[row] = end

    def remove(self, row: int) -> None:
        self.tables[row, :self.num_blocks[row]] = 0  # keep the zero padding for the next owner
        self.num_blocks[row] = 0
        self._free_rows.append(row)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), longest table] int32: the step's block_tables, zero-padded."""
        return self.tables[rows, :int(self.num_blocks[rows].max())]


@dataclass
class Rows:
    """Host arrays of a run of consecutive batch rows. Token indices (sample_rows,
    gather_rows) count from the run's first token."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    context_lens: np.ndarray  # [B] int32
    query_lens: np.ndarray  # [B] int32
    sample_rows: np.ndarray  # int64: the token whose logits are sampled, per sampling seq
    sample_ids: list[str] = field(default_factory=list)
    gather_rows: np.ndarray | None = None  # int64: inputs still PLACEHOLDERs ...
    gather_src: np.ndarray | None = None  # ... and their rows in the previous step's tokens
    lora_slots: np.ndarray | None = None  # [B] int64, a LoRA graph step's adapter slot per row (-1: none)


def decode_rows(states: list, table_rows: np.ndarray, tables: BlockTables, block_size: int) -> Rows:
    """Inputs of sequences scheduled for exactly one token each, all at once. Their token
    is at position num_computed_tokens; it samples iff that is its newest token."""
    computed = [s.num_computed_tokens for s in states]
    pos = np.array(computed, dtype=np.int64)
    ids = np.array([s.token_ids[c] for s, c in zip(states, computed)], dtype=np.int64)
    num_tokens = np.array([len(s.token_ids) for s in states], dtype=np.int64)
    blocks = tables.tables[table_rows, pos // block_size].astype(np.int64)
    ctx = pos + 1
    samples = num_tokens == ctx
    if samples.all():
        sample_rows, sample_ids = np.arange(len(states), dtype=np.int64), [s.req_id for s in states]
    else:
        sample_rows = np.flatnonzero(samples).astype(np.int64)
        sample_ids = [states[i].req_id for i in sample_rows]
    # A PLACEHOLDER is only ever the newest token: a sampling row's input.
    gather = np.flatnonzero(ids == PLACEHOLDER).astype(np.int64)
    src = np.array([states[i].pending_index for i in gather], dtype=np.int64)
    return Rows(ids, pos, blocks * block_size + pos % block_size, ctx.astype(np.int32),
                np.ones(len(states), dtype=np.int32), sample_rows, sample_ids, gather, src)


def chunk_rows(states: list, num_scheduled: list[int], block_size: int) -> Rows:
    """The general path: any number of tokens per sequence, one sequence at a time."""
    input_ids, positions, slots, sample_rows, sample_ids = [], [], [], [], []
    context_lens, gather_rows, gather_src, num_tokens = [], [], [], 0
    for state, n in zip(states, num_scheduled):
        start = state.num_computed_tokens
        end = start + n
        pos = np.arange(start, end, dtype=np.int64)
        table = np.asarray(state.block_ids, dtype=np.int64)
        input_ids.append(np.asarray(state.token_ids[start:end], dtype=np.int64))
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        context_lens.append(end)
        num_tokens += n
        if state.token_ids[end - 1] == PLACEHOLDER:  # only ever the newest token
            gather_rows.append(num_tokens - 1)
            gather_src.append(state.pending_index)
        if end == len(state.token_ids):  # reached the newest token: its logits are sampled
            sample_rows.append(num_tokens - 1)
            sample_ids.append(state.req_id)
    return Rows(np.concatenate(input_ids), np.concatenate(positions), np.concatenate(slots),
                np.asarray(context_lens, dtype=np.int32), np.asarray(num_scheduled, dtype=np.int32),
                np.asarray(sample_rows, dtype=np.int64), sample_ids,
                np.asarray(gather_rows, dtype=np.int64), np.asarray(gather_src, dtype=np.int64))


def merge_rows(parts: list[Rows]) -> Rows:
    """Consecutive runs as one: token indices shifted by the tokens before each run."""
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [len(p.input_ids) for p in parts[:-1]])
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
    shifted = lambda name: np.concatenate([getattr(p, name) + o for p, o in zip(parts, offsets)])
    return Rows(cat("input_ids"), cat("positions"), cat("slots"), cat("context_lens"), cat("query_lens"),
                shifted("sample_rows"), [i for p in parts for i in p.sample_ids],
                shifted("gather_rows"), cat("gather_src"))


def num_leading_decodes(num_scheduled: list[int]) -> int:
    """How many rows at the front are scheduled for one token (every count is >= 1)."""
    if sum(num_scheduled) == len(num_scheduled):
        return len(num_scheduled)
    for i, n in enumerate(num_scheduled):
        if n != 1:
            return i
    return len(num_scheduled)
