"""Tokenizer, incremental detokenizer, stop strings, the demo checkpoint and the
test checkpoints (tests.checkpoints) -- all on the CPU, no model hub."""
from __future__ import annotations

import json
import logging
import os
import random

import pytest
import torch

from driver.demo import build_demo_tokenizer, ensure_demo_checkpoint
from driver.detokenizer import (IncrementalDetokenizer, find_stop, match_stop, next_stream_delta,
                                stop_buffer_length)
from driver.tokenizer import apply_chat_template, encode_prompt, load_tokenizer
from tests.checkpoints import make_checkpoint

FFFD = "\ufffd"
MULTILINGUAL = ("Un café au lait, s'il vous plaît. 中文文本也会出现。 Emoji: 😀 🎉 👍 🚀 ❤️ ok. "
                "Unseen: 🦀 漢字 ñandú Ω≈ç√∫ 🇫🇷 👩‍👩‍👧 end.")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    path, created = ensure_demo_checkpoint(str(tmp_path_factory.mktemp("cache")))
    assert created
    return path


@pytest.fixture(scope="module")
def tok(demo_dir):
    return load_tokenizer(demo_dir)


def _stream(tok, prompt_ids, output_ids, skip_special_tokens=True):
    """Run the detokenizer token by token; check it against a full decode at every step."""
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    for k in range(1, len(output_ids) + 1):
        delta = detok.step([output_ids[k - 1]])
        full = tok.decode(output_ids[:k], skip_special_tokens=skip_special_tokens)
        assert full.startswith(detok.text), (k, full, detok.text)
        if not full.endswith(FFFD):
            assert detok.text == full, (k, full, detok.text)
        if FFFD not in full:
            assert FFFD not in delta
    return detok


# -- tokenizer --------------------------------------------------------------------------------

def test_encode_prompt_adds_bos(tok):
    ids = encode_prompt(tok, "Hello, world!")
    assert ids[0] == tok.bos_token_id == 1
    assert all(isinstance(t, int) for t in ids)
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, world!"


