"""Typed, frozen engine configuration: loaded from YAML presets and CLI flags.

`EngineConfig.create(**flags)` is the single entry point: it reads the
checkpoint's config.json (no weights), resolves derived values (dtype,
max_model_len, device) and validates everything, raising ValueError with a
message that says how to fix the problem.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelArch:
    """What the workers need to know about a checkpoint, parsed from config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # frozen dict: (("rope_type", "llama3"), ...)
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    torch_dtype: str  # the checkpoint's own dtype
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None

    @staticmethod
    def from_hf_config(cfg: dict) -> "ModelArch":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(cfg.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; raytp runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if rope_type == "default" else tuple(sorted(rope.items()))
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return ModelArch(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            eos_token_ids=eos_ids,
            sliding_window=window,
        )


def _arch_from_model_type(model_type: str | None) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}.get(model_type or "", str(model_type))


@dataclass(frozen=True)
class ModelConfig:
    model: str  # a Hugging Face checkpoint directory
    arch: ModelArch
    dtype: str  # resolved: float32 | bfloat16 | float16
    max_model_len: int
    tokenizer: str  # directory holding the tokenizer files (default: model)
    load_format: str = "auto"  # "auto": safetensors files; "dummy": random weights, no files
    seed: int = 0


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_gpu_blocks: int | None = None  # None: profiled on GPU, from kv_cache_memory_gb on CPU
    kv_cache_memory_gb: float = 0.5  # KV cache size when the device is the CPU
    gpu_memory_utilization: float = 0.9
    swap_space_gb: float = 0.5  # host memory per worker for swapped-out KV blocks
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    device: str = "cpu"  # resolved: cpu | cuda
    ray_address: str | None = None  # None: join a running local cluster, else start one
    disable_custom_all_reduce: bool = False  # GPU: NCCL for every all-reduce (no symmetric memory)

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    # vLLM's serving default: fewer, larger steps read the weights less often (W1 on an H200:
    # 6.35 s at 2048, 5.61 s at 8192, 6.0 s at 16384), at the cost of longer mixed steps.
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"  # recompute | swap
    async_scheduling: bool = True  # schedule step N+1 while step N runs (hides driver + Ray time)
    # With async_scheduling, steps queued at once: at 3 a worker finds step N+2 waiting when it
    # has queued step N+1, so the driver's round trip is off the GPU's path, not only hidden.
    steps_in_flight: int = 2
    # fcfs: requests in arrival order; priority: by each request's priority (lower first), then
    # arrival, both for admission and for who is preempted last (vLLM v1's policy).
    scheduling_policy: str = "fcfs"


