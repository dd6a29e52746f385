"""driver/lora.py's LoRASlots and the scheduler's use of it: a sequence starts only with its
adapter in one of max_loras slots; a slot changes hands only when no running sequence uses
its adapter, least recently admitted first; each change reaches the workers once, in the
SchedulerOutput of the step that first needs it."""
from types import SimpleNamespace

from driver.config import CacheConfig, SchedulerConfig
from driver.lora import LoRARequest, LoRASlots
from driver.protocol import ModelRunnerOutput
from driver.sampling_params import SamplingParams
from driver.scheduler import Scheduler
from driver.sequence import SequenceGroup

def _running(*lora_ids: int) -> list[SimpleNamespace]:
    """Running sequences of these adapters (and one of the base weights)."""
    return [SimpleNamespace(lora_id=i) for i in (0, *lora_ids)]


A, B, C = (LoRARequest(name, i, f"/adapters/{name}") for i, name in ((1, "a"), (2, "b"), (3, "c")))


def test_slots_evict_the_least_recently_admitted_idle_adapter():
    slots = LoRASlots(2)
    slots.acquire(A, _running())
    slots.acquire(B, _running(1))
    assert slots.take_loads() == [(A, 0), (B, 1)] and slots.take_loads() == []
    both = _running(1, 2)
    assert slots.can_run(1, both) and slots.can_run(0, both) and not slots.can_run(3, both)
    slots.acquire(A, _running(2))  # resident: no load, but it is now the most recently admitted
    slots.acquire(C, _running(2))  # B is running: A goes, even though B is older
    assert slots.take_loads() == [(C, 0)] and slots.slot_of == {2: 1, 3: 0}
    slots.acquire(A, _running())  # B (admitted before C) is the least recently admitted
    assert slots.take_loads() == [(A, 1)] and slots.slot_of == {3: 0, 1: 1}


def _sched(max_loras: int) -> Scheduler:
    return Scheduler(SchedulerConfig(8, 64, True, "recompute"), CacheConfig(block_size=4), 64, 32, 16,
                     eos_token_ids=(0,), max_loras=max_loras)


def _add(sched: Scheduler, rid: str, lora: LoRARequest | None) -> SequenceGroup:
    group = SequenceGroup.create(rid, None, [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    group.lora_request, group.seqs[0].lora_id = lora, lora.lora_int_id if lora else 0
    sched.add_request(group)
    return group


def _run_step(sched: Scheduler):
    out = sched.schedule()
    tokens = [9] * len(out.req_ids)
    sched.update_from_output(out, ModelRunnerOutput(out.step_id, list(out.req_ids), tokens))
    return out


def test_more_adapters_than_slots_take_turns():
    sched = _sched(max_loras=1)
    for rid, lora in (("a", A), ("base", None), ("b", B), ("a2", A)):
        _add(sched, rid, lora)
    first = _run_step(sched)
    # FCFS stops at "b" (no slot while "a" runs); "a2" waits behind it.
    assert first.req_ids == ["a", "base"] and first.lora_loads == [(A, 0)]
    second = _run_step(sched)  # "a" and "base" decode their last token and finish
    assert second.lora_loads == [] and sorted(second.req_ids) == ["a", "base"]
    third = _run_step(sched)
    assert third.req_ids == ["b"] and third.lora_loads == [(B, 0)]  # "a2" needs A: B holds the slot
    _run_step(sched)
    fourth = _run_step(sched)
    assert fourth.req_ids == ["a2"] and fourth.lora_loads == [(A, 0)]
    assert not sched.has_unfinished_requests() or _run_step(sched).lora_loads == []
