"""CUDA graphs for decode steps: one graph per batch-size bucket.

A decode step of B sequences runs the graph of the smallest bucket >= B, from the
model's inputs to the logits of every row. Each graph reads its inputs in place from a
device buffer of its own (`GraphInputs`), which a step fills with a single host-to-device
copy (and, for tokens still on the device, one gather): nothing else runs between steps.
Rows B..bucket-1 are padding: slot -1 (nothing written to the cache), context length 1
(a harmless read of a valid block) and their outputs are ignored. Captured after the KV
cache exists, largest bucket first, all graphs sharing one memory pool (a step runs one
graph at a time). With enable_lora each bucket has a second graph, for steps with adapter
rows: the unfused layers plus every LoRA slot, masked per row by its `lora_slots` entry
(workers/lora.py); steps of the base weights alone keep the first.

Attention inside a graph gets max_context_len = max_model_len, so the decode
kernel's grid (and its context split) is fixed at capture time and covers any
context a later replay brings.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch

from workers.attention import AttentionMetadata
from workers.input_batch import Rows
from workers.staging import StagingBuffer, aligned

logger = logging.getLogger("raytp.cuda_graphs")


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (vLLM's spacing)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class GraphInputs:
    """The inputs one bucket's graph reads, in one device buffer of n = bucket rows: per row
    (int64) input_ids, positions, slot_mapping, sample_rows, gather_rows, gather_src,
    lora_slots; context_lens (int32); then block_tables [n, max_blocks] (int32) last, so that a step of
    B rows copies only B rows of it (the copy is a bucket's header and B table rows). Table
    entries past a row's blocks are never read, so they are not cleared. The pad values
    make rows B..n-1 harmless; rows without one (None) are read only up to their count."""

    ROWS = (("input_ids", np.int64, 0), ("positions", np.int64, 0), ("slot_mapping", np.int64, -1),
            ("sample_rows", np.int64, None), ("gather_rows", np.int64, None), ("gather_src", np.int64, None),
            ("lora_slots", np.int64, -1), ("context_lens", np.int32, 1))

    def __init__(self, n: int, max_blocks: int, device: torch.device):
        self.n, self.max_blocks = n, max_blocks
        self._at, end = {}, 0  # name -> (byte offset, numpy dtype)
        for name, dtype, _ in self.ROWS:
            self._at[name] = (end, np.dtype(dtype))
            end += aligned(n * np.dtype(dtype).itemsize)
        self.tables_offset, self.nbytes = end, end + n * max_blocks * 4
        self.dev = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        for name, dtype, pad in self.ROWS:  # the device views, filled with their pad values
            view = self._view(self.dev, name).view(getattr(torch, np.dtype(dtype).name))
            setattr(self, name, view.fill_(pad or 0))
        self.block_tables = self.dev[end:].view(torch.int32).view(n, max_blocks)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)

    def _view(self, buf, name: str):
        """name's bytes in buf (the device buffer or a host one: same layout)."""
        off, dtype = self._at[name]
        return buf[off:off + self.n * dtype.itemsize]

    def stage(self, staging: StagingBuffer, r: Rows, tables: np.ndarray) -> None:
        """Queue the copy of a step's rows (tables: [B, width] int32) padded to n rows."""
        b, width = tables.shape

        def fill(host: np.ndarray) -> int:
            for name, dtype, pad in self.ROWS:
                rows = self._view(host, name).view(dtype)
                values = getattr(r, _ROW_FIELDS.get(name, name))
                if values is None:  # (lora_slots of a step without adapters: all pad)
                    rows[:] = pad
                    continue
                rows[:len(values)] = values
                if pad is not None:
                    rows[b:] = pad
            end = self.tables_offset + b * self.max_blocks * 4
            host[self.tables_offset:end].view(np.int32).reshape(b, self.max_blocks)[:, :width] = tables
            return end

        staging.copy_into(self.dev, fill, self.nbytes)

    def meta(self, b: int, max_context_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b], query_start_loc=self.query_start_loc[:b + 1],
            num_decodes=b, max_query_len=1, max_context_len=max_context_len)


_ROW_FIELDS = {"slot_mapping": "slots"}  # GraphInputs name -> Rows field, where they differ


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_num_seqs: int,
                 max_model_len: int, block_size: int, device: torch.device, lora: bool = False):
        self.model, self.kv_caches, self.lora = model, kv_caches, lora
        self.max_model_len = max_model_len
        self.buckets = batch_size_buckets(max_num_seqs)
        max_blocks = -(-max_model_len // block_size)
        self.inputs = {b: GraphInputs(b, max_blocks, device) for b in self.buckets}
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (bucket, LoRA) ->
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self.replays: Counter = Counter()  # (bucket, LoRA) -> steps it ran

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, num_seqs: int, lora: bool = False) -> int | None:
        """The bucket whose graph (LoRA's, or the base's) runs a decode-only step of num_seqs
        (None: too many, or no such graphs captured)."""
        b = next((s for s in self.buckets if s >= num_seqs), None)
        return b if (b, lora) in self.graphs else None

    def _forward(self, b: int, lora: bool) -> torch.Tensor:
        x, lora_batch = self.inputs[b], self.model.model.lora_batch
        if lora:
            lora_batch.set_slots(x.lora_slots[:b])
        try:
            hidden = self.model(x.input_ids[:b], x.positions[:b], self.kv_caches, x.meta(b, self.max_model_len))
        finally:
            if lora:
                lora_batch.set_slots(None)
        return self.model.compute_logits(hidden)  # [b, vocab] float32

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        variants = (False, True) if self.lora else (False,)
        for key in [(b, lora) for b in reversed(self.buckets) for lora in variants]:
            self._forward(*key)  # warm-up: lazy inits (NCCL, kernel compiles) stay out of the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[key] = self._forward(*key)
            self.graphs[key] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s%s)", len(self.graphs), self.buckets,
                    ", each also with LoRA" if self.lora else "")

    def run(self, b: int, bucket: int, lora: bool) -> torch.Tensor:
        """Replay (bucket, lora)'s graph over the staged inputs -> logits [b, vocab] float32."""
        self.graphs[bucket, lora].replay()
        self.replays[bucket, lora] += 1
        return self.logits[bucket, lora][:b]


__all__ = ["DecodeGraphs", "GraphInputs", "batch_size_buckets"]