@dataclass(frozen=True)
class LoRAConfig:
    enable_lora: bool = False  # serve LoRA adapters (LoRARequest) beside the base weights
    max_loras: int = 4  # adapter slots: most adapters in one batch (idle ones give their slot up)
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1")


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP server (`raytp serve`): Ray Serve's proxy address and the app's limits."""

    host: str = "0.0.0.0"
    port: int = 8000
    served_model_name: str | None = None  # None: the model directory's name
    max_num_requests: int = 512  # engine requests in flight per replica; more get a 503 at once
    num_replicas: int = 1  # each replica owns a whole engine (tensor_parallel_size devices)
    replica_num_cpus: float = 1.0  # Ray CPUs reserved for a replica (its engine core reserves none)
    # Tokens per streamed chunk (the first token is always sent at once): above 1, fewer
    # messages through Serve's proxy, each of which costs the replica and the proxy Python time.
    stream_interval: int = 1
    api_key: str | None = None  # when set, /v1/* requests need `Authorization: Bearer <api_key>`
    # Chat requests with tools and tool_choice "auto" (vLLM's flags): parse the model's tool
    # calls out of its reply with this parser (driver/tool_parsers.py: hermes, llama3_json, ...).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    # Ray Serve's autoscaling_config, as is ({"min_replicas": 1, "max_replicas": 4,
    # "target_ongoing_requests": 64, ...}): Serve adds engines while the requests in flight
    # per replica stay above the target (and the Ray autoscaler adds nodes for their
    # placement groups). None: num_replicas engines, always.
    autoscaling_config: dict | None = field(default=None, hash=False)
    # LoRA adapters served as models of their own ({name: PEFT directory}, vLLM's --lora-modules);
    # the engine needs enable_lora.
    lora_modules: dict | None = field(default=None, hash=False)
    # Chat replies' reasoning into `reasoning_content` (driver/reasoning_parsers.py: deepseek_r1).
    reasoning_parser: str | None = None
    # vLLM's --chat-template: a Jinja chat template (or a file of one) in place of the tokenizer's.
    chat_template: str | None = None
    # vLLM's --generation-config: "auto" takes the checkpoint's generation_config.json sampling
    # fields as the defaults of requests that leave them out; "vllm" keeps the API's defaults.
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if min(self.max_num_requests, self.num_replicas, self.stream_interval) < 1:
            raise ValueError("max_num_requests, num_replicas and stream_interval must be >= 1")
        if self.tool_call_parser is not None:
            from driver.tool_parsers import get_tool_parser
            get_tool_parser(self.tool_call_parser)  # a clear error for an unknown name
        if self.autoscaling_config is not None:
            self._check_autoscaling()
        if self.reasoning_parser is not None:
            from driver.reasoning_parsers import get_reasoning_parser
            get_reasoning_parser(self.reasoning_parser)  # a clear error for an unknown name
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (hermes, llama3_json, mistral or "
                             "pythonic): the format the model writes its tool calls in")
        if self.generation_config not in ("auto", "vllm"):
            raise ValueError(f"generation_config must be 'auto' or 'vllm', got {self.generation_config!r}")
        if self.chat_template is not None:
            from driver.tokenizer import load_chat_template
            load_chat_template(self.chat_template)  # a clear error for a missing file

    def _check_autoscaling(self) -> None:
        from ray.serve.config import AutoscalingConfig
        conf = self.autoscaling_config
        unknown = sorted(set(conf) - set(AutoscalingConfig.model_fields)) if isinstance(conf, dict) else None
        if unknown is None or unknown:
            raise ValueError(f"autoscaling_config must be a dict of Ray Serve's AutoscalingConfig fields "
                             f"(min_replicas, max_replicas, target_ongoing_requests, ...); got {conf!r}")
        if self.num_replicas != 1:
            raise ValueError("give num_replicas or autoscaling_config, not both: with autoscaling, "
                             "min_replicas and max_replicas bound the number of engines")
        try:
            AutoscalingConfig(**conf)
        except Exception as e:  # pydantic's ValidationError says which field and why
            raise ValueError(f"autoscaling_config: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | None, **overrides) -> "ServeConfig":
        """The preset's `serve:` section (if any), then the non-None overrides."""
        data = {}
        if path:
            with open(path) as f:
                data = dict((yaml.safe_load(f) or {}).get("serve") or {})
        data.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown serve option(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    parallel: ParallelConfig
    scheduler: SchedulerConfig
    enforce_eager: bool = False  # GPU: no CUDA graphs
    lora: LoRAConfig = LoRAConfig()

    # Flat keyword -> section, so that LLM(...) and CLI flags can stay flat like vLLM's.
    _SECTIONS = {"cache": CacheConfig, "parallel": ParallelConfig, "scheduler": SchedulerConfig,
                 "lora": LoRAConfig}

    @classmethod
    def create(cls, model: str, **kwargs) -> "EngineConfig":
        """Build and validate from flat keyword arguments (vLLM's names)."""
        sections: dict[str, dict] = {k: {} for k in cls._SECTIONS}
        model_kw = {k: kwargs.pop(k) for k in ("dtype", "max_model_len", "tokenizer",
                                               "load_format", "seed") if k in kwargs}
        enforce_eager = bool(kwargs.pop("enforce_eager", False))
        for key, value in kwargs.items():
            owner = next((s for s, c in cls._SECTIONS.items()
                          if key in {f.name for f in dataclasses.fields(c)}), None)
            if owner is None:
                raise ValueError(f"unknown engine option {key!r}; see `raytp generate --help`")
            sections[owner][key] = value
        parallel = ParallelConfig(**sections["parallel"])
        parallel = dataclasses.replace(parallel, device=_resolve_device(parallel.device))
        scheduler = SchedulerConfig(**sections["scheduler"])
        cache = CacheConfig(**sections["cache"])
        model_cfg = _make_model_config(model, parallel.device, **model_kw)
        config = cls(model_cfg, cache, parallel, scheduler, enforce_eager, LoRAConfig(**sections["lora"]))
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "EngineConfig":
        """A YAML preset (sections model/cache/parallel/scheduler, or flat), then overrides."""
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key == "serve":  # ServeConfig.from_yaml reads it
                continue
            if isinstance(value, dict) and key in ("model", "cache", "parallel", "scheduler", "lora", "engine"):
                flat.update(value)
            else:
                flat[key] = value
        flat.update({k: v for k, v in overrides.items() if v is not None})
        if "model" not in flat:
            raise ValueError(f"{path}: no model given (set model.model or pass --model)")
        return cls.create(**flat)

    def validate(self) -> None:
        a, tp = self.model.arch, self.parallel.tensor_parallel_size
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
        if a.num_heads % tp or a.num_kv_heads % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} must divide the number of attention heads "
                f"({a.num_heads}) and of key/value heads ({a.num_kv_heads}); "
                f"choose a tensor_parallel_size that divides both")
        if self.cache.block_size not in (8, 16, 32):
            raise ValueError(f"block_size must be 8, 16 or 32, got {self.cache.block_size}")
        if not 0.0 < self.cache.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        s = self.scheduler
        if s.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {s.preemption_mode!r}")
        if s.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {s.scheduling_policy!r}")
        if s.max_num_seqs < 1 or s.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if s.steps_in_flight < 1:
            raise ValueError(f"steps_in_flight must be >= 1 (1: no async scheduling), got {s.steps_in_flight}")
        if not s.enable_chunked_prefill and s.max_num_batched_tokens < self.model.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({s.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.model.max_model_len}); raise it or enable chunked prefill")
        if self.cache.num_gpu_blocks is not None:
            need = -(-self.model.max_model_len // self.cache.block_size)
            if self.cache.num_gpu_blocks < need:
                raise ValueError(
                    f"num_gpu_blocks={self.cache.num_gpu_blocks} cannot hold one sequence of "
                    f"max_model_len={self.model.max_model_len} ({need} blocks of "
                    f"{self.cache.block_size}); raise num_gpu_blocks or lower max_model_len")


def _resolve_device(device: str) -> str:
    if device in ("cpu", "cuda"):
        return device
    if device != "auto":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    import torch  # only to ask whether a GPU is present; no CUDA code runs on the driver
    return "cuda" if torch.cuda.is_available() else "cpu"


def _make_model_config(model: str, device: str, dtype: str = "auto", max_model_len: int | None = None,
                       tokenizer: str | None = None, load_format: str = "auto",
                       seed: int = 0) -> ModelConfig:
    path = os.path.join(model, "config.json")
    if not os.path.isdir(model):
        raise ValueError(f"model directory {model!r} does not exist; pass a Hugging Face "
                         f"checkpoint directory (config.json, *.safetensors, tokenizer files)")
    if not os.path.isfile(path):
        raise ValueError(f"{model!r} has no config.json; is it a Hugging Face checkpoint directory?")
    with open(path) as f:
        arch = ModelArch.from_hf_config(json.load(f))
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        # CPU kernels are float32; on GPU, a float32 checkpoint still serves in bfloat16 (as vLLM).
        ckpt = arch.torch_dtype if arch.torch_dtype in DTYPES else "float32"
        dtype = "float32" if device == "cpu" else ("bfloat16" if ckpt == "float32" else ckpt)
    limit = arch.max_position_embeddings
    if arch.sliding_window:
        limit = min(limit, arch.sliding_window)  # no sliding-window attention: stay inside the window
    if max_model_len is None:
        max_model_len = limit
    elif not 1 <= max_model_len <= limit:
        raise ValueError(f"max_model_len={max_model_len} exceeds what the model supports ({limit}); "
                         f"pass max_model_len <= {limit}")
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    return ModelConfig(model=model, arch=arch, dtype=dtype, max_model_len=int(max_model_len),
                       tokenizer=tokenizer or model, load_format=load_format, seed=seed)


# The sampling fields a checkpoint's generation_config.json may set, as vLLM reads them.
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(model: str) -> dict[str, Any]:
    """The sampling defaults the checkpoint's authors chose (its generation_config.json), which
    vLLM applies where a request leaves a field out (its --generation-config auto)."""
    path = os.path.join(model, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        config = json.load(f)
    return {k: config[k] for k in GENERATION_DEFAULT_KEYS if config.get(k) is not None}


def engine_fields() -> dict[str, Any]:
    """Every flat option EngineConfig.create accepts, with its default (for the CLI)."""
    out: dict[str, Any] = {"dtype": "auto", "max_model_len": None, "tokenizer": None,
                           "load_format": "auto", "seed": 0, "enforce_eager": False}
    for cls in (CacheConfig, ParallelConfig, SchedulerConfig, LoRAConfig):
        for f in dataclasses.fields(cls):
            out[f.name] = f.default
    return out


__all__ = ["ModelArch", "ModelConfig", "CacheConfig", "ParallelConfig", "SchedulerConfig", "LoRAConfig",
           "ServeConfig", "EngineConfig", "engine_fields", "SUPPORTED_ARCHITECTURES"]
