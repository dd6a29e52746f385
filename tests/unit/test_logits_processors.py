"""logit_bias and allowed_token_ids in the sampler (CPU, seeded)."""
import math

import pytest
import torch

from driver.sampling_params import SamplingParams
from workers.logits_processors import process_logits
from workers.sampler import Sampler, SamplingRow

V = 16


def _row(**kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), 0, [1, 2], 2)


def _logits(rows: int) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(0)) * 3


def test_logit_bias_is_added_to_its_rows_only():
    x = _logits(3)
    rows = [_row(temperature=0.0, logit_bias={3: 2.5, 7: -1.0}), _row(temperature=0.0),
            _row(temperature=0.0, logit_bias={3: 100.0, V + 5: 9.0})]  # ids past the vocab: ignored
    want = x.clone()
    want[0, 3] += 2.5
    want[0, 7] -= 1.0
    want[2, 3] += 100.0
    assert torch.equal(process_logits(x, rows), want)


def test_logit_bias_steers_greedy_and_keeps_raw_logprobs():
    x = _logits(2)
    loser = int(x[0].argmin())
    banned = int(x[1].argmax())
    rows = [_row(temperature=0.0, logit_bias={loser: 100.0}, logprobs=0),
            _row(temperature=0.0, logit_bias={banned: -100.0})]
    tokens, lps = Sampler()(x, rows)
    assert tokens[0] == loser
    assert tokens[1] == int(x[1].topk(2).indices[1])  # the runner-up
    assert lps[0][loser] == pytest.approx(float(torch.log_softmax(x[0], -1)[loser]))  # raw, not biased


def test_allowed_token_ids_restrict_greedy_and_random_draws():
    x = _logits(1)
    allowed = [2, 5, 11]
    [greedy], _ = Sampler()(x, [_row(temperature=0.0, allowed_token_ids=allowed)])
    assert greedy == max(allowed, key=lambda t: float(x[0, t]))
    rows = [_row(temperature=1.0, allowed_token_ids=allowed) for _ in range(3000)]
    tokens, _ = Sampler(seed=3)(x.expand(3000, V).contiguous(), rows)
    assert set(tokens) == set(allowed)
    processed = process_logits(x, rows[:1])[0]
    assert all(processed[t] == x[0, t] for t in allowed)
    assert all(processed[t] == -math.inf for t in range(V) if t not in allowed)


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="logit_bias must map"):
        SamplingParams(logit_bias={"a": 1})
    with pytest.raises(ValueError, match=r"logit_bias must map non-negative token ids to biases in \[-100, 100\]"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ValueError, match="allowed_token_ids must be a non-empty list"):
        SamplingParams(allowed_token_ids=[])
    assert SamplingParams(logit_bias={"7": -5}).logit_bias == {7: -5.0}  # JSON's string keys


def test_guided_choice_allows_the_next_token_of_each_matching_choice():
    # (the engine sets choice_token_ids from guided_choice with its tokenizer)
    p = SamplingParams(temperature=0.0, guided_choice=["a", "ab", "c"], choice_token_ids=((5, 6), (5, 6, 7), (9,)))

    def row(output):
        return SamplingRow(p, 0, [1, 2] + output, 2, stop_token_ids=(0,))

    x = _logits(3)
    out = process_logits(x, [row([]), row([5, 6]), row([5, 6, 7])])
    finite = [sorted(torch.nonzero(out[i] > -math.inf).flatten().tolist()) for i in range(3)]
    assert finite == [[5, 9], [0, 7], [0]]  # a whole choice may also stop (0: its stop id)
    [token], _ = Sampler()(x[:1], [row([])])
    assert token == max((5, 9), key=lambda t: float(x[0, t]))
