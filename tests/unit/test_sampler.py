"""Unit tests of workers/sampler.py (CPU, fast, deterministic: every random draw is seeded)."""
from __future__ import annotations

import math

import pytest
import torch

from driver.sampling_params import SamplingParams
from workers.logits_processors import apply_min_tokens, apply_penalties, process_logits
from workers.sampler import Sampler, SamplingRow, apply_top_k_top_p_min_p, row_seed

V = 32


def row(params: SamplingParams | None = None, *, prompt=(1, 2, 3), output=(), seq_index=0,
        stop_token_ids=()) -> SamplingRow:
    params = params or SamplingParams(temperature=0.0)
    return SamplingRow(params=params, seq_index=seq_index, token_ids=list(prompt) + list(output),
                       num_prompt_tokens=len(prompt), stop_token_ids=tuple(stop_token_ids))


def rand_logits(rows: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


# --------------------------------------------------------------------------------- greedy

def test_empty_batch():
    assert Sampler()(torch.empty(0, V), []) == ([], [])


def test_greedy_is_argmax():
    logits = rand_logits(6)
    tokens, lps = Sampler()(logits, [row() for _ in range(6)])
    assert tokens == logits.argmax(-1).tolist()
    assert lps == [None] * 6


def test_greedy_ties_lowest_id():
    logits = torch.zeros(2, V)
    logits[0, [5, 9]] = 4.0
    logits[1, [0, 31]] = 1.0
    tokens, _ = Sampler()(logits, [row(), row()])
    assert tokens == [5, 0]


def test_tiny_temperature_is_greedy():
    logits = rand_logits(4)
    tokens, _ = Sampler()(logits, [row(SamplingParams(temperature=1e-7)) for _ in range(4)])
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_is_greedy(temperature):
    logits = rand_logits(64, seed=1)
    rows = [row(SamplingParams(temperature=temperature, top_k=1)) for _ in range(64)]
    tokens, _ = Sampler(seed=3)(logits, rows)
    assert tokens == logits.argmax(-1).tolist()


def test_tiny_top_p_is_greedy():
    logits = rand_logits(64, seed=2, scale=0.5)  # flat-ish: the top token alone is < 50%
    rows = [row(SamplingParams(temperature=1.5, top_p=1e-6)) for _ in range(64)]
    tokens, _ = Sampler(seed=4)(logits, rows)
    assert tokens == logits.argmax(-1).tolist()


def test_min_p_near_one_is_greedy():
    logits = rand_logits(64, seed=3, scale=0.5)
    rows = [row(SamplingParams(temperature=1.5, min_p=0.999)) for _ in range(64)]
    tokens, _ = Sampler(seed=5)(logits, rows)
    assert tokens == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_batch():
    logits = rand_logits(8, seed=4)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)] * 4
    tokens, _ = Sampler()(logits, [row(p) for p in params])
    assert tokens == logits.argmax(-1).tolist()


# ------------------------------------------------------------------------- distributions

def test_temperature_follows_softmax():
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 20000
    for temperature in (0.5, 2.0):
        logits = base.expand(n, -1).clone()
        rows = [row(SamplingParams(temperature=temperature)) for _ in range(n)]
        tokens, _ = Sampler(seed=1234)(logits, rows)
        counts = torch.bincount(torch.tensor(tokens), minlength=8).double()
        target = torch.softmax(base.double() / temperature, -1)
        other = torch.softmax(base.double() / (2.5 - temperature), -1)  # the other temperature
        # df = 7: P(chi2 > 40) ~ 1e-6. Fixed seeds make this deterministic anyway.
        assert chi_square(counts, target) < 40.0
        assert chi_square(counts, other) > 500.0


def test_top_k_never_samples_outside():
    logits = rand_logits(1, seed=5).expand(4000, -1).clone()
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    rows = [row(SamplingParams(temperature=10.0, top_k=5)) for _ in range(4000)]
    tokens, _ = Sampler(seed=6)(logits, rows)
    assert set(tokens) == top5  # never outside, and every one of them drawn


