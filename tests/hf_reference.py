"""The reference: Hugging Face transformers, float32 on the CPU, greedy, one token at a time."""
from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM


@functools.lru_cache(maxsize=8)
def hf_model(ckpt: str):
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(ckpt: str, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the logprob of each under the raw distribution (no KV cache: the
    whole sequence is recomputed each step, so nothing of ours is shared with it)."""
    model = hf_model(ckpt)
    ids = list(prompt_ids)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        ids.append(tok)
    return tokens, logprobs


@torch.inference_mode()
def hf_prompt_logprobs(ckpt: str, prompt_ids: list[int], k: int) -> list[tuple[float, list[int], list[float]]]:
    """Per prompt token after the first: its logprob given the tokens before it, and the
    top-k token ids and logprobs there (one forward over the whole prompt)."""
    logits = hf_model(ckpt)(torch.tensor([prompt_ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, dim=-1)
    own = lp.gather(1, torch.tensor(prompt_ids[1:]).unsqueeze(1)).squeeze(1)
    top_v, top_i = torch.topk(lp, k, dim=-1)
    return [(float(o), i.tolist(), v.tolist()) for o, i, v in zip(own, top_i, top_v)]


@torch.inference_mode()
def hf_embedding(ckpt: str, prompt_ids: list[int], normalize: bool = True) -> list[float]:
    """The last token's final hidden state (the base model's output, after its final norm)."""
    hidden = hf_model(ckpt).model(torch.tensor([prompt_ids])).last_hidden_state[0, -1].float()
    return (torch.nn.functional.normalize(hidden, dim=0) if normalize else hidden).tolist()


@torch.inference_mode()
def hf_greedy_choice(ckpt: str, prompt_ids: list[int], choices: list[list[int]], stop_ids: list[int]) -> list[int]:
    """Greedy decoding constrained to one of `choices` (token lists): at each step the argmax
    over the next tokens of the choices the output is a prefix of (and the stop ids once it is
    a whole choice), until a whole choice no longer one continues, or a stop id."""
    model, out = hf_model(ckpt), []
    while True:
        n = len(out)
        allowed = {c[n] for c in choices if len(c) > n and c[:n] == out}
        if out in choices:
            if not allowed:
                return out
            allowed |= set(stop_ids)
        logits = model(torch.tensor([prompt_ids + out])).logits[0, -1]
        out.append(max(sorted(allowed), key=lambda t: float(logits[t])))
        if out[-1] in stop_ids:
            return out


@torch.inference_mode()
def hf_greedy_regex(ckpt: str, prompt_ids: list[int], pattern: str, token_texts: list[str | None],
                    stop_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding whose output text stays a prefix of a full match of `pattern`, decided
    by the `regex` module's partial matching (independent of raytp's automata): the argmax
    over the tokens that keep a possible match (and the stop ids where the text is a match),
    until a stop id, max_tokens, or a match no token can extend. token_texts: each token's
    text (None: never allowed)."""
    import regex

    model, out, text = hf_model(ckpt), [], ""
    candidates = [(t, s) for t, s in enumerate(token_texts) if s]
    while len(out) < max_tokens:
        allowed = [t for t, s in candidates if regex.fullmatch(pattern, text + s, partial=True)]
        if regex.fullmatch(pattern, text):
            if not allowed:
                return out
            allowed += stop_ids
        logits = model(torch.tensor([prompt_ids + out])).logits[0, -1]
        out.append(max(sorted(allowed), key=lambda t: float(logits[t])))
        if out[-1] in stop_ids:
            return out
        text += token_texts[out[-1]]
    return out


@torch.inference_mode()
def hf_beam_search(ckpt: str, prompt_ids: list[int], width: int, max_tokens: int, stop_ids: list[int],
                   length_penalty: float = 1.0) -> list[tuple[list[int], float]]:
    """vLLM's beam search over transformers' float32 logprobs: (tokens incl. the prompt,
    cumulative logprob) of the `width` best, best first."""
    model, live, done = hf_model(ckpt), [(list(prompt_ids), 0.0)], []
    for _ in range(max_tokens):
        grown = []
        for tokens, cum in live:
            top = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), -1).topk(2 * width)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                (done if t in stop_ids else grown).append((tokens + [t], cum + v))
        live = sorted(grown, key=lambda b: b[1], reverse=True)[:width]
    score = lambda b: b[1] / (len(b[0]) - (b[0][-1] in stop_ids)) ** length_penalty  # noqa: E731
    return sorted(done + live, key=score, reverse=True)[:width]
