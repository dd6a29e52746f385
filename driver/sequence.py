"""Requests and their sequences, as the driver tracks them (no GPU state here)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from driver.guided import GuidedCursor, fsm_for
from driver.lora import LoRARequest
from driver.sampling_params import PoolingParams, SamplingParams


def choice_complete(choices: tuple[tuple[int, ...], ...], output: list[int]) -> bool:
    """guided_choice: the output is a whole choice that no longer choice continues."""
    out, n = tuple(output), len(output)
    return out in choices and not any(len(c) > n and c[:n] == out for c in choices)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    def __init__(self, value: str) -> None:
        # A plain attribute, not a property: it is read several times per sequence per step.
        self.is_finished = value in ("stop", "length", "abort")


@dataclass(eq=False)
class Sequence:
    """One completion. Invariant: num_computed_tokens <= len(token_ids) + num_pending; the
    K/V of positions [0, num_computed_tokens) live in (or, for steps in flight, are being
    written to) the blocks of block_table."""

    seq_id: str
    seq_index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_tokens_sent: int = 0  # tokens the workers know (0: not known to the workers at all)
    num_blocks_sent: int = 0  # block-table entries the workers know
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    num_pending: int = 0  # tokens that steps in flight will sample, not yet known here
    output_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    # False when its request asks for prompt logprobs: a prefix-cache hit would skip the
    # forward of the prompt tokens whose logprobs it wants (its blocks still enter the cache).
    reads_prefix_cache: bool = True
    lora_id: int = 0  # its adapter (0: none): K/V under one adapter are no prefix of another's
    guided: GuidedCursor | None = field(default=None, repr=False)  # structured outputs: its DFA state

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed_tokens

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        self.output_logprobs.append(logprobs)

    def reset_for_recompute(self) -> None:
        """Preempted by recompute: its K/V is dropped and the workers forget it."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_tokens_sent = 0
        self.num_blocks_sent = 0
        self.status = SequenceStatus.WAITING


@dataclass(eq=False)
class SequenceGroup:
    """One request: a prompt and its n sequences.

    With n > 1 the request starts with a single parent sequence (index 0). The parent
    prefills all prompt tokens but the last; then the scheduler forks it into n
    sequences sharing those blocks (`forked` becomes True), and each sequence computes
    the last prompt token on its own, which copies the shared, partly filled last
    block on write.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)
    forked: bool = False
    first_token_time: float | None = None
    # EOS (unless ignore_eos) + the params' stop ids: set_stop_token_ids, at admission.
    stop_token_ids: tuple[int, ...] = ()
    # With SamplingParams.prompt_logprobs: one entry per prompt token, filled as the parent's
    # prefill chunks compute them (the first stays None: nothing comes before it).
    prompt_logprobs: list[dict[int, float] | None] | None = None
    pooling_params: PoolingParams | None = None  # an embedding request (then n = 1, max_tokens = 1)
    lora_request: LoRARequest | None = None
    priority: int = 0  # with scheduling_policy "priority": lower is scheduled first
    embedding: list[float] | None = None

    @staticmethod
    def create(request_id: str, prompt: str | None, prompt_token_ids: list[int],
               sampling_params: SamplingParams) -> "SequenceGroup":
        want_prompt = sampling_params.prompt_logprobs is not None
        parent = Sequence(seq_id=f"{request_id}", seq_index=0, token_ids=list(prompt_token_ids),
                          num_prompt_tokens=len(prompt_token_ids), reads_prefix_cache=not want_prompt)
        return SequenceGroup(request_id, prompt, list(prompt_token_ids), sampling_params, [parent],
                             forked=sampling_params.n == 1,
                             prompt_logprobs=[None] * len(prompt_token_ids) if want_prompt else None)

    def set_stop_token_ids(self, eos_token_ids: tuple[int, ...]) -> None:
        p = self.sampling_params
        eos = () if p.ignore_eos else eos_token_ids
        self.stop_token_ids = eos + tuple(t for t in p.stop_token_ids if t not in eos)

    def stop_status(self, seq: Sequence, token: int, max_model_len: int) -> SequenceStatus | None:
        """How seq finishes now that it sampled `token` (the newest of its token_ids), if it does."""
        p, num_tokens = self.sampling_params, len(seq.token_ids)
        num_output = num_tokens - seq.num_prompt_tokens
        if token in self.stop_token_ids and num_output >= p.min_tokens:
            return SequenceStatus.FINISHED_STOPPED
        if p.choice_token_ids is not None and choice_complete(p.choice_token_ids, seq.output_token_ids):
            return SequenceStatus.FINISHED_STOPPED
        if p.structured_regex is not None:  # a whole match that nothing can extend
            if seq.guided is None:
                seq.guided = GuidedCursor(fsm_for(p.structured_regex))
            if seq.guided.complete(seq.output_token_ids):
                return SequenceStatus.FINISHED_STOPPED
        if p.max_tokens is not None and num_output >= p.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        if num_tokens >= max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    @property
    def prefill_target(self) -> int:
        """How many tokens the parent may compute before the group must fork."""
        return len(self.prompt_token_ids) - 1 if not self.forked else len(self.prompt_token_ids)

    def fork(self) -> list[Sequence]:
        """Create sequences 1..n-1 as copies of the parent (the block table is shared by
        the caller, which owns reference counts)."""
        parent = self.seqs[0]
        children = [Sequence(seq_id=f"{self.request_id}-{i}", seq_index=i,
                             token_ids=list(parent.token_ids), num_prompt_tokens=parent.num_prompt_tokens,
                             status=parent.status, num_computed_tokens=parent.num_computed_tokens,
                             num_cached_tokens=parent.num_cached_tokens, lora_id=parent.lora_id)
                    for i in range(1, self.sampling_params.n)]
        self.seqs.extend(children)
        self.forked = True
        return children

    @property
    def is_finished(self) -> bool:
        for s in self.seqs:  # (a loop, not all(genexpr): this runs per request per step)
            if not s.status.is_finished:
                return False
        return self.forked

    def unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.status.is_finished]
