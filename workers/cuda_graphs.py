"""CUDA graphs for decode steps: one graph per batch-size bucket.

A decode step of B sequences runs the graph of the smallest bucket >= B. The
graph reads fixed input buffers; rows B..bucket-1 are padding: slot -1 (nothing
written to the cache), context length 1 over block 0 (a harmless read), and
their outputs are ignored. Captured after the KV cache exists, largest bucket
first, all graphs sharing one memory pool (a step runs one graph at a time).

Attention inside a graph gets max_context_len = max_model_len, so the decode
kernel's grid (and its context split) is fixed at capture time and covers any
context a later replay brings.
"""
from __future__ import annotations

import logging

import torch

from workers.attention import AttentionMetadata

logger = logging.getLogger("raytp.cuda_graphs")


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (vLLM's spacing)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_num_seqs: int,
                 max_model_len: int, block_size: int, device: torch.device):
        self.model, self.kv_caches = model, kv_caches
        self.max_model_len = max_model_len
        self.buckets = batch_size_buckets(max_num_seqs)
        n, max_blocks = self.buckets[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b], query_start_loc=self.query_start_loc[:b + 1],
            num_decodes=b, max_query_len=1, max_context_len=self.max_model_len)

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b))

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            self._forward(b)  # warm-up: lazy inits (NCCL, kernel compiles) stay out of the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.graphs), self.buckets)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (bool(self.graphs) and meta.num_decodes == meta.num_seqs
                and meta.num_seqs <= self.max_batch and meta.max_context_len <= self.max_model_len)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Decode step through the smallest fitting graph -> hidden states [B, H]."""
        b = meta.num_seqs
        bucket = next(s for s in self.buckets if s >= b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.slot_mapping[b:bucket].fill_(-1)
        width = meta.block_tables.shape[1]
        self.block_tables[:b, :width].copy_(meta.block_tables)
        self.context_lens[:b].copy_(meta.context_lens)
        self.context_lens[b:bucket].fill_(1)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:b]


__all__ = ["DecodeGraphs", "batch_size_buckets"]
