"""Our model and loader against Hugging Face transformers on tiny random checkpoints:
whole prompts, chunked prefill over a cached prefix, mixed decode + prefill
batches, and TP=2 over gloo. All float32 on the CPU."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from benchmarks.common import free_port
from driver.config import ModelArch
from workers.attention import AttentionMetadata
from workers.loader import dummy_weights, load_weights
from workers.model import LlamaForCausalLM

BLOCK_SIZE, NUM_BLOCKS = 16, 10
X_BLOCKS, Y_BLOCKS = [5, 2, 7], [0, 9]  # scattered on purpose
X_LEN, Y_LEN = 38, 31  # X: 3 blocks, the last partial; Y: 2 blocks
TOL = {"rtol": 1e-4, "atol": 1e-4}

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
CASES = {
    "llama3": ("LlamaConfig", dict(vocab_size=301, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # Llama's attention_bias puts biases on q, k, v and o; no GQA.
    "llama2_bias": ("LlamaConfig", dict(vocab_size=256, num_key_value_heads=4, attention_bias=True)),
    "mistral": ("MistralConfig", dict(vocab_size=280)),
    "qwen2_tied": ("Qwen2Config", dict(vocab_size=257, tie_word_embeddings=True)),
}


def _make_checkpoint(name: str, path: str):
    import transformers
    config_cls, extra = CASES[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so that attention patterns matter
        for pname, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, HF logits of prompt X [X_LEN, V], of prompt Y [Y_LEN, V])."""
    out = {}
    for name in CASES:
        path = str(tmp_path_factory.mktemp(name))
        hf = _make_checkpoint(name, path)
        x_ids, y_ids = _prompts(hf.config.vocab_size)
        with torch.no_grad():
            out[name] = (path, hf(x_ids[None]).logits[0], hf(y_ids[None]).logits[0])
    return out


def _prompts(vocab_size: int):
    gen = torch.Generator().manual_seed(1)
    return (torch.randint(0, vocab_size, (X_LEN,), generator=gen),
            torch.randint(0, vocab_size, (Y_LEN,), generator=gen))


def _load(path: str) -> LlamaForCausalLM:
    with open(os.path.join(path, "config.json")) as f:
        model = LlamaForCausalLM(ModelArch.from_hf_config(json.load(f)), torch.float32)
    load_weights(model, path, progress=False)
    return model


# ----------------------------------------------------------------------------- driving the model


def _step(seqs):
    """seqs: [(block_ids, first position, number of new tokens)], decodes first.
    Returns (positions [T], AttentionMetadata), built the way a model runner does."""
    positions, slots, qsl, ctx = [], [], [0], []
    for blocks, start, n in seqs:
        pos = list(range(start, start + n))
        positions += pos
        slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in pos]
        qsl.append(qsl[-1] + n)
        ctx.append(start + n)
    tables = torch.zeros(len(seqs), max(len(b) for b, _, _ in seqs), dtype=torch.int32)
    for i, (blocks, _, _) in enumerate(seqs):
        tables[i, :len(blocks)] = torch.tensor(blocks)
    num_decodes = next((i for i, (_, _, n) in enumerate(seqs) if n != 1), len(seqs))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64), block_tables=tables,
        context_lens=torch.tensor(ctx, dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), num_decodes=num_decodes,
        max_query_len=max(n for _, _, n in seqs), max_context_len=max(ctx))
    return torch.tensor(positions, dtype=torch.int64), meta


def _fresh_cache(model: LlamaForCausalLM):
    a, tp = model.arch, model.model.layers[0].self_attn.num_kv_heads
    shape = (NUM_BLOCKS, tp, BLOCK_SIZE, a.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(a.num_layers)]


def _run(model, ids, seqs, kv_caches):
    positions, meta = _step(seqs)
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, kv_caches, meta))


