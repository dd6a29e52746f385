"""Logits processing before a draw, per row of a batch, as vLLM applies it: allowed_token_ids
(everything else -inf), min_tokens (stop ids -inf until enough tokens), bad_words (the token
that would finish one -inf), logit_bias (added), then the repetition, frequency and presence
penalties. Rows that ask for none are untouched.
Device-agnostic; index lists are built on the host and applied with one scatter each.
"""
from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

from driver.guided import GuidedCursor, PackedMask, fsm_for
from driver.sampling_params import SamplingParams

if TYPE_CHECKING:
    from workers.sampler import SamplingRow

# Temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS): dividing by a
# tiny temperature overflows the logits.
SAMPLING_EPS = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < SAMPLING_EPS


def has_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0)


def has_logit_rules(params: SamplingParams) -> bool:
    return (params.logit_bias is not None or params.allowed_token_ids is not None
            or params.choice_token_ids is not None or params.structured_regex is not None
            or bool(params.bad_words_token_ids))


def allowed_ids(row: SamplingRow) -> list[int] | PackedMask | None:
    """The tokens a row may sample by its allowed_token_ids; by guided_choice: the next token
    of each choice its output is a prefix of, and its stop ids once it is a whole choice; by
    a structured-output regex (as packed bits over the vocabulary): the tokens that keep its
    output a prefix of a match, and its stop ids where the output is a match."""
    p = row.params
    if p.structured_regex is not None:
        if row.guided is None:
            row.guided = GuidedCursor(fsm_for(p.structured_regex))
        return row.guided.allowed(row.output_token_ids, row.stop_token_ids)
    if p.choice_token_ids is None:
        return None if p.allowed_token_ids is None else list(p.allowed_token_ids)
    out = tuple(row.output_token_ids)
    n = len(out)
    ids = {c[n] for c in p.choice_token_ids if len(c) > n and c[:n] == out}
    if out in p.choice_token_ids:
        ids.update(row.stop_token_ids)
    # Empty: a whole choice sampled with a step in flight, or ignore_eos; the engine has ended
    # the sequence and drops this token, so it may be anything.
    return sorted(ids) or None


def min_tokens_active(row: SamplingRow) -> bool:
    return row.params.min_tokens > 0 and row.num_output_tokens < row.params.min_tokens


def index_tensor(idx: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long).to(device, non_blocking=True)


def row_values(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)