def test_top_k_per_row_values():
    logits = rand_logits(1, seed=6).expand(3000, -1).clone()
    ks = [2, 7, -1] * 1000
    rows = [row(SamplingParams(temperature=50.0, top_k=k)) for k in ks]
    tokens, _ = Sampler(seed=7)(logits, rows)
    order = torch.argsort(logits[0], descending=True).tolist()
    for k in (2, 7):
        drawn = {t for t, kk in zip(tokens, ks) if kk == k}
        assert drawn == set(order[:k])
    assert len({t for t, kk in zip(tokens, ks) if kk == -1}) > 20  # unrestricted


def test_top_p_keeps_smallest_prefix():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0).repeat(3, 1)
    top_p = torch.tensor([0.75, 0.85, 1.0])
    out = apply_top_k_top_p_min_p(logits, top_p=top_p)
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False]
    assert kept[1].tolist() == [True, True, True, False]
    assert kept[2].all()
    assert torch.equal(out[kept], logits[kept])  # survivors unchanged


def test_top_p_sampling_support():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, -1).clone()
    rows = [row(SamplingParams(temperature=1.0, top_p=0.75)) for _ in range(4000)]
    tokens, _ = Sampler(seed=8)(logits, rows)
    counts = torch.bincount(torch.tensor(tokens), minlength=4).double()
    assert counts[0] == 0 and counts[2] == 0
    assert chi_square(counts[[1, 3]], torch.tensor([0.625, 0.375], dtype=torch.double)) < 25.0


def test_top_p_after_top_k_renormalises():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().unsqueeze(0)
    # top_k=2 -> [4/7, 3/7]; top_p=0.5 keeps only token 0 (0.571 >= 0.5).
    out = apply_top_k_top_p_min_p(logits, top_k=torch.tensor([2]), top_p=torch.tensor([0.5]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    # top_p=0.6 on the renormalised distribution keeps both (0.571 < 0.6).
    out = apply_top_k_top_p_min_p(logits, top_k=torch.tensor([2]), top_p=torch.tensor([0.6]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_min_p_threshold():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0).repeat(2, 1)
    out = apply_top_k_top_p_min_p(logits, min_p=torch.tensor([0.2, 0.0]))
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    assert torch.isfinite(out[1]).all()


def test_top_k_ties_and_disabled():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0], [3.0, 1.0, 3.0, 2.0]])
    out = apply_top_k_top_p_min_p(logits, top_k=torch.tensor([1, 4]))
    assert torch.isfinite(out[0]).tolist() == [True, False, True, False]
    assert torch.isfinite(out[1]).all()


# ----------------------------------------------------------------------------- penalties

def _expected_penalised(logits_row, params, prompt, output):
    x = logits_row.clone()
    seen = set(prompt) | set(output)
    for t in range(x.shape[0]):
        v = float(x[t])
        if t in seen and params.repetition_penalty != 1.0:
            v = v / params.repetition_penalty if v > 0 else v * params.repetition_penalty
        c = output.count(t)
        v -= params.frequency_penalty * c
        v -= params.presence_penalty * (1.0 if c > 0 else 0.0)
        x[t] = v
    return x


def test_penalties_exact_formula():
    logits = rand_logits(4, seed=9)
    specs = [
        (SamplingParams(temperature=0.0, repetition_penalty=1.3), [1, 4, 7], [4, 9, 9]),
        (SamplingParams(temperature=0.0, frequency_penalty=0.7, presence_penalty=0.4),
         [2, 3, 5], [3, 3, 3, 8, 11]),
        (SamplingParams(temperature=0.0), [1, 2], [3]),  # no penalties: untouched
        (SamplingParams(temperature=0.8, repetition_penalty=0.8, frequency_penalty=-0.5,
                        presence_penalty=1.5), [0, 0, 31], [31, 12, 12, 0]),
    ]
    rows = [row(p, prompt=pr, output=out) for p, pr, out in specs]
    before = logits.clone()
    out = process_logits(logits, rows)
    assert torch.equal(logits, before)  # process_logits does not modify its input
    for i, (p, pr, o) in enumerate(specs):
        torch.testing.assert_close(out[i], _expected_penalised(logits[i], p, pr, o),
                                   rtol=1e-6, atol=1e-6)
    assert torch.equal(out[2], logits[2])

    x = logits.clone()
    assert apply_penalties(x, rows) is x  # in place
    torch.testing.assert_close(x, out)


