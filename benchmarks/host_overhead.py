"""Host time per steady-state decode step, on the CPU: no model, no Ray, no GPU.

The engine keeps two steps in flight, so every host cost below sits on the critical
path whenever it exceeds the GPU's step time. This measures them one by one, with B
running sequences (prompts of --prompt-len tokens, greedy, EOS ignored), all decoding:

  driver  schedule       Scheduler.schedule() (blocks, deltas, the SchedulerOutput)
          pickle         pickle.dumps of that SchedulerOutput (what the executor sends)
          update         Scheduler.update_from_output + EngineMetrics.record_step
          outputs        LLMEngine._make_output per touched request (detokenize=False)
  worker  unpickle       pickle.loads of it (each worker gets its own copy)
          update_states  ModelRunner.update_states
          prepare        ModelRunner.prepare_inputs (the decodes' inputs are placeholders,
                         as on the GPU: the previous step's tokens are still in flight)
          sample_host    ModelRunner._sample with [B, 16] logits: the host side of sampling
          finish         ModelRunner._finish of the previous step (tokens into the states)
  sampler sampler_full   Sampler.sample on [B, --vocab] float32 logits (argmax included)
          sampler_host   the same on [B, 16] logits: about all but the argmax's own work

The worker is driven as execute_model drives it on the GPU (prepare step N+1, then
finish step N, then sample N+1), with the scheduler's own SchedulerOutputs. Medians
over --steps steps, in ms.

    python3 -m benchmarks.host_overhead --batch 64 256
"""
from __future__ import annotations

import argparse
import pickle
import time
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.common import median, ms, print_table, write_result
from driver.config import CacheConfig, SchedulerConfig
from driver.engine import LLMEngine
from driver.metrics import EngineMetrics
from driver.protocol import ModelRunnerOutput
from driver.sampling_params import SamplingParams
from driver.scheduler import Scheduler
from driver.sequence import SequenceGroup
from workers.model_runner import ModelRunner
from workers.sampler import Sampler, SamplingRow

DRIVER = ("schedule", "pickle", "update", "outputs")
WORKER = ("unpickle", "update_states", "prepare", "sample_host", "finish")
SAMPLER = ("sampler_full", "sampler_host")


class _FakeModel:
    """Stands in for the model: hidden states of width 1, logits of width 16."""

    def __call__(self, input_ids, positions, kv_caches, meta):
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden):
        return torch.randn(hidden.shape[0], 16)


