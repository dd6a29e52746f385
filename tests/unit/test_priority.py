"""scheduling_policy "priority" (vLLM v1's): waiting requests are admitted by (priority,
arrival), lower priority values first, and when blocks run out the lowest-priority running
request is preempted, not the latest arrival. Hand-built inputs, no model."""
import pytest

from driver.config import CacheConfig, SchedulerConfig
from driver.sampling_params import SamplingParams
from driver.scheduler import Scheduler
from driver.sequence import SequenceGroup, SequenceStatus
from tests.unit.test_scheduler import BS, EOS, FakeWorker, run_to_completion, step


def _sched(policy: str = "priority", num_gpu: int = 32, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, 64, True, "recompute", scheduling_policy=policy),
                     CacheConfig(block_size=BS, enable_prefix_caching=False), 16, num_gpu, 4,
                     eos_token_ids=(EOS,))


def _add(sched: Scheduler, rid: str, prompt, priority: int, **params) -> SequenceGroup:
    group = SequenceGroup.create(rid, None, list(prompt), SamplingParams(**params))
    group.priority = priority
    sched.add_request(group)
    return group


def test_higher_priority_is_admitted_first():
    s, w = _sched(max_num_seqs=1), FakeWorker()
    low = _add(s, "low", range(100, 105), priority=2, max_tokens=3)
    high = _add(s, "high", range(200, 205), priority=0, max_tokens=3)
    assert step(s, 7, w).req_ids == ["high"]  # arrived later, goes first
    while not high.is_finished:
        assert step(s, 7, w).req_ids == ["high"]
    assert step(s, 7, w).req_ids == ["low"]
    run_to_completion(s, w)
    assert low.seqs[0].status is SequenceStatus.FINISHED_LENGTH


@pytest.mark.parametrize("policy, victim", [("priority", "A"), ("fcfs", "B")])
def test_the_lowest_priority_is_preempted(policy, victim):
    """Four blocks, two growing requests: one must give its blocks up. FCFS takes the latest
    arrival (B); priority takes the lowest priority (A, which arrived first)."""
    s, w = _sched(policy, num_gpu=4), FakeWorker()
    _add(s, "A", range(100, 106), priority=1 if policy == "priority" else 0, max_tokens=8)
    _add(s, "B", range(200, 206), priority=0, max_tokens=8)
    preempted = []
    while s.has_unfinished_requests() and not preempted:
        preempted = step(s, 7, w).finished_req_ids
    assert preempted == [victim] and s.num_preempted_total == 1
    run_to_completion(s, w)


def test_priority_needs_the_priority_policy():
    with pytest.raises(ValueError, match="needs scheduling_policy='priority'"):
        _add(_sched("fcfs"), "x", [1, 2, 3], priority=1)
