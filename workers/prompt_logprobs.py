"""Prompt logprobs (vLLM's `prompt_logprobs`): for a sequence that asks, the logprob of each
prompt token given the tokens before it, and the top k there, from the hidden states of the
prefill chunks that compute them.

A chunk over positions [c, c + n) of a P-token prompt yields the logprobs of prompt tokens
c + 1 .. min(c + n, P - 1): position P - 1's logits sample the first output token instead.
Only a request's first sequence asks (with n > 1 its parent computes every prompt position
but the last). Logits are made MAX_ROWS rows at a time, so a long chunk never holds
[n, vocab] float32 at once; every TP rank joins each slice's all-gather, rank 0 keeps the
results.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.staging import to_device_async

MAX_ROWS = 256


@dataclass
class PromptLogprobsPlan:
    req_ids: list[str]
    starts: list[int]  # per sequence: the prompt position of its first logprob
    counts: list[int]  # per sequence: how many positions follow from there
    ks: list[int]  # per sequence: top-k
    rows: torch.Tensor  # [total] rows of the step's hidden states whose logits give them
    targets: torch.Tensor  # [total] the prompt tokens at those positions
    target_ids: list[int]  # the same, on the host


@dataclass
class PromptLogprobs:
    """Rank 0's results for a plan, on their way to the host."""

    plan: PromptLogprobsPlan
    logprobs: torch.Tensor  # [total] of each target token
    top_logprobs: torch.Tensor | None  # [total, max k]
    top_ids: torch.Tensor | None  # [total, max k]


def wants_prompt_logprobs(params, seq_index: int) -> bool:
    return params.prompt_logprobs is not None and seq_index == 0


def plan_prompt_logprobs(states: list, num_scheduled: list[int], device: torch.device
                         ) -> PromptLogprobsPlan | None:
    """states: the step's sequences in batch order (CachedRequestState, num_computed_tokens
    not yet advanced by this step), num_scheduled: their token counts."""
    query_start = np.concatenate([[0], np.cumsum(num_scheduled)])
    plan = PromptLogprobsPlan([], [], [], [], None, None, [])
    rows = []
    for j, (s, n) in enumerate(zip(states, num_scheduled)):
        if not wants_prompt_logprobs(s.sampling_params, s.seq_index):
            continue
        c = s.num_computed_tokens
        end = min(c + n, s.num_prompt_tokens - 1)  # last position whose next token is a prompt token
        if end <= c:
            continue
        plan.req_ids.append(s.req_id)
        plan.starts.append(c + 1)
        plan.counts.append(end - c)
        plan.ks.append(s.sampling_params.prompt_logprobs)
        rows.append(np.arange(query_start[j], query_start[j] + end - c))
        plan.target_ids += s.token_ids[c + 1:end + 1]
    if not plan.req_ids:
        return None
    plan.rows = to_device_async(np.concatenate(rows), device)
    plan.targets = to_device_async(np.array(plan.target_ids, dtype=np.int64), device)
    return plan


def compute_prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor, plan: PromptLogprobsPlan,
                            rank: int) -> PromptLogprobs | None:
    """hidden [num_tokens, hidden_size] of the step -> rank 0's results (None elsewhere)."""
    max_k = max(plan.ks)
    lps, top_v, top_i = [], [], []
    for a in range(0, plan.rows.shape[0], MAX_ROWS):
        rows, targets = plan.rows[a:a + MAX_ROWS], plan.targets[a:a + MAX_ROWS]
        logits = model.compute_logits(hidden.index_select(0, rows))  # [rows, vocab] on every rank
        if rank != 0:
            continue
        lp = torch.log_softmax(logits, dim=-1)
        lps.append(lp.gather(1, targets.unsqueeze(1)).squeeze(1))
        if max_k:
            v, i = torch.topk(lp, max_k, dim=-1)
            top_v.append(v)
            top_i.append(i)
    if rank != 0:
        return None
    cat = lambda ts: torch.cat(ts) if ts else None  # noqa: E731
    return PromptLogprobs(plan, cat(lps), cat(top_v), cat(top_i))


def prompt_logprobs_to_host(out: PromptLogprobs) -> dict[str, tuple[int, list[dict[int, float]]]]:
    """req_id -> (first position, {token: logprob} per position: its own token, then the top k).
    Syncs with the device unless the tensors already live on the host."""
    plan = out.plan
    lps = out.logprobs.tolist()
    top_v = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    top_i = out.top_ids.tolist() if out.top_ids is not None else None
    targets = plan.target_ids
    result, a = {}, 0
    for req_id, start, count, k in zip(plan.req_ids, plan.starts, plan.counts, plan.ks):
        dicts = []
        for r in range(a, a + count):
            d = {targets[r]: lps[r]}
            for tid, v in zip(top_i[r][:k] if k else (), top_v[r][:k] if k else ()):
                d.setdefault(tid, v)
            dicts.append(d)
        result[req_id] = (start, dicts)
        a += count
    return result
