"""The sampler: logits of the last position of each sequence -> one token each.

Matches vLLM's semantics:

1. Logprobs (when asked) are of the model's *raw* distribution: log_softmax of the
   logits as they came from the model, before any processing.
2. Logits processing (workers/logits_processors.py), in order: allowed_token_ids, min_tokens
   masking of stop ids, logit_bias, repetition penalty (over prompt + output tokens),
   frequency and presence penalties (over output tokens).
3. Greedy rows (temperature ~ 0) take the argmax of the processed logits.
4. Random rows: temperature scaling, top-k, top-p (renormalised after top-k), min-p,
   then a draw from the resulting distribution with the exponential race
   (argmax of probs / Exponential(1) noise), which is equivalent to a categorical draw.

Rows with a seed draw their noise from a generator seeded from
(seed, seq_index, number of output tokens so far), so their tokens depend neither on
the rest of the batch nor on the history of the sampler (a re-run or a preempted and
recomputed sequence draws the same tokens). Unseeded rows share the Sampler's own
generator (one per device), seeded at construction.

Everything is device-agnostic: `sample` keeps its results on `logits.device` and never
waits for the device (so the worker can queue the next step first); `to_host` turns a
`SamplerOutput` (copied to the host) into token ids and logprob dicts.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from driver.guided import GuidedCursor
from driver.sampling_params import SamplingParams
from ops.dispatch import ops_for
from workers.logits_processors import (has_logit_rules, has_penalties, index_tensor, is_greedy,
                                       min_tokens_active, process_logits, row_values)

_MASK_63 = (1 << 63) - 1


@dataclass
class SamplingRow:
    """One sequence to sample this step."""

    params: SamplingParams
    seq_index: int  # which of the request's n completions
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int
    stop_token_ids: tuple[int, ...] = ()  # masked (-inf) while num_output_tokens < params.min_tokens
    # Greedy, no logprobs, no penalties, no min_tokens: an argmax whatever the token ids.
    # Derived from params alone (which never change), so it can be computed once.
    plain: bool = field(init=False, repr=False, compare=False)
    guided: GuidedCursor | None = field(default=None, init=False, repr=False, compare=False)  # its DFA state

    def __post_init__(self) -> None:
        p = self.params
        self.plain = (is_greedy(p) and p.logprobs is None and p.min_tokens == 0
                      and not has_penalties(p) and not has_logit_rules(p))

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


# ----------------------------------------------------------------------------- helpers

def row_seed(seed: int, seq_index: int, num_output_tokens: int) -> int:
    """The 63-bit generator seed for one draw of a seeded row. Stable across processes
    and Python versions (no use of hash())."""
    digest = hashlib.blake2b(f"{seed}:{seq_index}:{num_output_tokens}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK_63


def apply_top_k_top_p_min_p(logits: torch.Tensor,
                            top_k: torch.Tensor | None = None,
                            top_p: torch.Tensor | None = None,
                            min_p: torch.Tensor | None = None,
                            max_k: int | None = None) -> torch.Tensor:
    """Mask (-inf) what top-k, then top-p, then min-p drop, per row. Returns a new tensor.

    top_k: [rows] long, values >= vocab mean off (ties at the k-th value are all kept);
    top_p: [rows] float, keeps the smallest prefix (by descending prob, renormalised after
           top-k) whose cumulative prob >= top_p, at least one token; values >= 1 mean off;
    min_p: [rows] float, drops tokens with prob < min_p * max_prob; 0 means off;
    max_k: an upper bound of the enabled top_k values, known on the host (else read from
           top_k, a device sync on accelerators).
    All tensors on logits.device.
    """
    x = logits.clone()
    vocab_size = x.shape[-1]
    ninf = float("-inf")
    if top_k is not None:
        k = top_k.clamp(1, vocab_size)
        if max_k is None:
            max_k = int(torch.where(k < vocab_size, k, 1).max())
        max_k = max(1, min(max_k, vocab_size))
        vals = torch.topk(x, max_k, dim=-1).values
        kth = vals.gather(1, (k.clamp(max=max_k) - 1).unsqueeze(1))
        kth = torch.where((k < vocab_size).unsqueeze(1), kth, ninf)
        x = x.masked_fill(x < kth, ninf)
    if top_p is not None:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # prob mass ranked strictly above
        p = torch.where(top_p >= 1.0, float("inf"), top_p).unsqueeze(1)
        drop = before >= p
        drop[:, 0] = False
        sorted_x = sorted_x.masked_fill(drop, ninf)
        x = torch.empty_like(x).scatter_(1, order, sorted_x)
    if min_p is not None:
        probs = torch.softmax(x, dim=-1)
        thresh = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        x = x.masked_fill(probs < thresh, ninf)
    return x


# --------------------------------------------------------------------------------- sampler

@dataclass
class SamplerOutput:
    """One step's draws, still on the device that sampled them."""

    tokens: torch.Tensor  # [num_rows] int64
    logprob_rows: list[int]  # rows whose request asked for logprobs
    sampled_logprobs: torch.Tensor | None = None  # [len(logprob_rows)]: the sampled token's
    top_logprobs: torch.Tensor | None = None  # [len(logprob_rows), k]
    top_ids: torch.Tensor | None = None  # [len(logprob_rows), k]

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.tokens, self.sampled_logprobs, self.top_logprobs, self.top_ids]

    def replace_tensors(self, tensors: list[torch.Tensor | None]) -> "SamplerOutput":
        return SamplerOutput(tensors[0], self.logprob_rows, *tensors[1:])


