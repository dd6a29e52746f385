"""Ray executor: a placement group with one bundle per TP rank, one worker actor per
bundle, and the per-step broadcast of the scheduler's message.

The step message is pickled once and sent inside every rank's call when small (a decode
step's deltas: no object-store round trip), or put into the object store once when large
(many new prompts); rank 0's result is the only one returned. A worker that dies makes the
step raise (the others are then stuck in a collective, so the executor kills them):
an error, never a hang.
"""
from __future__ import annotations

import logging
import pickle
import uuid
from collections import deque

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from driver.config import EngineConfig
from driver.protocol import ModelRunnerOutput, SchedulerOutput
from workers.worker import Worker

logger = logging.getLogger("raytp.executor")

PLACEMENT_TIMEOUT_S = 60.0
# Ray's own limit for arguments sent inside a call (max_direct_call_object_size); above it,
# Ray would store the argument once per call, so the executor stores it once for all ranks.
INLINE_MAX_BYTES = 100 * 1024


class WorkerDiedError(RuntimeError):
    """A worker actor failed; the engine cannot continue."""


class RayExecutor:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tp = config.parallel.tensor_parallel_size
        self.engine_id = uuid.uuid4().hex[:8]
        self.workers: list = []
        self.pg = None
        self.custom_all_reduce = False  # small all-reduces through symmetric memory (GPU, TP>1)
        self._calls: deque[list] = deque()  # per submitted call, every rank's ref; oldest first
        self._outputs: dict[int, ModelRunnerOutput] = {}  # received, not yet collected
        _init_ray(config.parallel.ray_address)
        try:
            self._start_workers()
            self.num_gpu_blocks, self.num_cpu_blocks = self._init_workers()
        except BaseException:
            self.shutdown()
            raise

    def _start_workers(self) -> None:
        on_gpu = self.config.parallel.device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if on_gpu else {"CPU": 1}
        _check_resources(bundle, self.tp)
        self.pg = placement_group([dict(bundle) for _ in range(self.tp)], strategy="STRICT_PACK",
                                  name=f"raytp-{self.engine_id}")
        try:
            ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"could not place {self.tp} workers of {bundle} on one node within "
                               f"{PLACEMENT_TIMEOUT_S:.0f} s; free resources or lower tensor_parallel_size")
        actor_cls = ray.remote(Worker)
        for rank in range(self.tp):
            self.workers.append(actor_cls.options(
                name=f"raytp-{self.engine_id}-tp{rank}",  # what the dashboard shows
                num_cpus=1, num_gpus=1 if on_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(self.config, rank))

    def _init_workers(self) -> tuple[int, int]:
        if self.config.parallel.device == "cuda":
            self._init_devices()
        address = self._get(self.workers[0].get_dist_address.remote())
        self.custom_all_reduce = all(self._run_all("init_model", address))  # ranks agree
        blocks = self._run_all("determine_num_blocks")
        num_gpu = min(b[0] for b in blocks)
        num_cpu = min(b[1] for b in blocks)
        need = -(-self.config.model.max_model_len // self.config.cache.block_size)
        if num_gpu < need:
            raise RuntimeError(
                f"the KV cache holds {num_gpu} blocks, fewer than one sequence of max_model_len="
                f"{self.config.model.max_model_len} needs ({need}); give the cache more memory "
                f"(kv_cache_memory_gb / gpu_memory_utilization) or lower max_model_len")
        self._run_all("init_cache", num_gpu, num_cpu)
        logger.info("%d worker(s) ready: %d KV blocks of %d tokens, %d swap blocks%s",
                    self.tp, num_gpu, self.config.cache.block_size, num_cpu,
                    ", custom all-reduce" if self.custom_all_reduce else "")
        return num_gpu, num_cpu

    def _init_devices(self) -> None:
        """Each rank sees the GPUs of all ranks on its node, in rank order, and uses its own
        (peer-to-peer all-reduce needs the peers visible; Ray shows each actor one GPU)."""
        placed = self._run_all("gpu_ids")  # [(node id, [gpu id])] in rank order
        refs = []
        for w, (node, ids) in zip(self.workers, placed):
            visible = list(dict.fromkeys(g for n, gs in placed if n == node for g in gs))
            refs.append(w.init_device.remote(visible, visible.index(ids[0])))
        self._wait_all(refs)

    def submit(self, so: SchedulerOutput) -> int:
        """Start a step on every rank; returns its id for collect(). A rank runs its calls
        in submission order; each returns the outputs of the steps it saw finish (on GPU
        usually the step before it: see workers/model_runner.py)."""
        data = pickle.dumps(so, protocol=pickle.HIGHEST_PROTOCOL)  # once, whatever the TP size
        # Inline, a step reaches the ranks without the object store: an empty step's round
        # trip (benchmarks.step_roundtrip, 2-core host) went from 3.8 to 1.2 ms at TP=2.
        arg = data if len(data) <= INLINE_MAX_BYTES else ray.put(data)
        self._calls.append([w.execute_model.remote(arg) for w in self.workers])
        return so.step_id

    def collect(self, step_id: int) -> ModelRunnerOutput:
        """Wait for a submitted step's output (rank 0's), or raise WorkerDiedError."""
        flushed = False
        while step_id not in self._outputs:
            if not self._calls:
                if flushed:
                    self.shutdown()
                    raise WorkerDiedError(f"no output for step {step_id}: driver and workers are out of step")
                self._calls.append([w.flush.remote() for w in self.workers])
                flushed = True
            for out in self._wait_all(self._calls.popleft())[0]:
                self._outputs[out.step_id] = out
        return self._outputs.pop(step_id)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.submit(so))

    def run_all(self, method: str, *args) -> list:
        """Call a Worker method on every rank; the results in rank order."""
        return self._run_all(method, *args)

    def _run_all(self, method: str, *args) -> list:
        return self._wait_all([getattr(w, method).remote(*args) for w in self.workers])

    def _wait_all(self, refs: list) -> list:
        """Results in rank order; raises as soon as any rank fails."""
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                self._get(ref)  # raises this rank's error now, not after the others hang
        return [self._get(r) for r in refs]

    def _get(self, ref):
        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            self.shutdown()
            raise WorkerDiedError(f"a raytp worker failed: {e}") from e

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        self.workers = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None


def _init_ray(address: str | None) -> None:
    """Join a running cluster (address, or the one `ray start` left on this node),
    else start a local one."""
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)


def _check_resources(bundle: dict, tp: int) -> None:
    total = ray.cluster_resources()
    for res, amount in bundle.items():
        if total.get(res, 0) < amount * tp:
            raise RuntimeError(
                f"tensor_parallel_size={tp} needs {amount * tp:g} {res} in the Ray cluster, which has "
                f"{total.get(res, 0):g}; lower tensor_parallel_size or add nodes (`ray up cluster.yaml`)")