def run_scenarios(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Logits of: X as one prompt (with and without a cache); X over three steps
    (chunk, chunk + all of Y, X decode + Y's last chunk) -> rows of X and of Y."""
    x, y = _prompts(model.arch.vocab_size)
    out = {"whole": _run(model, x, [(X_BLOCKS, 0, X_LEN)], _fresh_cache(model)),
           "no_cache": _run(model, x, [(X_BLOCKS, 0, X_LEN)], None)}
    cache = _fresh_cache(model)
    s1 = _run(model, x[:20], [(X_BLOCKS, 0, 20)], cache)
    s2 = _run(model, torch.cat([x[20:37], y[:25]]), [(X_BLOCKS, 20, 17), (Y_BLOCKS, 0, 25)], cache)
    decode_cache = [(k.clone(), v.clone()) for k, v in cache]
    s3 = _run(model, torch.cat([x[37:], y[25:]]), [(X_BLOCKS, 37, 1), (Y_BLOCKS, 25, 6)], cache)
    out["steps_x"] = torch.cat([s1, s2[:17], s3[:1]])
    out["steps_y"] = torch.cat([s2[17:], s3[1:]])
    # Decode-only steps: X's next token alone (the fused layers at TP=1), then X's and Y's.
    out["decode_x"] = _run(model, x[37:], [(X_BLOCKS, 37, 1)], [(k.clone(), v.clone()) for k, v in decode_cache])
    out["decode"] = _run(model, torch.stack([x[37], y[25]]), [(X_BLOCKS, 37, 1), (Y_BLOCKS, 25, 1)],
                         decode_cache)
    return out


def _check(results, hf_x, hf_y):
    for key in ("whole", "no_cache", "steps_x"):
        assert results[key].shape == hf_x.shape and results[key].dtype == torch.float32
        torch.testing.assert_close(results[key], hf_x, **TOL, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(results["steps_y"], hf_y, **TOL)
    torch.testing.assert_close(results["decode"], torch.stack([hf_x[37], hf_y[25]]), **TOL)
    torch.testing.assert_close(results["decode_x"], hf_x[37:], **TOL)


# ----------------------------------------------------------------------------- TP=1


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(checkpoints, name):
    path, hf_x, hf_y = checkpoints[name]
    model = _load(path)
    assert hf_x.abs().max() > 1.0  # logits big enough that 1e-4 means something
    _check(run_scenarios(model), hf_x, hf_y)


def test_fused_decode_layers_equal_unfused(checkpoints, monkeypatch):
    """Small decode-only steps at TP=1 take forward_fused: the same ops in the same order,
    so float32 logits and cache writes are bit-identical to the unfused layers'."""
    import workers.model as M
    model = _load(checkpoints["llama2_bias"][0])  # q/k/v and o biases, no GQA
    calls = []
    fused = M.LlamaDecoderLayer.forward_fused
    monkeypatch.setattr(M.LlamaDecoderLayer, "forward_fused", lambda *a: calls.append(1) or fused(*a))
    x, y = _prompts(model.arch.vocab_size)
    runs = []
    for max_tokens in (8, 0):  # fused (as many tokens as the kernels take), then unfused
        monkeypatch.setattr(M, "FUSED_DECODE_MAX_TOKENS", max_tokens)
        cache = _fresh_cache(model)
        _run(model, torch.cat([x[:37], y[:25]]), [(X_BLOCKS, 0, 37), (Y_BLOCKS, 0, 25)], cache)
        logits = _run(model, torch.stack([x[37], y[25]]), [(X_BLOCKS, 37, 1), (Y_BLOCKS, 25, 1)], cache)
        runs.append((logits, cache))
    assert len(calls) == model.arch.num_layers  # only the fused run's decode step
    assert torch.equal(runs[0][0], runs[1][0])
    for (k0, v0), (k1, v1) in zip(runs[0][1], runs[1][1]):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_tied_embeddings_share_one_parameter(checkpoints):
    model = _load(checkpoints["qwen2_tied"][0])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_sharded_checkpoint_loads_the_same(checkpoints, tmp_path):
    import transformers
    path = checkpoints["llama3"][0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    a, b = _load(path), _load(str(tmp_path))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_loader_names_missing_and_unexpected_tensors(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    path = checkpoints["mistral"][0]
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    tensors["model.rotary_emb.inv_freq"] = torch.zeros(8)  # skipped, not an error
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"
                                         r".*no parameter for: model\.layers\.0\.mlp\.extra\.weight"):
        _load(str(tmp_path))
    tensors.pop("model.layers.0.mlp.extra.weight")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"wrong shape: model\.layers\.1\.self_attn\.k_proj\.weight"):
        _load(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="load_format='dummy'"):
        _load(str(tmp_path))


def _dummy_model(checkpoint_dir: str, seed: int, dtype=torch.float32) -> LlamaForCausalLM:
    with open(os.path.join(checkpoint_dir, "config.json")) as f:
        model = LlamaForCausalLM(ModelArch.from_hf_config(json.load(f)), dtype)
    dummy_weights(model, seed)
    return model


def test_dummy_weights(checkpoints):
    path = checkpoints["qwen2_tied"][0]
    a, b, c = _dummy_model(path, 3), _dummy_model(path, 3), _dummy_model(path, 4)
    w = a.model.layers[1].mlp.down_proj.weight
    assert torch.equal(w, b.model.layers[1].mlp.down_proj.weight)
    assert not torch.equal(w, c.model.layers[1].mlp.down_proj.weight)
    assert 0.015 < float(w.std()) < 0.025
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    half = _dummy_model(path, 3, torch.bfloat16)
    x, _ = _prompts(a.arch.vocab_size)
    logits = _run(half, x, [(X_BLOCKS, 0, X_LEN)], None)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- TP=2


def _tp_worker(rank: int, world: int, port: int, jobs: dict[str, str], out_path: str) -> None:
    from workers import parallel_state as ps
    torch.set_num_threads(1)  # two ranks on two cores
    ps.init_distributed("gloo", f"tcp://127.0.0.1:{port}", world, rank)
    try:
        results = {}
        for name, path in jobs.items():
            model = _load(path)
            attn = model.model.layers[0].self_attn
            assert attn.qkv_proj.weight.shape[0] == (attn.num_heads + 2 * attn.num_kv_heads) * 16
            assert attn.num_heads == 4 // world  # this rank holds only its heads
            assert model.lm_head.weight.shape[0] == -(-model.arch.vocab_size // world)
            results[name] = run_scenarios(model)
        dummy = _dummy_model(jobs["llama3"], seed=3)
        results["dummy"] = run_scenarios(dummy)["whole"]
        if rank == 0:
            torch.save(results, out_path)
    finally:
        ps.destroy_distributed()



def test_tensor_parallel_2_matches_transformers(checkpoints, tmp_path):
    import torch.multiprocessing as mp
    jobs = {name: path for name, (path, _, _) in checkpoints.items()}
    out_path = str(tmp_path / "tp_results.pt")
    mp.spawn(_tp_worker, args=(2, free_port(), jobs, out_path), nprocs=2, join=True)
    results = torch.load(out_path)
    for name, (_, hf_x, hf_y) in checkpoints.items():
        _check(results[name], hf_x, hf_y)
    # Dummy weights are TP-invariant: TP=2 equals TP=1 with the same seed.
    single = run_scenarios(_dummy_model(checkpoints["llama3"][0], seed=3))["whole"]
    torch.testing.assert_close(results["dummy"], single, rtol=1e-5, atol=1e-6)