def test_apply_chat_template_renders(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = apply_chat_template(tok, messages)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1  # BOS from the template only, not added twice
    assert tok.decode(ids) == ("<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n"
                               "<|assistant|>\n")
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids


def test_apply_chat_template_without_template_is_a_clear_error():
    t = build_demo_tokenizer()
    t.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(t, [{"role": "user", "content": "hi"}])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer files") as e:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match="could not load the tokenizer"):
        load_tokenizer(str(tmp_path))


# -- incremental detokenization ---------------------------------------------------------------

@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_matches_full_decode_random_tokens(tok, skip_special_tokens):
    rng = random.Random(1234)
    # Mostly single-byte tokens (ids 7..262): many split and invalid UTF-8 sequences.
    def pick():
        return rng.randrange(7, 263) if rng.random() < 0.6 else rng.randrange(len(tok))

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    checked = 0
    for _ in range(120):
        prompt = [pick() for _ in range(rng.randrange(0, 12))]
        output = [pick() for _ in range(rng.randrange(1, 40))]
        if decode(prompt + output) != decode(prompt) + decode(output):
            continue  # the prompt ends mid-character: the output's own text is not defined
        _stream(tok, prompt, output, skip_special_tokens)
        checked += 1
    assert checked > 60


def test_incremental_multibyte_text_never_emits_replacement_char(tok):
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    # Some characters are split over several byte tokens: the case under test.
    assert any(FFFD in tok.decode([i]) for i in ids)
    for cut in (0, 1, 5, 17):  # the prompt/output boundary anywhere, even mid-character
        prompt, output = encode_prompt(tok, "Hi!") + ids[:cut], ids[cut:]
        detok = _stream(tok, prompt, output)
        assert FFFD not in detok.text
        if FFFD not in tok.decode(ids[:cut]):  # the prompt did not end mid-character
            assert detok.text == tok.decode(output)
    assert _stream(tok, [], ids).text == MULTILINGUAL


def test_incremental_steps_of_several_tokens(tok):
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    one = IncrementalDetokenizer(tok, [1])
    many = IncrementalDetokenizer(tok, [1])
    deltas = [many.step(ids[i:i + 3]) for i in range(0, len(ids), 3)]
    for i in ids:
        one.step([i])
    assert "".join(deltas) == many.text == one.text == MULTILINGUAL


def test_incremental_special_tokens_and_out_of_vocab_ids(tok):
    end = tok.convert_tokens_to_ids("<|end|>")
    ids = tok.encode("Hello", add_special_tokens=False) + [end, len(tok) + 7] + \
        tok.encode(" world", add_special_tokens=False)
    assert _stream(tok, [1], ids, skip_special_tokens=True).text == "Hello world"
    kept = IncrementalDetokenizer(tok, [1], skip_special_tokens=False)
    kept.step(ids)
    assert kept.text == "Hello<|end|> world"


# -- stop strings -----------------------------------------------------------------------------

def test_find_stop_truncates_and_excludes():
    assert find_stop("hello world", ("wor",), 5) == ("hello ", True)
    assert find_stop("hello world", ("wor",), 5, include=True) == ("hello wor", True)  # include_stop_str_in_output
    assert find_stop("hello world", ("xyz",), 11) == ("hello world", False)
    assert find_stop("STOP here", ("STOP",), 9) == ("", True)
    assert find_stop("abc", (), 3) == ("abc", False)


def test_find_stop_spanning_deltas_and_earliest_match():
    assert find_stop("xab" + "c", ("abc",), 1) == ("x", True)  # completed by the new char
    # A stop string wholly in old text was handled when it arrived: not searched again.
    assert find_stop("abc stop def", ("stop",), 3) == ("abc stop def", False)
    assert match_stop("a STOP b END", ("END", "STOP"), 12) == (2, "STOP")
    assert find_stop("a STOP b END", ("END", "STOP"), 12) == ("a ", True)


def test_stop_strings_while_streaming(tok):
    text = "The quick brown fox jumps over the lazy dog. 中文 stop😀 here"
    ids = tok.encode(text, add_special_tokens=False)
    for stop in (("lazy",), (" dog.",), ("文 s",), ("😀",), ("never", "jumps")):
        detok, stopped = IncrementalDetokenizer(tok, [1]), False
        for i in ids:
            delta = detok.step([i])
            out, stopped = find_stop(detok.text, stop, len(delta))
            if stopped:
                break
        expected = min((text.index(s) for s in stop if s in text))
        assert stopped and out == text[:expected], (stop, out)


def test_next_stream_delta_holds_back_possible_stop_prefix():
    stop = ("abc",)
    assert stop_buffer_length(stop) == 2 and stop_buffer_length(()) == 0
    assert next_stream_delta("hello ab", 0, stop, finished=False) == "hello "
    assert next_stream_delta("hello ab", 6, stop, finished=True) == "ab"
    assert next_stream_delta("hel", 2, (), finished=False) == "l"
    assert next_stream_delta("x", 1, stop, finished=False) == ""


# -- the demo checkpoint ----------------------------------------------------------------------

def _files(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def test_demo_checkpoint_is_deterministic_and_cached(tmp_path, demo_dir, caplog):
    caplog.set_level(logging.INFO, logger="driver.demo")
    other, created = ensure_demo_checkpoint(str(tmp_path))
    assert created and "using the embedded demo checkpoint at" in caplog.text
    a, b = _files(demo_dir), _files(other)
    assert a.keys() == b.keys() >= {"tokenizer.json", "model.safetensors", "config.json"}
    assert a["tokenizer.json"] == b["tokenizer.json"]
    assert a["model.safetensors"] == b["model.safetensors"]
    assert a == b
    again, created = ensure_demo_checkpoint(str(tmp_path))
    assert again == other and not created
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left


def test_demo_checkpoint_loads_with_transformers(demo_dir, tok):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(demo_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = json.load(open(os.path.join(demo_dir, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == len(tok) == 512
    assert cfg["bos_token_id"] == tok.bos_token_id == 1
    assert cfg["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")] == [2, 6]
    assert _greedy_distinct(model, tok) >= 5


# -- test checkpoints -------------------------------------------------------------------------

def _greedy_distinct(model, tok, n=20) -> int:
    ids = encode_prompt(tok, "Hello, how are you today?")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return len(set(out[0, len(ids):].tolist()))


@pytest.mark.parametrize("name", ["llama_ckpt", "mistral_ckpt", "qwen2_ckpt"])
def test_checkpoint_fixtures_load_and_generate(name, request):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(name)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = json.load(open(os.path.join(path, "config.json")))
    style = name.removesuffix("_ckpt")
    assert cfg["model_type"] == style and cfg["dtype"] == "float32"
    assert cfg["tie_word_embeddings"] == (style == "qwen2")
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (style != "qwen2")
    assert ("model.layers.0.self_attn.q_proj.bias" in keys) == (style == "qwen2")
    tok = load_tokenizer(path)
    assert tok.chat_template and len(tok) == cfg["vocab_size"]
    assert _greedy_distinct(model, tok) >= 5


def test_make_checkpoint_sharded_and_options(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_checkpoint(str(tmp_path / "sharded"), "llama", shards=2, layers=3, num_kv_heads=4,
                           tie_word_embeddings=True, seed=3,
                           rope_scaling={"rope_type": "linear", "factor": 2.0})
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) >= 2 and all(os.path.isfile(os.path.join(path, f)) for f in shard_files)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["num_hidden_layers"] == 3 and cfg["num_key_value_heads"] == 4
    assert cfg["rope_parameters"]["rope_type"] == "linear"
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with pytest.raises(ValueError, match="style"):
        make_checkpoint(str(tmp_path / "bad"), "gpt2")


def test_ids_the_tokenizer_does_not_know_have_no_text(tok):
    """A model's vocab can be larger than its tokenizer's (padded, or a benchmark's shapes):
    such ids, in the prompt or generated, add no text and break nothing."""
    beyond = len(tok) + 7
    words = encode_prompt(tok, " hello world")
    detok = IncrementalDetokenizer(tok, [beyond, beyond + 1, *words[:1], beyond])
    assert detok.step([beyond + 2]) == ""
    assert detok.step(words[1:]) == tok.decode(words[1:])
