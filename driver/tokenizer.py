"""Loading a checkpoint's tokenizer and turning prompts into token ids.

Only local directories are accepted (raytp never reaches the model hub), and
failures become ValueErrors that name the directory and what is missing.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

# Files that can define a tokenizer, in the order transformers prefers them.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The checkpoint directory's tokenizer (AutoTokenizer, local files only)."""
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer directory {path!r} does not exist; pass a local checkpoint "
                         f"directory holding tokenizer.json and tokenizer_config.json")
    present = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if not present:
        raise ValueError(
            f"{path!r} has no tokenizer files: expected tokenizer.json (or tokenizer.model, or "
            f"vocab.json + merges.txt) next to tokenizer_config.json; copy them from the original "
            f"checkpoint or pass tokenizer=<a directory that has them>")
    # Deferred: importing transformers takes seconds.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # A checkpoint that declares the generic class ships exactly what it means in
    # tokenizer.json. AutoTokenizer (transformers 5) would instead pick a class from
    # config.json's model_type for some types (qwen2 among them) and rebuild the
    # tokenizer with that family's pre-tokenizer and extra special tokens.
    generic = _declared_class(path) in _GENERIC_CLASSES and "tokenizer.json" in present
    loader = PreTrainedTokenizerFast if generic else AutoTokenizer
    try:
        return loader.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many kinds; callers get one, with the reason
        has_config = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
        hint = "" if has_config else " (tokenizer_config.json is missing)"
        raise ValueError(f"could not load the tokenizer in {path!r} from {', '.join(present)}"
                         f"{hint}: {type(e).__name__}: {e}") from e


def _declared_class(path: str) -> str | None:
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        return None  # AutoTokenizer reports a missing or broken config itself


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a plain prompt, with BOS if the tokenizer's config adds one."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    return [int(t) for t in tokenizer.encode(prompt, add_special_tokens=True)]


def load_chat_template(value: str) -> str:
    """vLLM's --chat-template: the path of a Jinja file, or the template itself."""
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"chat template {value!r} is neither a file nor a Jinja template (no '{{' in it)")
    return value


def apply_chat_template(tokenizer, messages: Sequence[Mapping[str, Any]], **template_kwargs) -> list[int]:
    """Token ids of a chat, rendered with the tokenizer's template and a generation prompt.

    The template writes any BOS itself, so the rendered text is tokenized
    without adding special tokens again (what transformers does too).
    """
    if not getattr(tokenizer, "chat_template", None) and not template_kwargs.get("chat_template"):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise ValueError(f"{name!r} has no chat template (no chat_template in tokenizer_config.json "
                         f"or chat_template.jinja); send a plain prompt to the completions API instead")
    if not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                        **template_kwargs)
    return _as_id_list(out)


def _as_id_list(out: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding (dict-like, "input_ids"); 4.x a list,
    # sometimes nested one level for a single conversation.
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):
        if len(out) != 1:
            raise ValueError(f"expected one conversation, the template produced {len(out)}")
        out = list(out[0])
    return [int(t) for t in out]


__all__ = ["load_tokenizer", "load_chat_template", "encode_prompt", "apply_chat_template"]
