"""The offline API, vLLM-shaped:

    from driver import LLM, SamplingParams
    llm = LLM(model=DIR, tensor_parallel_size=2, device="cpu", dtype="float32")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=16))
    llm.shutdown()
"""
from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from driver.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from driver.config import EngineConfig, generation_defaults
from driver.engine import LLMEngine
from driver.lora import LoRARequest
from driver.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from driver.sampling_params import PoolingParams, SamplingParams
from driver.tokenizer import apply_chat_template, encode_prompt, load_chat_template

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1, device: str = "auto",
                 dtype: str = "auto", config: EngineConfig | None = None, **kwargs):
        """`model` is a Hugging Face checkpoint directory (None: the embedded demo model).
        Other keyword arguments are engine options (see `raytp generate --help`)."""
        if config is None:
            if model is None:
                from driver.demo import demo_checkpoint_dir
                model = demo_checkpoint_dir()
            config = EngineConfig.create(model, tensor_parallel_size=tensor_parallel_size,
                                         device=device, dtype=dtype, **kwargs)
        self.config = config
        self.engine = LLMEngine(config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: what generate() samples with when given no SamplingParams, SamplingParams()
        with the sampling fields of the checkpoint's generation_config.json."""
        return SamplingParams(**generation_defaults(self.engine.config.model.model))

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams | PoolingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run a batch to completion; outputs come back in input order. priority: one per
        prompt (lower first), with scheduling_policy="priority"."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params; "
                                 f"pass one SamplingParams or one per prompt")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if not len(loras) == len(priorities) == len(prompts):
            raise ValueError(f"got {len(prompts)} prompts, {len(loras)} LoRA requests and {len(priorities)} "
                             f"priorities; give one per prompt")
        ids = []
        try:
            for prompt, p, lora, prio in zip(prompts, params, loras, priorities):
                ids.append(self.engine.add_request(prompt, p, lora_request=lora, priority=prio))
        except Exception:
            for request_id in ids:  # nothing half-submitted stays behind
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, lora_request: LoRARequest | None = None,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Each conversation goes through the tokenizer's chat template (or `chat_template`: a
        Jinja template, or a file of one)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        kw = {"chat_template": load_chat_template(chat_template)} if chat_template is not None else {}
        prompts = [apply_chat_template(self.tokenizer, c, **kw) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def embed(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """Each prompt's embedding: its last token's final hidden state (PoolingParams)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        outs = self.generate(list(prompts), [pooling_params or PoolingParams()] * len(prompts), use_tqdm)
        return [EmbeddingRequestOutput(o.request_id, o.prompt_token_ids, EmbeddingOutput(o.embedding))
                for o in outs]

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams,
                    lora_request: LoRARequest | None = None, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search: per prompt, the params.beam_width best sequences (driver/beam_search.py)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [encode_prompt(self.tokenizer, p) if isinstance(p, str) else [int(t) for t in p]
                       for p in prompts]
        return beam_search(self, token_lists, params, lora_request, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", unit="req", disable=not use_tqdm,
                   dynamic_ncols=True)
        generated = 0
        try:
            while len(done) < len(ids):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("the engine has no unfinished requests but some never finished")
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        generated += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        bar.set_postfix(out_tok_s=f"{generated / max(bar.format_dict['elapsed'], 1e-9):.1f}")
        except BaseException:
            for request_id in wanted - done.keys():
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]

    def start_profile(self) -> None:
        """Profile the workers (torch.profiler) until stop_profile()."""
        self.engine.executor.run_all("start_profile")

    def stop_profile(self, top: int = 30, rank: int = 0, trace_dir: str | None = None) -> list[dict]:
        """That rank's `top` ops by their own device time: [{name, count, self_ms}]. With
        trace_dir (a path on the workers' nodes), each rank also writes its timeline there as
        rank<r>.json (Chrome trace: chrome://tracing, Perfetto)."""
        return self.engine.executor.run_all("stop_profile", top, trace_dir)[rank]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
