"""Tiny random-weight Hugging Face checkpoints for tests (no model hub needed).

`make_checkpoint(dir, style)` writes a complete checkpoint directory: config,
safetensors weights (optionally sharded, with an index) and the demo's real
byte-level BPE tokenizer with its chat template. Models are built with the
transformers classes themselves, so names, shapes and config fields are exactly
what a real Llama / Mistral / Qwen2 checkpoint has, and tests can compare
raytp against transformers token for token.

Weights are N(0, 0.15) (norms near 1, see driver.demo.random_weights): with
transformers' default std of 0.02 the logits are nearly flat and greedy
decoding of a random model soon repeats one token, which makes a parity test
weak. Building one checkpoint takes about 0.3 s once transformers is imported.
"""
from __future__ import annotations

import functools
import os

from driver.demo import INIT_STD, build_demo_tokenizer, random_weights, stop_token_ids

STYLES = ("llama", "mistral", "qwen2")

# Training the tokenizer is the slow part of a build; saving does not modify it.
_tokenizer = functools.lru_cache(maxsize=1)(build_demo_tokenizer)


def fresh_tokenizer():
    """A copy of the test checkpoints' tokenizer, to change (added tokens, template)."""
    import copy
    return copy.deepcopy(_tokenizer())


def _config(style: str, vocab: int, bos: int, eos: list[int], *, tie_word_embeddings: bool,
            num_heads: int, num_kv_heads: int, hidden: int, layers: int, intermediate: int,
            rope_scaling: dict | None, max_position_embeddings: int):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate, max_position_embeddings=max_position_embeddings,
                  bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=tie_word_embeddings,
                  rms_norm_eps=1e-5, rope_theta=10000.0)
    if rope_scaling is not None:
        common["rope_scaling"] = dict(rope_scaling)
    if style == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif style == "mistral":
        # No sliding window (as Mistral v0.2+): raytp does not implement one.
        cfg = transformers.MistralConfig(sliding_window=None, **common)
    elif style == "qwen2":
        # Qwen2 always has q/k/v biases; its config has no attention_bias field.
        cfg = transformers.Qwen2Config(use_sliding_window=False, **common)
    else:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return cfg


def _model_class(style: str):
    import transformers

    return {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
            "qwen2": transformers.Qwen2ForCausalLM}[style]


def make_checkpoint(dir: str, style: str = "llama", *, tie_word_embeddings: bool | None = None,
                    num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64, layers: int = 2,
                    intermediate: int = 128, rope_scaling: dict | None = None,
                    max_position_embeddings: int = 512, seed: int = 0, shards: int = 1,
                    init_std: float = INIT_STD, tokenizer=None) -> str:
    """Write a tiny `style` checkpoint into `dir` (created if needed); returns `dir`.

    tie_word_embeddings defaults to True for qwen2 and False otherwise. init_std scales the
    random weights (a wider model needs a smaller one to stay as well-conditioned).
    shards > 1 writes model.safetensors.index.json and at least `shards` files.
    """
    import torch

    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if tie_word_embeddings is None:
        tie_word_embeddings = style == "qwen2"
    os.makedirs(dir, exist_ok=True)
    tokenizer = tokenizer or _tokenizer()
    tokenizer.save_pretrained(dir)
    eos = stop_token_ids(tokenizer)
    cfg = _config(style, len(tokenizer), tokenizer.bos_token_id, eos,
                  tie_word_embeddings=tie_word_embeddings, num_heads=num_heads,
                  num_kv_heads=num_kv_heads, hidden=hidden, layers=layers,
                  intermediate=intermediate, rope_scaling=rope_scaling,
                  max_position_embeddings=max_position_embeddings)
    # The constructor's own init draws from the global RNG: keep callers' state intact.
    with torch.random.fork_rng(devices=[]):
        model = _model_class(style)(cfg).to(torch.float32).eval()
    # named_parameters() lists a tied lm_head once (as the embedding).
    params = dict(model.named_parameters())
    weights = random_weights({n: tuple(p.shape) for n, p in params.items()}, seed=seed, std=init_std)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    kwargs = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in params.values())
        kwargs["max_shard_size"] = max(1, total // shards)
    model.save_pretrained(dir, safe_serialization=True, **kwargs)
    return dir


# The demo's chat format, plus tools (listed in a system turn) and assistant turns that
# called tools, written Hermes' way: <tool_call>{"name": ..., "arguments": ...}</tool_call>.
TOOLS_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>\\n' }}{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '<|end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' + (call['function'] | tojson) + '</tool_call>' }}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def make_scripted_checkpoint(dir: str, script: list[str], chat_template: str = TOOLS_CHAT_TEMPLATE,
                             special: tuple[str, ...] = ()) -> str:
    """A tiny Llama whose greedy reply to any chat is `script` (each piece one added token;
    those in `special` special ones), then its end-of-turn token: every layer adds nothing to
    the residual stream (o_proj and down_proj are zero), so the logits depend on the last
    token alone, and lm_head maps the generation prompt's last token to script[0], script[0]
    to script[1], and so on."""
    import torch
    from safetensors.torch import load_file, save_file

    from driver.tokenizer import apply_chat_template

    tok = fresh_tokenizer()
    tok.add_tokens([piece for piece in script if piece not in special])
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.chat_template = chat_template
    make_checkpoint(dir, "llama", hidden=64, tokenizer=tok)
    chain = [apply_chat_template(tok, [{"role": "user", "content": "hi"}])[-1]]
    chain += [tok.convert_tokens_to_ids(piece) for piece in script] + [stop_token_ids(tok)[-1]]
    path = os.path.join(dir, "model.safetensors")
    weights = load_file(path)
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w.zero_()
    weights["model.norm.weight"].fill_(1.0)
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    head.zero_()
    for prev, nxt in zip(chain, chain[1:]):
        head[nxt] = 50 * embed[prev] / embed[prev].norm()
    save_file({k: v.contiguous() for k, v in weights.items()}, path, metadata={"format": "pt"})
    assert torch.equal(load_file(path)["lm_head.weight"], head)
    return dir


def make_lora_adapter(dir: str, base: str, targets: list[str], r: int = 8, alpha: int = 16,
                      seed: int = 0) -> tuple[str, str]:
    """A random PEFT LoRA adapter of checkpoint `base` in dir/adapter, and the base with the
    adapter merged into its weights (W + alpha / r * B A) in dir/merged: the reference that
    transformers runs. Returns (adapter dir, merged checkpoint dir)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    adapter, merged = os.path.join(dir, "adapter"), os.path.join(dir, "merged")
    shutil.copytree(base, merged)
    os.makedirs(adapter, exist_ok=True)
    weights = load_file(os.path.join(base, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name in sorted(weights):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        out_dim, in_dim = weights[name].shape
        a, b = torch.randn(r, in_dim, generator=g) * 0.1, torch.randn(out_dim, r, generator=g) * 0.1
        lora[f"base_model.model.{module}.lora_A.weight"] = a
        lora[f"base_model.model.{module}.lora_B.weight"] = b
        weights[name] = weights[name] + alpha / r * b @ a
    save_file(lora, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
                   "base_model_name_or_path": base, "task_type": "CAUSAL_LM"}, f)
    save_file(weights, os.path.join(merged, "model.safetensors"), metadata={"format": "pt"})
    return adapter, merged


__all__ = ["make_checkpoint", "make_scripted_checkpoint", "make_lora_adapter", "fresh_tokenizer", "STYLES", "TOOLS_CHAT_TEMPLATE"]
