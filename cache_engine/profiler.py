"""KV cache sizing on GPU by profiling (vLLM's method).

Run one cache-less forward at the largest step the scheduler can emit
(max_num_batched_tokens tokens over max_num_seqs sequences; with enable_lora, all
of them under an adapter slot, and the slots allocated) plus the logits and
a sampler-sized softmax, read the peak of torch's allocator, and give the KV
cache what is left of gpu_memory_utilization * total memory after the weights,
that peak, memory outside torch (CUDA context, NCCL, CuPy) and a reserve for
the CUDA graphs. The executor takes the minimum over the ranks.
"""
from __future__ import annotations

import logging

import torch

from cache_engine.cache_engine import bytes_per_block
from workers.attention import AttentionMetadata

logger = logging.getLogger("raytp.profiler")

GIB = 2 ** 30
CUDA_GRAPH_RESERVE_BYTES = GIB // 2  # graph pools hold decode activations (batch <= max_num_seqs)


def graph_reserve_bytes(cfg, arch) -> int:
    """What the decode graphs keep: their pool's activations, the float32 logits of the
    largest bucket (with TP, the gathered 2-byte logits beside them), and every bucket's
    input buffer (workers/cuda_graphs.py: a block-table row of max_model_len per row)."""
    if cfg.enforce_eager:
        return 0
    from workers.cuda_graphs import batch_size_buckets
    tp = cfg.parallel.tensor_parallel_size
    logits = cfg.scheduler.max_num_seqs * arch.vocab_size * (4 if tp == 1 else 8)
    row = 4 * -(-cfg.model.max_model_len // cfg.cache.block_size) + 72  # the table + 8 scalars
    graphs = CUDA_GRAPH_RESERVE_BYTES + logits
    if cfg.lora.enable_lora:  # a second graph per bucket, with its own logits
        graphs *= 2
    return graphs + sum(batch_size_buckets(cfg.scheduler.max_num_seqs)) * row


def _dummy_step(num_tokens: int, num_seqs: int, device: torch.device):
    """num_tokens new tokens split as evenly as possible into num_seqs whole prompts."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    qsl = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros(num_seqs, 1, dtype=torch.int32, device=device),
        context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=qsl.to(device), num_decodes=0, max_query_len=max(lens),
        max_context_len=max(lens))
    return positions.to(device), meta


@torch.inference_mode()
def profile_num_gpu_blocks(worker) -> int:
    cfg = worker.config
    sched, arch = cfg.scheduler, cfg.model.arch
    num_tokens = min(sched.max_num_batched_tokens, sched.max_num_seqs * cfg.model.max_model_len)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    positions, meta = _dummy_step(num_tokens, sched.max_num_seqs, worker.device)
    input_ids = torch.randint(0, arch.vocab_size, (num_tokens,), device=worker.device)
    if worker.lora is not None:  # every token under an adapter: its grouped products' activations too
        worker.lora.batch.groups = [(torch.arange(num_tokens, device=worker.device), 0)]
    try:
        hidden = worker.model(input_ids, positions, None, meta)
    finally:
        if worker.lora is not None:
            worker.lora.batch.groups = []
    rows = torch.arange(min(sched.max_num_seqs, num_tokens), device=worker.device)
    logits = worker.model.compute_logits(hidden[rows])
    torch.sort(torch.softmax(logits, dim=-1), dim=-1)  # the sampler's top-p sort
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del hidden, logits
    free, total = torch.cuda.mem_get_info()
    non_torch = (total - free) - torch.cuda.memory_reserved()
    reserve = graph_reserve_bytes(cfg, arch)
    budget = total * cfg.cache.gpu_memory_utilization - peak - non_torch - reserve
    per_block = bytes_per_block(arch, cfg.parallel.tensor_parallel_size, cfg.cache.block_size,
                                worker.dtype)
    num_blocks = max(0, int(budget // per_block))
    logger.info("rank %d: total %.2f GiB x %.2f; torch peak %.2f GiB (weights + a %d-token step), "
                "outside torch %.2f GiB, graph reserve %.2f GiB -> KV cache %.2f GiB = %d blocks",
                worker.rank, total / GIB, cfg.cache.gpu_memory_utilization, peak / GIB, num_tokens,
                non_torch / GIB, reserve / GIB, num_blocks * per_block / GIB,
                num_blocks)
    torch.cuda.empty_cache()
    return num_blocks
