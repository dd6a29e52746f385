"""The embedded demo checkpoint: a tiny random-weight Llama with a real tokenizer.

raytp must run end to end with no model hub, so `demo_checkpoint_dir()` builds a
complete Hugging Face checkpoint directory locally, once, and caches it:

- tokenizer: a byte-level BPE (vocab 512) trained with `tokenizers` on the text
  below, with Llama's special tokens (<unk>=0, <s>=1, </s>=2), chat tokens and
  a Jinja chat template; saved as a `PreTrainedTokenizerFast`.
- model: `LlamaForCausalLM` shapes (hidden 64, 2 layers, 4 heads, 2 KV heads),
  float32, random weights from a seeded generator, one safetensors file.

Everything is derived from constants in this file, so two builds give the same
tokenizer and the same weights. Building takes well under a second once torch
and transformers are imported. The cache key (DEMO_VERSION) must be bumped
whenever anything here changes what is written.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

DEMO_VERSION = "demo-v1"

# Llama's convention for the first ids; the chat tokens follow. The trainer
# assigns special tokens ids in this order, before the 256 byte symbols.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (UNK, BOS, EOS) + CHAT_TOKENS
VOCAB_SIZE = 512

# Each turn is "<|role|>\n{content}<|end|>\n"; a generation prompt opens the
# assistant's turn. BOS comes from the template, so callers tokenize the
# rendered text without adding special tokens again (as transformers does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Training text. Non-ASCII words are included so that some merges join the
# bytes of multi-byte characters and some characters stay split over several
# byte tokens: both cases matter to incremental detokenization.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving engine takes requests,
schedules them in batches, and returns tokens as soon as they are generated.
Every request has a prompt and a set of sampling parameters: the temperature,
the nucleus probability, the number of tokens to generate, and the strings
that stop the generation. The scheduler decides which requests run in each
step, and the workers compute the next token for every running sequence.

Memory for keys and values is divided into fixed blocks, like pages of virtual
memory. A block table maps the logical blocks of a sequence to physical blocks
on the device, so that sequences can grow without copying and share a common
prefix. When memory runs out, the scheduler preempts the newest sequences and
recomputes or swaps them later. Hello, world! How are you today? I am fine,
thank you. What is the weather like? It is sunny and warm, with a light wind.

Numbers and symbols appear too: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 3.14,
(parentheses), [brackets], {braces}, "quotes", 'apostrophes', a + b = c,
x * y / z, 50% of the time, #hashtags, @mentions, and e-mail@example.com.
def main(): return 0 if ok else 1  # code also appears in prompts

Un café au lait, s'il vous plaît. Crème brûlée et déjà vu à la française.
Größe, Straße, naïve, résumé, jalapeño, São Paulo, Ελληνικά, русский язык.
中文文本也会出现在提示中。你好，世界！日本語のテキスト。한국어 문장.
Emoji show up in chat: 😀 🎉 👍 🚀 ❤️ and the engine must stream them whole.
"""

_MODEL_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)
# Larger than transformers' default (0.02) so that the random model's logits are
# peaked enough for greedy generations to vary instead of repeating one token.
INIT_STD = 0.15


def build_demo_tokenizer():
    """Train the byte-level BPE on the embedded text; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text (and any token sequence) round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True) * 8, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # BOS on every encoded prompt, as Llama's tokenizer does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens=list(CHAT_TOKENS), model_max_length=_MODEL_SHAPE["max_position_embeddings"])
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the end-of-turn token: either ends a generation (like Llama 3's eos list)."""
    return [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids("<|end|>")]


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, std: float = INIT_STD) -> dict:
    """Seeded random tensors for a state dict: N(0, std) matrices and biases,
    norm weights near 1 (not exactly 1, so a loader that drops them is caught).

    Tensors are drawn in sorted-name order from a private generator, so the
    result depends only on (names, shapes, seed, std), not on global RNG state.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        t = torch.randn(shapes[name], generator=gen, dtype=torch.float32)
        out[name] = (1.0 + 0.1 * t) if name.endswith("norm.weight") else std * t
    return out


def _llama_shapes(vocab: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                  num_key_value_heads: int, intermediate_size: int, **_) -> dict:
    head_dim = hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden_size), "model.norm.weight": (hidden_size,),
              "lm_head.weight": (vocab, hidden_size)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden_size,),
            p + "post_attention_layernorm.weight": (hidden_size,),
            p + "self_attn.q_proj.weight": (num_attention_heads * head_dim, hidden_size),
            p + "self_attn.k_proj.weight": (kv, hidden_size),
            p + "self_attn.v_proj.weight": (kv, hidden_size),
            p + "self_attn.o_proj.weight": (hidden_size, num_attention_heads * head_dim),
            p + "mlp.gate_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": (hidden_size, intermediate_size),
        })
    return shapes


def write_demo_checkpoint(path: str) -> None:
    """Write the demo checkpoint into the (existing, empty) directory `path`.

    The weights are written with safetensors directly (the names and shapes of
    LlamaForCausalLM) rather than through a model object: that keeps the driver
    free of modeling code and the bytes stable.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    tokenizer = build_demo_tokenizer()
    tokenizer.save_pretrained(path)
    vocab = len(tokenizer)
    eos_ids = stop_token_ids(tokenizer)
    config = LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
                         **_MODEL_SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    config.save_pretrained(path)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids).save_pretrained(path)
    weights = random_weights(_llama_shapes(vocab, **_MODEL_SHAPE), seed=0)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(f"raytp {DEMO_VERSION}: tiny random-weight Llama for demos and tests. "
                f"Outputs are gibberish by design.\n")


def _cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "raytp")


def ensure_demo_checkpoint(cache_root: str | None = None) -> tuple[str, bool]:
    """Return (directory, created): build the demo checkpoint unless it is cached.

    Safe under concurrent callers: each builds into its own temporary directory
    next to the target and renames it into place; rename is atomic, so the
    target either does not exist or is complete. A loser of the race discards
    its copy and uses the winner's (the two are identical).
    """
    root = cache_root or _cache_root()
    target = os.path.join(root, DEMO_VERSION)
    created = False
    if not os.path.isfile(os.path.join(target, "config.json")):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{DEMO_VERSION}.tmp-", dir=root)
        try:
            write_demo_checkpoint(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache is readable like any other
            os.rename(tmp, target)
            created = True
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise  # not a lost race: a real failure
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    logger.info("using the embedded demo checkpoint at %s%s", target, " (created)" if created else "")
    return target, created


def demo_checkpoint_dir() -> str:
    """The demo checkpoint's directory under ~/.cache/raytp (or $XDG_CACHE_HOME/raytp)."""
    return ensure_demo_checkpoint()[0]


__all__ = ["DEMO_VERSION", "CHAT_TEMPLATE", "build_demo_tokenizer", "random_weights",
           "write_demo_checkpoint", "ensure_demo_checkpoint", "demo_checkpoint_dir", "stop_token_ids"]