def _setup(batch: int, prompt_len: int, steps: int, block_size: int):
    max_model_len = prompt_len + steps + 64
    blocks = batch * (-(-max_model_len // block_size)) + 16
    sched = Scheduler(SchedulerConfig(max(256, batch), max(2048, prompt_len), True, "recompute"),
                      CacheConfig(block_size=block_size), max_model_len, blocks, 16, eos_token_ids=(2,))
    params = SamplingParams(max_tokens=steps + 32, temperature=0.0, ignore_eos=True, detokenize=False)
    rng = np.random.default_rng(0)
    engine = LLMEngine.__new__(LLMEngine)  # just what _make_output needs: no Ray, no tokenizer
    engine.scheduler, engine.metrics, engine.texts, engine.groups = sched, EngineMetrics(), {}, {}
    for i in range(batch):
        group = SequenceGroup.create(str(i), None, rng.integers(100, 30000, prompt_len).tolist(), params)
        sched.add_request(group)
        engine.groups[group.request_id] = group
    runner = ModelRunner(_FakeModel(), [], block_size, torch.device("cpu"), rank=0)
    return sched, engine, runner


def _worker_step(runner: ModelRunner, so, t: dict) -> list[ModelRunnerOutput]:
    """ModelRunner.execute_model's GPU order (queue N+1, then finish N), timed by phase."""
    a = time.perf_counter()
    runner.update_states(so)
    b = time.perf_counter()
    prev, runner._prev = runner._prev, None
    inputs = runner.prepare_inputs(so, prev)
    c = time.perf_counter()
    hidden = runner.model(inputs.input_ids, None, None, None)
    logits = runner.model.compute_logits(hidden[inputs.logits_indices])
    d = time.perf_counter()
    out = runner._finish(prev)
    e = time.perf_counter()
    timer = SimpleNamespace(lap=lambda _: None, end=lambda: None, wait=lambda: {})
    runner._prev = runner._sample(so.step_id, inputs, logits, timer)
    f = time.perf_counter()
    t.update(update_states=b - a, prepare=c - b, finish=e - d, sample_host=f - e)
    return [out] if out is not None else []


def _driver_step(sched, engine, runner, in_flight: list) -> dict:
    """One engine.step with async scheduling: schedule N+1, run it, update N, outputs of N."""
    t: dict = {}
    a = time.perf_counter()
    so = sched.schedule()
    b = time.perf_counter()
    data = pickle.dumps(so, protocol=pickle.HIGHEST_PROTOCOL)  # what the executor sends
    c = time.perf_counter()
    worker_so = pickle.loads(data)  # each worker's copy
    t["unpickle"] = time.perf_counter() - c
    outs = _worker_step(runner, worker_so, t)
    in_flight.append(so)
    prev_so = in_flight.pop(0)
    (result,) = outs if outs else (ModelRunnerOutput(prev_so.step_id),)
    d = time.perf_counter()
    groups = sched.update_from_output(prev_so, result)
    engine.metrics.record_step(prev_so, result, 0.0, sched)
    e = time.perf_counter()
    for group in groups:
        engine._make_output(group)
    f = time.perf_counter()
    t.update(schedule=b - a, pickle=c - b, update=e - d, outputs=f - e)
    t["decode"] = len(so.req_ids) == len(sched.running) and all(n == 1 for n in so.num_scheduled_tokens)
    return t


def measure_engine(batch: int, prompt_len: int, steps: int, block_size: int) -> dict:
    sched, engine, runner = _setup(batch, prompt_len, steps, block_size)
    in_flight = [sched.schedule()]  # step 0 in flight, as the engine's first step leaves it
    _worker_step(runner, in_flight[0], {})
    rows = []
    for _ in range(steps + 10 * prompt_len):
        t = _driver_step(sched, engine, runner, in_flight)
        if t["decode"]:
            rows.append(t)
            if len(rows) == steps + 5:
                break
    rows = rows[5:]  # warm-up
    assert len(rows) == steps, f"only {len(rows)} full-batch decode steps"
    return {k: ms(median([r[k] for r in rows])) for k in DRIVER + WORKER}


def measure_sampler(batch: int, vocab: int, steps: int) -> dict:
    sampler = Sampler(0)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1000)
    rows = [SamplingRow(params, 0, list(range(200)), 128) for _ in range(batch)]
    out = {}
    for name, width in (("sampler_full", vocab), ("sampler_host", 16)):
        logits = torch.randn(batch, width)
        times = []
        for _ in range(max(20, steps // 4 if width > 16 else steps)):
            a = time.perf_counter()
            sampler.sample(logits, rows)
            times.append(time.perf_counter() - a)
        out[name] = ms(median(times[3:]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="running sequences (decodes)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=200, help="timed decode steps (medians)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--vocab", type=int, default=128256, help="logits width of sampler_full")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: a worker's host thread)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON result")
    p.add_argument("--tag", default="", help="extra tag in the result file name")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for batch in args.batch:
        row = {"batch": batch, **measure_engine(batch, args.prompt_len, args.steps, args.block_size),
               **measure_sampler(batch, args.vocab, args.steps)}
        results.append(row)
    config = {k: getattr(args, k) for k in ("batch", "prompt_len", "steps", "block_size", "vocab", "threads")}
    write_result("host_overhead", {"config": config, "unit": "ms, median per decode step",
                                   "results": results}, args.out, device="cpu", tag=args.tag)
    cols = ("batch",) + DRIVER + WORKER + SAMPLER
    print_table(list(cols), [[r[c] for c in cols] for r in results])


if __name__ == "__main__":
    main()
