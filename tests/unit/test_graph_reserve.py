"""cache_engine/profiler.py's reserve for the decode CUDA graphs: what it adds to the pool's
activations is what the graphs keep (the largest bucket's logits, every bucket's inputs),
twice the pool and logits with enable_lora's second graph per bucket."""
from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from cache_engine.profiler import CUDA_GRAPH_RESERVE_BYTES, graph_reserve_bytes
from workers.cuda_graphs import DecodeGraphs


def cfg(max_num_seqs=32, max_model_len=4096, tp=1, eager=False, lora=False):
    return NS(enforce_eager=eager, parallel=NS(tensor_parallel_size=tp), scheduler=NS(max_num_seqs=max_num_seqs),
              model=NS(max_model_len=max_model_len), cache=NS(block_size=16), lora=NS(enable_lora=lora))


def test_reserve_covers_the_graphs_inputs_and_logits():
    arch = NS(vocab_size=1000)
    c = cfg()
    graphs = DecodeGraphs(None, [], 32, 4096, 16, torch.device("cpu"))
    inputs = sum(x.nbytes for x in graphs.inputs.values())
    logits = 32 * 1000 * 4  # float32 [max_num_seqs, vocab]
    extra = graph_reserve_bytes(c, arch) - CUDA_GRAPH_RESERVE_BYTES
    assert inputs + logits <= extra <= 1.1 * (inputs + logits)
    assert graph_reserve_bytes(cfg(tp=2), arch) - CUDA_GRAPH_RESERVE_BYTES >= inputs + 2 * logits
    assert graph_reserve_bytes(cfg(eager=True), arch) == 0
    # enable_lora: a second graph per bucket (its own pool activations and logits), the same inputs
    assert graph_reserve_bytes(cfg(lora=True), arch) - inputs >= 2 * (CUDA_GRAPH_RESERVE_BYTES + logits)
