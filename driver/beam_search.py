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


class BeamSearch:
    """One batch's beam search: the live beams of each prompt, grown by `advance` with each
    live beam's top logprobs (from a one-token request with `step_params`)."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, stop_ids: tuple[int, ...]):
        self.params, self.stop_ids = params, stop_ids
        self.step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * params.beam_width,
                                          ignore_eos=True, detokenize=False)
        self.live = [[BeamSearchSequence(list(p))] for p in prompts]
        self.done: list[list[BeamSearchSequence]] = [[] for _ in prompts]

    def beams(self) -> list[BeamSearchSequence]:
        """Every live beam, prompt by prompt: the next step's requests, in order."""
        return [b for group in self.live for b in group]

    def advance(self, tops: list[dict[int, float]]) -> None:
        """tops: per beam of beams(), the top 2 * beam_width logprobs of its next token."""
        it = iter(tops)
        for i, group in enumerate(self.live):
            grown = []
            for beam in group:
                top = next(it)
                for token, logprob in top.items():
                    child = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [top],
                                               beam.cum_logprob + logprob)
                    if token in self.stop_ids and not self.params.ignore_eos:
                        child.finish_reason = "stop"
                        self.done[i].append(child)
                    else:
                        grown.append(child)
            self.live[i] = sorted(grown, key=lambda b: b.cum_logprob, reverse=True)[:self.params.beam_width]

    def results(self, decode=None) -> list[BeamSearchOutput]:
        """Per prompt, the beam_width best of the completed and live beams; decode(tokens) -> text
        (None: no text)."""
        out = []
        for group, finished in zip(self.live, self.done):
            for beam in group:
                beam.finish_reason = "length"
            ranked = sorted(finished + group, key=lambda b: beam_score(b, self.stop_ids, self.params.length_penalty),
                            reverse=True)[:self.params.beam_width]
            for beam in ranked if decode is not None else ():
                beam.text = decode(beam.tokens)
            out.append(BeamSearchOutput(ranked))
        return out


def beam_search(llm, prompts: list[list[int]], params: BeamSearchParams, lora_request=None,
                use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """prompts as token ids; llm: a driver.LLM."""
    search = BeamSearch(prompts, params, tuple(llm.engine.scheduler.eos_token_ids))
    for _ in range(params.max_tokens):
        beams = search.beams()
        if not beams:
            break
        outs = llm.generate([b.tokens for b in beams], search.step_params, use_tqdm=use_tqdm,
                            lora_request=lora_request)
        search.advance([o.outputs[0].logprobs[0] for o in outs])
    return search.results(llm.tokenizer.decode)


def api_beam_params(body: dict, params: SamplingParams, stream: bool) -> BeamSearchParams | None:
    """vLLM's OpenAI extension: use_beam_search (n beams, length_penalty), else None."""
    if not body.get("use_beam_search"):
        return None
    if stream:
        raise ValueError("'use_beam_search' returns whole responses only; leave out 'stream'")
    if params.max_tokens is None:
        raise ValueError("'use_beam_search' needs 'max_tokens'")
    if params.logprobs is not None or params.prompt_logprobs is not None:
        raise ValueError("'use_beam_search' returns no logprobs; leave them out")
    penalty = body.get("length_penalty", 1.0)
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
        raise ValueError(f"'length_penalty' must be a number, got {penalty!r}")
    return BeamSearchParams(beam_width=params.n, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
                            length_penalty=float(penalty))


__all__ = ["BeamSearch", "BeamSearchParams", "BeamSearchSequence", "BeamSearchOutput", "beam_search",
           "api_beam_params"]