def test_repetition_penalty_sign_handling():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    r = row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0], output=[1])
    out = process_logits(logits, [r])
    assert out[0].tolist() == [1.0, -4.0, 2.0, -2.0]


def test_frequency_presence_only_count_outputs():
    logits = torch.zeros(1, 8)
    r = row(SamplingParams(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5),
            prompt=[1, 1, 2], output=[2, 3, 3])
    out = process_logits(logits, [r])
    assert out[0].tolist() == [0.0, 0.0, -1.5, -2.5, 0.0, 0.0, 0.0, 0.0]


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, 0.0, 0.0]])
    r = row(SamplingParams(temperature=0.0, presence_penalty=0.5), prompt=[2], output=[0])
    tokens, _ = Sampler()(logits, [r])
    assert tokens == [1]


# ----------------------------------------------------------------------------- min_tokens

def test_min_tokens_masks_stop_ids():
    logits = torch.zeros(3, 8)
    logits[:, 7] = 10.0  # the EOS is the argmax
    logits[:, 5] = 9.0  # a stop token id is the runner-up
    logits[:, 2] = 1.0
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,))
    rows = [row(p, output=[], stop_token_ids=(7, 5)),
            row(p, output=[2, 2], stop_token_ids=(7, 5)),
            row(p, output=[2, 2, 2], stop_token_ids=(7, 5))]  # min_tokens reached
    tokens, _ = Sampler()(logits, rows)
    assert tokens == [2, 2, 7]

    x = logits.clone()
    apply_min_tokens(x, rows)
    assert x[0, 7] == -math.inf and x[0, 5] == -math.inf and x[1, 7] == -math.inf
    assert torch.equal(x[2], logits[2])


def test_min_tokens_params_stop_ids_and_sampling():
    logits = torch.zeros(2000, 8)
    logits[:, 6] = 3.0
    # stop id only in params (row.stop_token_ids has just the EOS), out-of-range id ignored
    p = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=(6, 100))
    rows = [row(p, stop_token_ids=(0,)) for _ in range(2000)]
    tokens, _ = Sampler(seed=11)(logits, rows)
    assert not {0, 6} & set(tokens)
    assert set(tokens) == {1, 2, 3, 4, 5, 7}


# ------------------------------------------------------------------------ reproducibility

def _steps(sampler, make_batch, steps=20, vocab=V):
    """Generate `steps` tokens for the row at `pos` inside batches built by make_batch."""
    out = []
    for step in range(steps):
        logits, rows, pos = make_batch(step, out)
        tokens, _ = sampler(logits, rows)
        out.append(tokens[pos])
    return out


def _seeded_params(seed=42):
    return SamplingParams(temperature=1.0, seed=seed)


def _target_logits(step):
    return rand_logits(1, seed=1000 + step, scale=0.5)


