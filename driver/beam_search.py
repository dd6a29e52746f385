"""Beam search (vLLM's LLM.beam_search and BeamSearchParams), on top of the engine.

Each step runs every live beam of every prompt as a one-token request asking for the top
2 * beam_width logprobs (the prefix cache serves the beam's full blocks, so a step computes
little more than each beam's last block). Every beam grows by each of those tokens; a beam
that ends in a stop token is complete (unless ignore_eos); the beam_width best of the rest
go on. At the end the completed and live beams are ranked by cum_logprob / len **
length_penalty (the length counts the prompt and leaves out a final stop token, as vLLM's
get_beam_search_score does) and the beam_width best come back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from driver.sampling_params import SamplingParams

MAX_BEAM_WIDTH = 10  # 2 * beam_width logprobs per step, and at most 20 are returned


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"BeamSearchParams.beam_width must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"BeamSearchParams.max_tokens must be >= 1, got {self.max_tokens!r}")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # the prompt's, then the generated ones
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per generated token: the top 2k there
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (a stop token) or "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_score(beam: BeamSearchSequence, stop_ids: tuple[int, ...], length_penalty: float) -> float:
    length = len(beam.tokens) - (beam.tokens[-1] in stop_ids)
    return beam.cum_logprob / length ** length_penalty


def beam_search(llm, prompts: list[list[int]], params: BeamSearchParams, lora_request=None,
                use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """prompts as token ids; llm: a driver.LLM."""
    stop_ids = tuple(llm.engine.scheduler.eos_token_ids)
    width = params.beam_width
    step = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * width, ignore_eos=True, detokenize=False)
    live = [[BeamSearchSequence(list(p))] for p in prompts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        beams = [(i, b) for i, group in enumerate(live) for b in group]
        if not beams:
            break
        outs = llm.generate([b.tokens for _, b in beams], step, use_tqdm=use_tqdm, lora_request=lora_request)
        grown: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(beams, outs):
            top = out.outputs[0].logprobs[0]
            for token, logprob in top.items():
                child = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [top], beam.cum_logprob + logprob)
                if token in stop_ids and not params.ignore_eos:
                    child.finish_reason = "stop"
                    done[i].append(child)
                else:
                    grown[i].append(child)
        live = [sorted(g, key=lambda b: b.cum_logprob, reverse=True)[:width] for g in grown]
    results = []
    for group, finished in zip(live, done):
        for beam in group:
            beam.finish_reason = "length"
        ranked = sorted(finished + group, key=lambda b: beam_score(b, stop_ids, params.length_penalty),
                        reverse=True)[:width]
        for beam in ranked:
            beam.text = llm.tokenizer.decode(beam.tokens)
        results.append(BeamSearchOutput(ranked))
    return results


__all__ = ["BeamSearchParams", "BeamSearchSequence", "BeamSearchOutput", "beam_search"]
