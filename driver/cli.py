"""`raytp` command line: `raytp generate ...` (offline generation), `raytp serve ...` (the
OpenAI-compatible HTTP server on Ray Serve)."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from driver.config import engine_fields
from driver.reasoning_parsers import REASONING_PARSERS
from driver.tool_parsers import TOOL_PARSERS

ENGINE_HELP = {
    "dtype": "weights/activations dtype: auto (float32 on CPU, checkpoint's or bfloat16 on GPU), "
             "float32, bfloat16, float16",
    "max_model_len": "longest prompt + output in tokens (default: the model's limit)",
    "tokenizer": "tokenizer directory (default: the model directory)",
    "load_format": "auto: safetensors files; dummy: random weights of the right shapes (benchmarks)",
    "seed": "engine seed (weights for load_format=dummy, unseeded sampling)",
    "enforce_eager": "GPU: no CUDA graphs",
    "block_size": "tokens per KV cache block",
    "num_gpu_blocks": "KV cache blocks per worker (default: profiled on GPU, from --kv-cache-memory-gb on CPU)",
    "kv_cache_memory_gb": "KV cache size per worker when the device is the CPU",
    "gpu_memory_utilization": "fraction of GPU memory the worker may use (weights + activations + KV cache)",
    "swap_space_gb": "host memory per worker for swapped-out KV blocks",
    "enable_prefix_caching": "reuse the KV blocks of identical prompt prefixes",
    "tensor_parallel_size": "number of tensor-parallel workers (one GPU or CPU bundle each)",
    "device": "cpu, cuda or auto",
    "disable_custom_all_reduce": "GPU, TP>1: all-reduce with NCCL only, not with the symmetric-memory "
                                 "kernels that small (decode) all-reduces use by default",
    "ray_address": "Ray cluster to join (default: a running local cluster, else start one)",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "most tokens in one step (the token budget)",
    "enable_chunked_prefill": "split long prompts into chunks that share steps with decodes",
    "preemption_mode": "when KV blocks run out: recompute or swap",
    "async_scheduling": "schedule the next step while the current one runs on the workers "
                        "(hides driver and Ray time; default: on)",
    "scheduling_policy": "fcfs (arrival order) or priority (each request's priority, lower first, then arrival)",
    "enable_lora": "serve LoRA adapters (PEFT checkpoints) beside the base weights",
    "max_loras": "adapter slots on each worker: most adapters in one batch (others wait; idle ones are swapped out)",
    "max_lora_rank": "largest adapter rank accepted",
    "steps_in_flight": "with async scheduling, steps queued at once; 3 takes the driver's round trip off "
                       "the GPU's path where it is longer than a step",
}


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", help="Hugging Face checkpoint directory (default: the embedded demo model)")
    group.add_argument("--config", help="YAML preset (see configs/); flags given here override it")
    group.add_argument("--tp", dest="tensor_parallel_size", type=int, help="alias of --tensor-parallel-size")
    for name, default in engine_fields().items():
        flag = "--" + name.replace("_", "-")
        kind = type(default) if default is not None else (int if name in ("max_model_len", "num_gpu_blocks") else str)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=ENGINE_HELP.get(name))
        else:
            text = ENGINE_HELP.get(name, "")
            if default is not None and "default" not in text:
                text += f" (default: {default})"
            group.add_argument(flag, type=kind, default=None, help=text)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per completion (default: 32)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=-1)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--n", type=int, default=1, help="completions per prompt")
    group.add_argument("--sampling-seed", type=int, help="per-request seed: same seed, same tokens")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")
    group.add_argument("--min-tokens", type=int, default=0)
    group.add_argument("--logprobs", type=int, help="also print the top-k logprobs of each token")
    group.add_argument("--lora", metavar="PATH", help="generate with this LoRA adapter (a PEFT directory; "
                                                      "needs --enable-lora)")
    group.add_argument("--prompt-logprobs", type=int,
                       help="score the prompt: its log-likelihood and perplexity (and with --json each "
                            "prompt token's logprob and the top-k there)")
    group.add_argument("--regex", help="structured output: each completion matches this regular expression")
    group.add_argument("--json-schema", metavar="SCHEMA",
                       help="structured output: each completion is JSON this schema allows (the schema's "
                            "JSON text, or a file holding it; {\"type\": \"object\"} for any object)")
    group.add_argument("--grammar", metavar="GBNF",
                       help="structured output: each completion matches this grammar's rule root (GBNF, as "
                            "llama.cpp and vLLM's guided_grammar write it: root ::= ...; the text, or a file)")
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends a flag's default only where its help does not state one and it says something:
    engine flags default to None ("not given"), and their help gives the engine's default."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.default is False \
                or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raytp", description="raytp: a Ray-distributed, tensor-parallel LLM serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="generate completions offline",
        description="Generate completions for one or more prompts and print them. Without --model, "
                    "an embedded tiny demo model (random weights, real tokenizer) is used.",
        formatter_class=_HelpFormatter)
    gen.add_argument("prompts", nargs="*", help="prompts (or use --prompt)")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per completion")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    srv = sub.add_parser(
        "serve", help="serve the OpenAI API over HTTP (Ray Serve)",
        description="Deploy the engine as a Ray Serve app speaking the OpenAI API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics) and block until Ctrl-C. "
                    "Joins a running Ray cluster (e.g. one from `ray up cluster.yaml`) or starts one; "
                    "the Ray dashboard shows the replica and its TP worker actors.",
        formatter_class=_HelpFormatter)
    _add_engine_args(srv)
    _add_serve_args(srv)
    return parser


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (defaults: the preset's serve: section, else ServeConfig's)")
    group.add_argument("--host", help="address Ray Serve's HTTP proxy listens on (default: 0.0.0.0)")
    group.add_argument("--port", type=int, help="HTTP port (default: 8000)")
    group.add_argument("--served-model-name", help="the `model` clients send (default: the model directory's name)")
    group.add_argument("--max-num-requests", type=int,
                       help="requests in flight per replica; more get HTTP 503 at once (default: 512)")
    group.add_argument("--stream-interval", type=int,
                       help="tokens per streamed chunk; the first token goes at once (default: 1, every token)")
    group.add_argument("--api-key", help="require `Authorization: Bearer <key>` on /v1/* (default: no key)")
    group.add_argument("--num-replicas", type=int, help="engines behind the proxy, each with its own "
                                                        "tensor-parallel workers (default: 1)")
    group.add_argument("--autoscaling-config", type=json.loads, metavar="JSON",
                       help="Ray Serve's autoscaling_config instead of a fixed --num-replicas, e.g. "
                            "'{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 64}': "
                            "engines are added while each has more requests in flight than the target")
    group.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH", type=_lora_module,
                       help="LoRA adapters (PEFT directories) served as models named NAME; needs --enable-lora")
    group.add_argument("--generation-config", choices=("auto", "vllm"),
                       help="auto (default): requests that leave out temperature, top_p, top_k, min_p or "
                            "repetition_penalty get the checkpoint's generation_config.json values; vllm: the "
                            "API's defaults")
    group.add_argument("--chat-template", metavar="JINJA",
                       help="chat template in place of the tokenizer's own: a Jinja file, or the template itself")
    group.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS),
                       help="split chat replies into reasoning_content and content: deepseek_r1 (DeepSeek-R1 and "
                            "its distills, thinking that ends in </think>)")
    group.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                       help="chat requests with tools (tool_choice 'auto') get the model's tool calls back as "
                            "tool_calls; needs --tool-call-parser")
    group.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS),
                       help="the format the model writes tool calls in: hermes (Hermes, Qwen2.5/3), "
                            "llama3_json (Llama 3.1/3.2)")


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _sampling_params(args):
    from driver.sampling_params import SamplingParams
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.sampling_seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, min_tokens=args.min_tokens,
        max_tokens=args.max_tokens, logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs,
        presence_penalty=args.presence_penalty, guided_regex=args.regex, guided_json=_schema(args.json_schema),
        guided_grammar=_schema(args.grammar),
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty)


def _schema(value: str | None) -> str | None:
    """--json-schema / --grammar: the text, or the path of a file holding it."""
    if value is not None and os.path.isfile(value):
        with open(value) as f:
            return f.read()
    return value


def _engine_config(args):
    from driver.config import EngineConfig
    flags = {k: getattr(args, k) for k in engine_fields() if getattr(args, k, None) is not None}
    if args.config:
        return EngineConfig.from_yaml(args.config, **({"model": args.model} if args.model else {}), **flags)
    model = args.model
    if model is None:
        from driver.demo import demo_checkpoint_dir
        model = demo_checkpoint_dir()
        print(f"raytp: no --model given, using the embedded demo checkpoint at {model} "
              f"(a tiny random-weight model: its text is gibberish)", file=sys.stderr)
    return EngineConfig.create(model, **flags)


def _prompt_score(prompt: str, out) -> str:
    lps = [d[t] for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
    total = sum(lps)
    ppl = math.exp(-total / len(lps)) if lps else float("nan")
    return f"--- prompt: {prompt!r}: log-likelihood {total:.3f} over {len(lps)} tokens, perplexity {ppl:.3f}"


def _json_prompt_logprobs(out) -> dict:
    if out.prompt_logprobs is None:
        return {}
    return {"prompt_token_ids": out.prompt_token_ids, "prompt_logprobs": out.prompt_logprobs}


def cmd_generate(args) -> int:
    from driver.llm import LLM
    from driver.lora import LoRARequest
    prompts = list(args.prompts) + list(args.prompt)
    if not prompts:
        print("raytp generate: give at least one prompt (positional or --prompt)", file=sys.stderr)
        return 2
    params = _sampling_params(args)
    llm = LLM(config=_engine_config(args))
    try:
        lora = LoRARequest(os.path.basename(os.path.normpath(args.lora)), 1, args.lora) if args.lora else None
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, lora_request=lora)
        else:
            outs = llm.generate(prompts, params, lora_request=lora)
    finally:
        llm.shutdown()
    for prompt, out in zip(prompts, outs):
        if out.prompt_logprobs is not None and not args.json:
            print(_prompt_score(prompt, out))
        for c in out.outputs:
            if args.json:
                print(json.dumps({"prompt": prompt, "index": c.index, "text": c.text, "token_ids": c.token_ids,
                                  "finish_reason": c.finish_reason, "logprobs": c.logprobs,
                                  **_json_prompt_logprobs(out)}))
            else:
                print(f"--- prompt: {prompt!r} [completion {c.index}, {len(c.token_ids)} tokens, "
                      f"finish: {c.finish_reason}]\n{c.text}")
    return 0


def cmd_serve(args) -> int:
    from driver import serve as raytp_serve
    from driver.config import ServeConfig
    serve_config = ServeConfig.from_yaml(args.config, host=args.host, port=args.port,
                                         served_model_name=args.served_model_name,
                                         max_num_requests=args.max_num_requests, num_replicas=args.num_replicas,
                                         stream_interval=args.stream_interval, api_key=args.api_key,
                                         autoscaling_config=args.autoscaling_config,
                                         lora_modules=dict(args.lora_modules) if args.lora_modules else None,
                                         enable_auto_tool_choice=args.enable_auto_tool_choice,
                                         tool_call_parser=args.tool_call_parser,
                                         reasoning_parser=args.reasoning_parser, chat_template=args.chat_template,
                                         generation_config=args.generation_config)
    engine_config = _engine_config(args)
    name = serve_config.served_model_name or raytp_serve.served_name(engine_config)
    print(f"raytp: serving {name!r} at http://{serve_config.host}:{serve_config.port}/v1 (Ctrl-C stops)",
          file=sys.stderr)
    try:
        raytp_serve.run(engine_config, serve_config, blocking=True)
    except KeyboardInterrupt:  # Ctrl-C: take the app (and its engines) off the cluster
        print("raytp: stopping the server", file=sys.stderr)
        from ray import serve
        serve.delete("raytp")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "serve": cmd_serve}[args.command](args)
    except ValueError as e:  # bad input: say what and how to fix, no traceback
        print(f"raytp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
