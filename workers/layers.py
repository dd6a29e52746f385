"""Tensor-parallel layers (Megatron-style, with vLLM's names).

Column-parallel layers split the output features across TP ranks and need no
communication; row-parallel layers split the input features and all-reduce the
partial sums. An MLP or attention block is column -> (local math) -> row, so it
costs exactly one all-reduce.

Every parameter carries `param.weight_loader(param, loaded, shard_id=None)`.
`loaded` is a safetensors slice (`safe_open(...).get_slice(name)`) or a tensor;
the loader indexes it with `loaded[a:b]` / `loaded[:, a:b]`, so a rank reads
only its own part of the checkpoint from disk. Parameters are created on the
current default device (build the model under `with torch.device(...)`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ops.dispatch import ops_for
from workers.parallel_state import (all_gather_last_dim, all_reduce, all_reduce_add_rms_norm, tp_rank,
                                    tp_size)


def _param(*shape: int, dtype: torch.dtype | None) -> nn.Parameter:
    # Inference only: no autograd bookkeeping.
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    # copy_ would broadcast a wrong shape silently; a wrong checkpoint must fail loudly.
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch: this rank expects {tuple(dst.shape)}, "
                         f"the checkpoint slice is {tuple(src.shape)}")
    dst.copy_(src)  # also casts to the parameter's dtype and moves to its device


def default_weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    """Replicated parameter: every rank loads the whole tensor."""
    _copy(param.data, loaded[:])


def _set_loader(module: nn.Module, loader) -> None:
    for p in module.parameters(recurse=False):
        p.weight_loader = loader


# --------------------------------------------------------------------------- linears


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split: rank r keeps rows
    [r * out/tp, (r+1) * out/tp). The output stays sharded (no gather)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        tp = tp_size()
        if output_size % tp:
            raise ValueError(f"output size {output_size} is not divisible by tp_size {tp}")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = output_size // tp
        self.weight = _param(self.output_size_per_partition, input_size, dtype=params_dtype)
        self.bias = _param(self.output_size_per_partition, dtype=params_dtype) if bias else None
        self.lora = None  # workers/lora.py's LoRALayer, with enable_lora
        _set_loader(self, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        n, r = param.shape[0], tp_rank()  # rows (weight) or entries (bias) of this rank
        _copy(param.data, loaded[r * n:(r + 1) * n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # [T, output_size_per_partition]
        return out if self.lora is None else self.lora.apply(x, out)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears of one input stacked along the output
    (gate_proj | up_proj). Each rank holds its slice of every one, in order, so
    the local output is (gate_r | up_r), what silu_and_mul expects."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 params_dtype: torch.dtype | None = None):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: int | None = None) -> None:
        if shard_id is None:
            raise ValueError("MergedColumnParallelLinear loads one stacked shard at a time (0, 1, ...)")
        tp, r = tp_size(), tp_rank()
        size = self.output_sizes[shard_id] // tp
        offset = sum(self.output_sizes[:shard_id]) // tp
        _copy(param.data[offset:offset + size], loaded[r * size:(r + 1) * size])


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj | k_proj | v_proj stacked; heads are split across ranks, so each
    rank's output is (q heads_r | k heads_r | v heads_r) of its own heads."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False, params_dtype: torch.dtype | None = None):
        tp = tp_size()
        if total_num_heads % tp or total_num_kv_heads % tp:
            raise ValueError(f"tp_size {tp} must divide the number of heads ({total_num_heads}) "
                             f"and of key/value heads ({total_num_kv_heads})")
        self.head_dim = head_dim
        self.num_heads, self.num_kv_heads = total_num_heads // tp, total_num_kv_heads // tp
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        total = (total_num_heads + 2 * total_num_kv_heads) * head_dim
        super().__init__(hidden_size, total, bias, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: str | None = None) -> None:
        offsets = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                   "v": (self.q_size + self.kv_size, self.kv_size)}
        if shard_id not in offsets:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        offset, size = offsets[shard_id]
        r = tp_rank()
        _copy(param.data[offset:offset + size], loaded[r * size:(r + 1) * size])


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split; x arrives sharded (the output of
    a column-parallel layer) and each rank's partial sums are all-reduced. The bias
    (replicated) is added on rank 0 only, so the sum counts it once. With
    reduce_results=False the partial sums are returned: the caller reduces them
    (fused with the norm that follows: parallel_state.all_reduce_add_rms_norm)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None, reduce_results: bool = True):
        super().__init__()
        tp = tp_size()
        if input_size % tp:
            raise ValueError(f"input size {input_size} is not divisible by tp_size {tp}")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size // tp
        self.reduce_results = reduce_results
        self.add_bias = tp_rank() == 0  # the replicated bias enters the sum once
        self.weight = _param(output_size, self.input_size_per_partition, dtype=params_dtype)
        self.bias = _param(output_size, dtype=params_dtype) if bias else None
        self.lora = None  # workers/lora.py's LoRALayer, with enable_lora
        _set_loader(self, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:  # the bias: replicated
            return default_weight_loader(param, loaded)
        n, r = param.shape[1], tp_rank()
        _copy(param.data, loaded[:, r * n:(r + 1) * n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias if self.add_bias else None)  # [T, output_size], partial
        if self.lora is not None:  # (its partial sums join this layer's)
            out = self.lora.apply(x, out)
        return all_reduce(out) if self.reduce_results else out


# --------------------------------------------------------------------------- vocabulary


class VocabParallelEmbedding(nn.Module):
    """The vocabulary is padded to a multiple of tp_size and split into equal
    contiguous ranges; rank r holds rows [vocab_start, vocab_start + per_partition).
    Rows past the real vocabulary are zero. Ids outside a rank's range embed to
    zero there, so the all-reduce assembles each id's row from its owner."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        tp, r = tp_size(), tp_rank()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_padded = -(-num_embeddings // tp) * tp
        self.num_embeddings_per_partition = self.num_embeddings_padded // tp
        self.vocab_start = r * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = _param(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype)
        _set_loader(self, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        n = max(self.vocab_end - self.vocab_start, 0)  # real rows on this rank
        param.data[n:].zero_()
        _copy(param.data[:n], loaded[self.vocab_start:self.vocab_start + n])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)  # [T, H]
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight)  # [T, H]; rows of foreign ids are wrong...
        out.masked_fill_(~in_range[..., None], 0)  # ...so zero them before the sum
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded by vocabulary like the embedding (and it may
    share the embedding's weight: tied embeddings)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, H] -> logits [S, vocab] on every rank (only rank 0 samples)."""
        if tp_size() == 1 and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16):
            # Float32 straight out of the GEMM (the sampler's dtype): no upcast kernel after
            # it (-4 us a decode step on an H200). With TP the gather stays 2-byte.
            return torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)[:, :self.num_embeddings]
        logits = F.linear(hidden, self.weight)  # [S, per_partition]
        logits = all_gather_last_dim(logits)  # [S, vocab_padded], rank order = vocab order
        return logits[:, :self.num_embeddings]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden)


# --------------------------------------------------------------------------- norm


class RMSNorm(nn.Module):
    """Replicated RMSNorm; with a residual it is the fused add + norm of vLLM:
    forward(x, residual) -> (norm(x + residual), x + residual). partial=True (with a
    residual): x is a row-parallel layer's unreduced output, summed over the ranks
    first (fused)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        _set_loader(self, default_weight_loader)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, partial: bool = False):
        if residual is None:
            return ops_for(x).rms_norm(x, self.weight, self.eps)
        if partial:
            return all_reduce_add_rms_norm(x, residual, self.weight, self.eps)
        return ops_for(x).fused_add_rms_norm(x, residual, self.weight, self.eps)


__all__ = ["ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
           "RowParallelLinear", "VocabParallelEmbedding", "ParallelLMHead", "RMSNorm",
           "default_weight_loader"]
