"""The data boundary between the driver and the workers.

One `SchedulerOutput` goes to every TP worker per step; one `ModelRunnerOutput`
comes back from rank 0. Plain dataclasses of ints, lists and SamplingParams:
no tensors and no Sequence objects cross Ray.

The unit on the workers is a *sequence* (`req_id` below is a sequence id; a
request with n > 1 has n of them). A sequence is sent in full once
(`NewRequestData`) and afterwards only as a delta (`CachedRequestData`). A
sequence that finishes, is aborted or is preempted is listed in
`finished_req_ids` and forgotten by the workers; if it resumes it is sent in
full again. Workers append the tokens they sample to their own copy, so a delta
never carries tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from driver.lora import LoRARequest
from driver.sampling_params import PoolingParams, SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    token_ids: list[int]  # everything known: prompt + output tokens so far
    num_prompt_tokens: int
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int  # tokens whose K/V are already in the cache (prefix hit, swap-in)
    sampling_params: SamplingParams
    seq_index: int = 0  # which of the request's n completions (seeds differ per completion)
    stop_token_ids: tuple[int, ...] = ()  # EOS (unless ignore_eos) + stop ids: masked before min_tokens
    pooling_params: PoolingParams | None = None  # an embedding request: its last prompt row's hidden state
    lora_request: LoRARequest | None = None  # the adapter it runs with

    @classmethod
    def from_seq(cls, seq, group) -> "NewRequestData":
        """A driver Sequence of SequenceGroup `group`, in full."""
        return cls(req_id=seq.seq_id, token_ids=list(seq.token_ids), num_prompt_tokens=seq.num_prompt_tokens,
                   block_ids=list(seq.block_table), num_computed_tokens=seq.num_computed_tokens,
                   sampling_params=group.sampling_params, seq_index=seq.seq_index,
                   stop_token_ids=group.stop_token_ids, pooling_params=group.pooling_params,
                   lora_request=group.lora_request)


@dataclass
class CachedRequestData:
    req_id: str
    new_block_ids: list[int]  # appended to the block table
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    step_id: int
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # The batch, in order: decodes first, then prefill chunks.
    req_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), copy-on-write
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, gpu)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, cpu)
    # LoRA adapters to load before the forward, each into its slot (driver/lora.py's LoRASlots).
    lora_loads: list[tuple[LoRARequest, int]] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not (self.req_ids or self.finished_req_ids or self.blocks_to_swap_out)

    def __reduce__(self):
        # Pickling goes back into Python for every object it saves (~1.7 us per
        # CachedRequestData under cloudpickle): the deltas travel as flat lists instead and
        # are rebuilt on arrival. Equal object before and after.
        c = self.cached_reqs
        flat = ([d.req_id for d in c], [d.new_block_ids for d in c], [d.num_computed_tokens for d in c])
        return _rebuild_scheduler_output, (flat, *[getattr(self, name) for name in _OTHER_FIELDS])


def _rebuild_scheduler_output(flat: tuple[list, list, list], *values) -> SchedulerOutput:
    so = SchedulerOutput(**dict(zip(_OTHER_FIELDS, values)))
    so.cached_reqs = list(map(CachedRequestData, *flat))
    return so


_OTHER_FIELDS = tuple(f.name for f in fields(SchedulerOutput) if f.name != "cached_reqs")


@dataclass
class ModelRunnerOutput:
    """Rank 0's answer: one sampled token for each sequence whose scheduled tokens
    reached the end of its known tokens (a partial prefill chunk samples nothing)."""

    step_id: int
    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    # Per sampled token, when its request asked for logprobs: {token_id: logprob} holding
    # the sampled token and the top-k. Logprobs are of the model's raw distribution.
    logprobs: list[dict[int, float] | None] = field(default_factory=list)
    # Sequences that asked for prompt logprobs and computed prompt tokens this step:
    # req_id -> (p, dicts for prompt positions p, p+1, ...), each as in `logprobs`.
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]] = field(default_factory=dict)
    pooled: dict[str, list[float]] = field(default_factory=dict)  # embedding requests done this step
    timings: dict[str, float] = field(default_factory=dict)  # worker-side seconds, for metrics