def test_seeded_reproducible_regardless_of_batch():
    def alone(step, out):
        return _target_logits(step), [row(_seeded_params(), output=out)], 0

    def crowded(step, out):
        others = rand_logits(5, seed=step)
        logits = torch.cat([others[:3], _target_logits(step), others[3:]])
        rows = [row(SamplingParams(temperature=0.9)), row(SamplingParams(temperature=0.0)),
                row(SamplingParams(temperature=1.0, seed=7, top_k=4), seq_index=1),
                row(_seeded_params(), output=out),
                row(SamplingParams(temperature=1.2, top_p=0.5, logprobs=2)),
                row(SamplingParams(temperature=1.0, seed=42, presence_penalty=1.0), seq_index=3)]
        return logits, rows, 3

    a = _steps(Sampler(seed=0), alone)
    b = _steps(Sampler(seed=99), crowded)
    c = _steps(Sampler(seed=5), alone)
    assert a == b == c
    assert len(set(a)) > 5  # really sampled, not degenerate


def test_seeded_resume_after_preemption():
    full = _steps(Sampler(), lambda s, out: (_target_logits(s), [row(_seeded_params(), output=out)], 0))
    # A fresh sampler (e.g. after a restart or preemption) continuing from step 10.
    sampler = Sampler(seed=123)
    resumed = list(full[:10])
    for step in range(10, 20):
        tokens, _ = sampler(_target_logits(step), [row(_seeded_params(), output=resumed)])
        resumed.append(tokens[0])
    assert resumed == full


def test_seq_index_and_seed_give_different_streams():
    def stream(seed, seq_index):
        return _steps(Sampler(), lambda s, out: (
            _target_logits(s), [row(_seeded_params(seed), output=out, seq_index=seq_index)], 0))

    s0, s1, other_seed = stream(42, 0), stream(42, 1), stream(43, 0)
    assert s0 != s1 and s0 != other_seed
    assert stream(42, 1) == s1


def test_row_seed():
    assert row_seed(42, 0, 0) == row_seed(42, 0, 0)
    seeds = {row_seed(s, i, n) for s in (0, 1, -1, 2**70) for i in range(3) for n in range(3)}
    assert len(seeds) == 36
    assert all(0 <= s < 2**63 for s in seeds)


def test_unseeded_reproducible_with_sampler_seed():
    logits = rand_logits(16, seed=12, scale=0.5)
    rows = [row(SamplingParams(temperature=1.0, top_p=0.9)) for _ in range(16)]

    def run(seed):
        sampler = Sampler(seed=seed)
        return [sampler(logits, rows)[0] for _ in range(3)]

    a, b, c = run(1), run(1), run(2)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the generator advances between steps


# ------------------------------------------------------------------------------- logprobs

def test_logprobs_are_raw_and_contain_sampled_and_top_k():
    logits = rand_logits(4, seed=13)
    raw_lp = torch.log_softmax(logits, -1)
    params = [
        SamplingParams(temperature=0.7, logprobs=3, repetition_penalty=1.5, top_k=10),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0),  # no logprobs
        SamplingParams(temperature=0.0, logprobs=5, frequency_penalty=2.0),
    ]
    rows = [row(p, prompt=[0, 1, 2], output=logits[i].topk(3).indices.tolist())
            for i, p in enumerate(params)]
    before = logits.clone()
    tokens, lps = Sampler(seed=14)(logits, rows)
    assert torch.equal(logits, before)
    assert lps[2] is None
    for i, k in ((0, 3), (1, 0), (3, 5)):
        d = lps[i]
        top = raw_lp[i].topk(k).indices.tolist() if k else []
        assert tokens[i] in d
        assert set(d) == {tokens[i], *top}
        for tid, v in d.items():
            assert v == pytest.approx(float(raw_lp[i, tid]), abs=1e-6)
        assert next(iter(d)) == tokens[i]  # the sampled token comes first
    # row 3's frequency penalty moved the greedy choice away from the raw argmax
    assert tokens[3] != int(logits[3].argmax())


def test_non_float32_logits():
    logits = rand_logits(4, seed=15).to(torch.bfloat16)
    rows = [row(SamplingParams(temperature=0.0, logprobs=1)) for _ in range(4)]
    tokens, lps = Sampler()(logits, rows)
    assert tokens == logits.float().argmax(-1).tolist()
    assert all(len(d) in (1, 2) for d in lps)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, V), [row()])