def _token_counts(token_lists: list[list[int]], vocab_size: int,
                  device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab_size] float32 counts of each token id per row
    (ids outside [0, vocab_size) are ignored), via one scatter_add."""
    num_rows = len(token_lists)
    counts = torch.zeros(num_rows * vocab_size, dtype=torch.float32, device=device)
    lens = [len(t) for t in token_lists]
    if sum(lens):
        tok = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long)
        row = torch.repeat_interleave(torch.arange(num_rows, dtype=torch.long),
                                      torch.tensor(lens, dtype=torch.long))
        keep = (tok >= 0) & (tok < vocab_size)
        lin = (row * vocab_size + tok)[keep].to(device, non_blocking=True)
        counts.scatter_add_(0, lin, torch.ones(lin.shape, dtype=torch.float32, device=device))
    return counts.view(num_rows, vocab_size)


# ----------------------------------------------------------------------- logits processing

def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """In place: -inf on the stop ids of rows that have produced fewer than min_tokens."""
    vocab_size = logits.shape[-1]
    row_idx: list[int] = []
    col_idx: list[int] = []
    for i, r in enumerate(rows):
        if not min_tokens_active(r):
            continue
        for t in set(r.stop_token_ids) | set(r.params.stop_token_ids):
            if 0 <= t < vocab_size:
                row_idx.append(i)
                col_idx.append(t)
    if row_idx:
        logits[index_tensor(row_idx, logits.device), index_tensor(col_idx, logits.device)] = float("-inf")
    return logits


def apply_allowed_token_ids(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """In place: -inf outside the tokens a row may sample (allowed_token_ids, guided_choice,
    structured outputs). Structured outputs' masks travel as bits and are unpacked on the device."""
    lists, packed = {}, {}
    for i, r in enumerate(rows):
        ids = allowed_ids(r)
        if ids is not None:
            (packed if isinstance(ids, PackedMask) else lists)[i] = ids
    vocab_size = logits.shape[-1]
    if lists:
        keep = torch.zeros(len(lists), vocab_size, dtype=torch.bool)
        for j, ids in enumerate(lists.values()):
            keep[j, [t for t in ids if t < vocab_size]] = True
        _keep_only(logits, list(lists), keep.to(logits.device, non_blocking=True))
    if packed:
        bits = torch.from_numpy(np.stack([m.bits for m in packed.values()])).to(logits.device)
        _keep_only(logits, list(packed), unpack_bits(bits, vocab_size))
    return logits


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, k] uint8 of np.packbits bits -> [rows, n] bool (bits past 8k read as False)."""
    if bits.device.type == "cpu":  # (numpy's unpacking is several times faster there)
        flat = np.unpackbits(bits.numpy(), axis=1, count=min(n, 8 * bits.shape[1])).astype(bool)
        return torch.from_numpy(np.pad(flat, ((0, 0), (0, n - flat.shape[1]))))
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    flat = bits.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and_(1).bool().flatten(1)  # [rows, 8k]
    if flat.shape[1] >= n:
        return flat[:, :n]
    return torch.cat([flat, flat.new_zeros(flat.shape[0], n - flat.shape[1])], dim=1)


def _keep_only(logits: torch.Tensor, idx: list[int], keep: torch.Tensor) -> None:
    """logits[idx[j], t] = -inf where not keep[j, t]."""
    idx_t = index_tensor(idx, logits.device)
    logits.index_copy_(0, idx_t, logits.index_select(0, idx_t).masked_fill_(~keep, float("-inf")))


def apply_bad_words(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """In place: -inf for each bad word's last token where the row's output ends with the
    word's other tokens (vLLM's: the output only, not the prompt)."""
    row_idx, col_idx = [], []
    for i, r in enumerate(rows):
        if not r.params.bad_words_token_ids:
            continue
        out = r.output_token_ids
        for word in r.params.bad_words_token_ids:
            k = len(word) - 1
            if word[-1] < logits.shape[-1] and (k == 0 or (len(out) >= k and tuple(out[-k:]) == word[:-1])):
                row_idx.append(i)
                col_idx.append(word[-1])
    if row_idx:
        logits[index_tensor(row_idx, logits.device), index_tensor(col_idx, logits.device)] = float("-inf")
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """In place: logits[i, t] += bias for each row's logit_bias (ids past the vocab ignored)."""
    vocab_size = logits.shape[-1]
    row_idx, col_idx, bias = [], [], []
    for i, r in enumerate(rows):
        for t, b in (r.params.logit_bias or {}).items():
            if t < vocab_size:
                row_idx.append(i)
                col_idx.append(t)
                bias.append(b)
    if row_idx:
        device = logits.device
        logits.index_put_((index_tensor(row_idx, device), index_tensor(col_idx, device)), row_values(bias, device),
                          accumulate=True)
    return logits


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """In place, on the rows with penalties (others untouched), vLLM's formulas:

    repetition (tokens of prompt + output): logit > 0 -> logit / p, else logit * p
    frequency:  logit -= f * count_in_output
    presence:   logit -= p * (count_in_output > 0)
    """
    pen_idx = [i for i, r in enumerate(rows) if has_penalties(r.params)]
    if not pen_idx:
        return logits
    device = logits.device
    vocab_size = logits.shape[-1]
    pen_rows = [rows[i] for i in pen_idx]
    full = len(pen_idx) == len(rows)
    idx_t = None if full else index_tensor(pen_idx, device)
    x = logits if full else logits.index_select(0, idx_t)

    if any(r.params.repetition_penalty != 1.0 for r in pen_rows):
        seen = _token_counts([r.token_ids for r in pen_rows], vocab_size, device) > 0
        rep = row_values([r.params.repetition_penalty for r in pen_rows], device).unsqueeze(1)
        rep = torch.where(seen, rep, 1.0)
        x = torch.where(x > 0, x / rep, x * rep)

    if any(r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0
           for r in pen_rows):
        counts = _token_counts([r.output_token_ids for r in pen_rows], vocab_size, device)
        freq = row_values([r.params.frequency_penalty for r in pen_rows], device).unsqueeze(1)
        pres = row_values([r.params.presence_penalty for r in pen_rows], device).unsqueeze(1)
        x = x - freq * counts - pres * (counts > 0).to(x.dtype)

    if full:
        logits.copy_(x)
    else:
        logits.index_copy_(0, idx_t, x)
    return logits


def process_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """A float32 copy of `logits` with every row's processing applied: what greedy rows take
    the argmax of. The input is not modified."""
    x = logits.to(torch.float32, copy=True)
    apply_allowed_token_ids(x, rows)
    apply_min_tokens(x, rows)
    apply_bad_words(x, rows)
    apply_logit_bias(x, rows)
    apply_penalties(x, rows)
    return x
