"""Llama-family decoder (Llama 2/3, Mistral, Qwen2), tensor-parallel.

One class serves the three architectures: they differ only in q/k/v bias
(Qwen2), tied embeddings and rope scaling, all read from ModelArch. Parameter
names are Hugging Face's after merging q/k/v into qkv_proj and gate/up into
gate_up_proj (vLLM's names); `stacked_params_mapping` maps checkpoint names
onto them.

Shapes below are per TP rank: Hq/Hk are this rank's query/kv heads, I this
rank's intermediate size; H (hidden) and T (tokens in the step) are global.
"""
from __future__ import annotations

import torch
from torch import nn

from driver.config import ModelArch
from ops.dispatch import ops_for
from ops.reference import rope_cos_sin_cache
from workers.attention import Attention, AttentionMetadata
from workers.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                            RMSNorm, RowParallelLinear, VocabParallelEmbedding)
from workers.parallel_state import tp_size

KVCache = tuple[torch.Tensor, torch.Tensor]  # (key_cache, value_cache) of one layer
# Decode steps of up to this many tokens run the fused layers at TP=1. The kernels take up to
# 8 (ops/cupy_decode.py), but from 2 tokens on cuBLAS's tensor-core tiles win: measured on an
# H200 by benchmarks/decode_step.py, one step at M=1 4.49 vs 4.60 ms unfused, M=2 4.90 vs 4.63.
FUSED_DECODE_MAX_TOKENS = 1


class RotaryEmbedding(nn.Module):
    """Holds the [max_position, head_dim] cos|sin table (float32, for accuracy in
    bf16 models). One instance is shared by all layers."""

    def __init__(self, arch: ModelArch):
        super().__init__()
        scaling = dict(arch.rope_scaling) if arch.rope_scaling else None
        cache = rope_cos_sin_cache(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                                   scaling)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return ops_for(q).rotary_embedding(positions, q, k, self.cos_sin_cache)


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, rotary_emb: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        d = arch.head_dim
        qkv_bias = arch.attention_bias or arch.architecture == "Qwen2ForCausalLM"
        # Llama's `attention_bias` puts a bias on o_proj too; Qwen2's q/k/v bias does not.
        o_bias = arch.attention_bias and arch.architecture != "Qwen2ForCausalLM"
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, d, arch.num_heads, arch.num_kv_heads,
                                          bias=qkv_bias, params_dtype=dtype)
        self.o_proj = RowParallelLinear(arch.num_heads * d, arch.hidden_size, bias=o_bias,
                                        params_dtype=dtype, reduce_results=False)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, scale=d ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache | None,
                meta: AttentionMetadata) -> torch.Tensor:
        T = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hk) * D]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hk, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hk, D]
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, kv_cache, meta)  # [T, Hq, D]
        return self.o_proj(out.reshape(T, q_size))  # [T, H], this rank's partial sums


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype):
        super().__init__()
        i = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [i, i], params_dtype=dtype)
        self.down_proj = RowParallelLinear(i, arch.hidden_size, params_dtype=dtype, reduce_results=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 I]
        return self.down_proj(ops_for(x).silu_and_mul(gate_up))  # [T, I] -> [T, H], partial sums


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rotary_emb: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(arch, rotary_emb, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(arch, dtype)

    def forward(self, positions, hidden, residual, kv_cache, meta):
        # vLLM's fused residual: `residual` carries the running sum of the stream, and
        # each norm adds the previous block's output into it before normalizing. That
        # output is per-rank partial sums (o_proj, down_proj), reduced inside the norm.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, partial=True)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual, partial=True)
        return self.mlp(hidden), residual  # the MLP's partial sums

    def forward_fused(self, positions, x, kv_cache, meta):
        """A small decode batch at TP=1, where the norms, RoPE, cache writes, SiLU and residual
        adds are launch latency, not work: each rides with the GEMV next to it (ops/
        decode_gemv.cu), four kernels and attention instead of up to eleven. x is the residual
        stream [T, H] (not a block output plus a residual); returns the next one. The same
        ops in the same order as forward(), so the same numbers up to rounding."""
        ops, attn, mlp = ops_for(x), self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        q = ops.norm_qkv_rope_cache(x, norm1.weight, norm1.eps, attn.qkv_proj.weight, attn.qkv_proj.bias,
                                    positions, attn.rotary_emb.cos_sin_cache, kv_cache[0], kv_cache[1],
                                    meta.slot_mapping, attn.num_heads, attn.num_kv_heads)  # [T, Hq, D]
        out = attn.attn.attend(q, kv_cache, meta).reshape(x.shape[0], -1)  # [T, Hq * D]
        x = ops.linear_add(out, attn.o_proj.weight, attn.o_proj.bias, x)  # stream + attention
        h = ops.norm_gate_up_silu(x, norm2.weight, norm2.eps, mlp.gate_up_proj.weight)  # [T, I]
        return ops.linear_add(h, mlp.down_proj.weight, None, x)  # stream + MLP


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype)
        rotary_emb = RotaryEmbedding(arch)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, rotary_emb, dtype)
                                    for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.lora_batch = None  # workers/lora.py's LoRABatch, with enable_lora

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, H]
        lora_rows = self.lora_batch is not None and self.lora_batch.active
        if not lora_rows and _fuse_decode(hidden, kv_caches, meta):  # (fused layers know no adapters)
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden = layer.forward_fused(positions, hidden, kv_cache, meta)  # the residual stream
            return self.norm(hidden)
        residual = None
        for i, layer in enumerate(self.layers):
            kv_cache = kv_caches[i] if kv_caches else None
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual, partial=True)
        return hidden  # [T, H]


