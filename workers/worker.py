"""The worker: one per tensor-parallel rank, run as a Ray actor by the executor.

Lifecycle, each step called by the executor on every rank:
  gpu_ids -> init_device -> get_dist_address (rank 0) -> init_model -> determine_num_blocks -> init_cache
  -> execute_model per step (each returns the outputs of the steps finished by then;
  flush returns the last one) -> shutdown.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket

import torch

from driver import guided
from driver.config import EngineConfig
from driver.protocol import ModelRunnerOutput, SchedulerOutput
from cache_engine.cache_engine import CacheEngine, num_blocks_for_bytes
from workers import parallel_state
from workers.loader import dummy_weights, load_weights
from workers.lora import LoRAManager
from workers.model import LlamaForCausalLM
from workers.model_runner import ModelRunner

logger = logging.getLogger("raytp.worker")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Worker:
    def __init__(self, config: EngineConfig, rank: int):
        # A Ray actor's root logger is unconfigured: make raytp's INFO lines reach the driver log.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config
        self.rank = rank
        self.dtype = DTYPES[config.model.dtype]
        self.model: LlamaForCausalLM | None = None
        self.cache_engine: CacheEngine | None = None
        self.runner: ModelRunner | None = None
        self.lora: LoRAManager | None = None  # with enable_lora
        self._profiler = None
        self.device = torch.device("cpu")  # on GPU, init_device picks this rank's GPU

    def gpu_ids(self) -> tuple[str, list[str]]:
        """(node id, the GPU ids Ray gave this actor); no CUDA call yet."""
        import ray
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])]

    def init_device(self, visible_gpus: list[str], index: int) -> None:
        """See every GPU of this node's TP ranks and use visible_gpus[index].

        Ray shows an actor only its own GPU, but peer-to-peer access (the custom
        all-reduce) needs the peers' GPUs visible too, as vLLM's Ray workers do. The
        environment must change before CUDA initializes in this process."""
        if torch.cuda.is_initialized():
            raise RuntimeError("CUDA initialized before init_device; the worker cannot change its GPUs")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)
        torch.cuda.set_device(index)
        self.device = torch.device("cuda", index)

    def get_dist_address(self) -> str:
        """Rank 0 hosts the torch.distributed rendezvous on a free port of its node."""
        ip = _node_ip()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def init_model(self, dist_init_method: str) -> bool:
        """Join the TP group and load this rank's shard; True if the custom all-reduce is on."""
        cfg = self.config
        parallel_state.init_distributed(cfg.parallel.backend, dist_init_method,
                                        cfg.parallel.tensor_parallel_size, self.rank)
        custom_all_reduce = False
        if self.device.type == "cuda" and not cfg.parallel.disable_custom_all_reduce:
            custom_all_reduce = parallel_state.init_custom_all_reduce(self.device, self.dtype)
        torch.manual_seed(cfg.model.seed)
        with torch.device(self.device):
            model = LlamaForCausalLM(cfg.model.arch, self.dtype)
        if cfg.model.load_format == "dummy":
            dummy_weights(model, cfg.model.seed)
        else:
            load_weights(model, cfg.model.model, progress=self.rank == 0)
        self.model = model.eval()
        # LoRA slots take their memory now, before profiling sizes the KV cache.
        self.lora = LoRAManager(model, cfg.lora.max_loras, cfg.lora.max_lora_rank) if cfg.lora.enable_lora else None
        logger.info("rank %d: model loaded (%s, %s)", self.rank, cfg.model.arch.architecture, cfg.model.dtype)
        return custom_all_reduce

    def determine_num_blocks(self) -> tuple[int, int]:
        """(device blocks, host swap blocks) this rank can hold; the executor takes the minimum."""
        cfg, tp = self.config, self.config.parallel.tensor_parallel_size
        arch, bs = cfg.model.arch, cfg.cache.block_size
        num_cpu = num_blocks_for_bytes(cfg.cache.swap_space_gb * 2**30, arch, tp, bs, self.dtype)
        if cfg.cache.num_gpu_blocks is not None:
            return cfg.cache.num_gpu_blocks, num_cpu
        if self.device.type == "cpu":
            return num_blocks_for_bytes(cfg.cache.kv_cache_memory_gb * 2**30, arch, tp, bs, self.dtype), num_cpu
        from cache_engine.profiler import profile_num_gpu_blocks
        return profile_num_gpu_blocks(self), num_cpu

    def init_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        cfg = self.config
        self.cache_engine = CacheEngine(cfg.model.arch, cfg.parallel.tensor_parallel_size, cfg.cache.block_size,
                                        num_gpu_blocks, num_cpu_blocks, self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.cache_engine.gpu_cache, cfg.cache.block_size,
                                  self.device, self.rank, seed=cfg.model.seed,
                                  max_model_len=cfg.model.max_model_len, lora=self.lora)
        logger.info("rank %d: KV cache of %d device blocks, %d host blocks", self.rank,
                    num_gpu_blocks, num_cpu_blocks)
        if self.device.type == "cuda" and not cfg.enforce_eager:
            if self.dtype == torch.float32:
                # float32 runs the reference ops, which sync with the host: not capturable.
                logger.info("rank %d: float32 runs eagerly (CUDA graphs need bf16/fp16 kernels)", self.rank)
            else:
                self.runner.capture_graphs(cfg.scheduler.max_num_seqs, cfg.model.max_model_len)

    def execute_model(self, data: bytes) -> list[ModelRunnerOutput] | None:
        """Queue the step pickled in `data` (the executor pickles it once for every rank);
        returns the outputs of the steps finished by now (rank 0)."""
        so: SchedulerOutput = pickle.loads(data)
        # Cache moves first: swap-outs free device blocks the step may reuse.
        self.cache_engine.swap_out(so.blocks_to_swap_out)
        self.cache_engine.swap_in(so.blocks_to_swap_in)
        self.cache_engine.copy_blocks(so.blocks_to_copy)
        return self.runner.execute_model(so)

    def flush(self) -> list[ModelRunnerOutput] | None:
        """The output of the last queued step, when no later step will bring it."""
        return self.runner.flush()

    def set_guided_vocab(self, token_bytes: list[bytes | None]) -> None:
        """Each token id's bytes, for structured outputs' masks (rank 0 samples)."""
        if self.rank == 0:
            guided.set_vocab(token_bytes)

    def graph_replays(self) -> dict[tuple[int, bool], int]:
        """(batch-size bucket, LoRA) -> decode steps its CUDA graph ran (empty when eager)."""
        graphs = self.runner.graphs if self.runner is not None else None
        return dict(graphs.replays) if graphs is not None else {}

    def start_profile(self) -> None:
        """torch.profiler over the next steps (CPU and device activity)."""
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()

    def stop_profile(self, top: int = 30, trace_dir: str | None = None) -> list[dict]:
        """The `top` ops by their own device time (CPU time on a CPU worker); with trace_dir,
        the timeline too, as trace_dir/rank<r>.json."""
        prof, self._profiler = self._profiler, None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        if trace_dir is not None:
            os.makedirs(trace_dir, exist_ok=True)
            prof.export_chrome_trace(os.path.join(trace_dir, f"rank{self.rank}.json"))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        rows = [{"name": e.key, "count": e.count, "self_ms": getattr(e, key, 0.0) / 1e3}
                for e in prof.key_averages()]
        return sorted(rows, key=lambda r: -r["self_ms"])[:top]

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        parallel_state.destroy_distributed()


def _node_ip() -> str:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (unit tests): loopback
        return "127.0.0.1"