def to_host(out: SamplerOutput, rows: list[SamplingRow]
            ) -> tuple[list[int], list[dict[int, float] | None]]:
    """Token ids, and per row {token_id: logprob} (the sampled token and the top-k) or None.
    Syncs with the device unless `out` already lives on the host."""
    tokens = out.tokens.tolist()
    logprobs: list[dict[int, float] | None] = [None] * len(rows)
    if not out.logprob_rows:
        return tokens, logprobs
    sampled = out.sampled_logprobs.tolist()
    top_v = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    top_i = out.top_ids.tolist() if out.top_ids is not None else None
    for j, i in enumerate(out.logprob_rows):
        d = {tokens[i]: sampled[j]}
        k = rows[i].params.logprobs
        if k:
            for tid, v in zip(top_i[j][:k], top_v[j][:k]):
                d.setdefault(tid, v)
        logprobs[i] = d
    return tokens, logprobs


class Sampler:
    def __init__(self, seed: int = 0):
        self.seed = seed
        # One generator per device for unseeded rows (created lazily on accelerators),
        # one per device re-seeded for every seeded row.
        self._generators: dict[torch.device, torch.Generator] = {
            torch.device("cpu"): self._new_generator(torch.device("cpu"), seed)}
        self._seeded_generators: dict[torch.device, torch.Generator] = {}

    @staticmethod
    def _new_generator(device: torch.device, seed: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(seed & ((1 << 64) - 1))
        return g

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = self._new_generator(device, self.seed)
        return g

    def _seeded_generator(self, device: torch.device) -> torch.Generator:
        g = self._seeded_generators.get(device)
        if g is None:
            g = self._seeded_generators[device] = torch.Generator(device=device)
        return g

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]
                 ) -> tuple[list[int], list[dict[int, float] | None]]:
        """Sample and bring the result to the host (tokens, logprobs)."""
        return to_host(self.sample(logits, rows), rows)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        num_rows = len(rows)
        if logits.dim() != 2 or logits.shape[0] != num_rows:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {num_rows} rows")
        if num_rows == 0:
            return SamplerOutput(torch.empty(0, dtype=torch.long, device=logits.device), [])
        for r in rows:  # (a loop, not all(genexpr): the common case must cost next to nothing)
            if not r.plain:
                break
        else:
            return SamplerOutput(ops_for(logits).argmax(logits), [])
        greedy = [is_greedy(r.params) for r in rows]
        want_logprobs = any(r.params.logprobs is not None for r in rows)
        needs_processing = any(has_penalties(r.params) or min_tokens_active(r) or has_logit_rules(r.params)
                               for r in rows)

        raw = logits if logits.dtype == torch.float32 else logits.float()
        x = process_logits(raw, rows) if needs_processing else raw  # raw is never modified

        random_idx = [i for i, g in enumerate(greedy) if not g]
        if len(random_idx) == num_rows:
            tokens = self._sample(x, rows)
        else:
            tokens = ops_for(x).argmax(x)
            if random_idx:
                idx_t = index_tensor(random_idx, x.device)
                sampled = self._sample(x.index_select(0, idx_t), [rows[i] for i in random_idx])
                tokens.index_copy_(0, idx_t, sampled)

        if not want_logprobs:
            return SamplerOutput(tokens, [])
        return self._with_logprobs(raw, rows, tokens)

    def _sample(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """One draw per row (all non-greedy) of x [rows, vocab] processed logits."""
        device = x.device
        num_rows, vocab_size = x.shape
        params = [r.params for r in rows]

        temps = [p.temperature for p in params]
        if any(t != 1.0 for t in temps):  # (x itself is never modified below)
            x = x / row_values(temps, device).unsqueeze(1)

        ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_k = max_k = None
        if any(k < vocab_size for k in ks):
            max_k = max(k for k in ks if k < vocab_size)  # known on the host: no sync
            top_k = torch.tensor(ks, dtype=torch.long).to(device, non_blocking=True)
        top_p = None
        if any(p.top_p < 1.0 for p in params):
            top_p = row_values([p.top_p for p in params], device)
        min_p = None
        if any(p.min_p > 0.0 for p in params):
            min_p = row_values([p.min_p for p in params], device)
        if top_k is not None or top_p is not None or min_p is not None:
            x = apply_top_k_top_p_min_p(x, top_k, top_p, min_p, max_k=max_k)

        probs = torch.softmax(x, dim=-1)

        # Exponential race: argmax(probs / E), E ~ Exponential(1) iid, is a categorical draw.
        noise = torch.empty_like(probs)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if len(unseeded) == num_rows:
            noise.exponential_(generator=self._generator(device))
        else:
            if unseeded:
                part = torch.empty((len(unseeded), vocab_size), dtype=probs.dtype, device=device)
                part.exponential_(generator=self._generator(device))
                noise.index_copy_(0, index_tensor(unseeded, device), part)
            g = self._seeded_generator(device)
            for i, r in enumerate(rows):
                if r.params.seed is not None:
                    g.manual_seed(row_seed(r.params.seed, r.seq_index, r.num_output_tokens))
                    noise[i].exponential_(generator=g)
        # Guard against an exact 0 draw (0/0 = nan would win the argmax).
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)

    @staticmethod
    def _with_logprobs(raw: torch.Tensor, rows: list[SamplingRow], tokens: torch.Tensor) -> SamplerOutput:
        lp_idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if len(lp_idx) == len(rows):
            sub, sub_tokens = raw, tokens
        else:
            idx_t = index_tensor(lp_idx, raw.device)
            sub, sub_tokens = raw.index_select(0, idx_t), tokens.index_select(0, idx_t)
        lp = torch.log_softmax(sub, dim=-1)
        sampled_lp = lp.gather(1, sub_tokens.unsqueeze(1)).squeeze(1)
        max_k = min(max(rows[i].params.logprobs for i in lp_idx), lp.shape[-1])
        top_v = top_i = None
        if max_k > 0:
            top_v, top_i = torch.topk(lp, max_k, dim=-1)
        return SamplerOutput(tokens, lp_idx, sampled_lp, top_v, top_i)