def _fuse_decode(hidden: torch.Tensor, kv_caches: list | None, meta: AttentionMetadata) -> bool:
    """Decode-only steps of up to FUSED_DECODE_MAX_TOKENS at TP=1 run the fused layers. At
    TP > 1 the row-parallel outputs are partial sums, reduced by the norm that follows."""
    return (tp_size() == 1 and bool(kv_caches) and meta.num_decodes == meta.num_seqs
            and hidden.shape[0] <= FUSED_DECODE_MAX_TOKENS)


class LlamaForCausalLM(nn.Module):
    # (param name part, checkpoint name part, shard id)
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, arch: ModelArch, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.arch, self.dtype = arch, dtype
        self.model = LlamaModel(arch, dtype)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, dtype)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter, two users

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache] | None, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions [T] int64; kv_caches one (key, value) per layer, or None
        for a cache-less run. Returns the final hidden states [T, H]."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, H] (the rows that sample) -> logits [S, vocab] float32, every rank."""
        return self.lm_head.compute_logits(hidden).float()

    # ----------------------------------------------------------------------- checkpoint names

    def map_weight_name(self, name: str) -> tuple[str, object] | None:
        """Checkpoint tensor name -> (parameter name, shard id), or None to skip it."""
        if "rotary_emb.inv_freq" in name:
            return None  # recomputed, never loaded
        if name == "lm_head.weight" and self.arch.tie_word_embeddings:
            return None  # some tied checkpoints store it anyway; it equals embed_tokens
        for param_part, ckpt_part, shard_id in self.stacked_params_mapping:
            if f".{ckpt_part}." in name:
                return name.replace(f".{ckpt_part}.", f".{param_part}."), shard_id
        return name, None

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a Hugging Face checkpoint of this arch holds, with its full
        (unsharded) shape: what the loader expects, and what dummy weights generate."""
        a = self.arch
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        h, i = a.hidden_size, a.intermediate_size
        attn = self.model.layers[0].self_attn
        shapes = {"model.embed_tokens.weight": (a.vocab_size, h), "model.norm.weight": (h,)}
        if not a.tie_word_embeddings:
            shapes["lm_head.weight"] = (a.vocab_size, h)
        for n in range(a.num_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i)})
            if attn.qkv_proj.bias is not None:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if attn.o_proj.bias is not None:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
        return shapes


__all__ = ["LlamaForCausalLM", "KVCache"]
