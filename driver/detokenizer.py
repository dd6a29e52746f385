"""Incremental detokenization and stop strings (vLLM's algorithm).

Decoding one token at a time does not work for byte-level BPE: one character
(é, 中, an emoji) may be split over several tokens, and decoding a lone piece
gives U+FFFD. As vLLM does, each step decodes a short window of tokens twice,
`tokens[prefix_offset:read_offset]` (text already emitted) and
`tokens[prefix_offset:]` (with the new token), and emits the difference. If the
longer text ends with U+FFFD the character is not complete yet: nothing is
emitted and the offsets stay, so the next token is decoded together with the
pending bytes. The window keeps the decoder's context (e.g. leading spaces of
SentencePiece tokens) without decoding the whole sequence each step.

Invariants: `text` is always a prefix of decoding all output tokens at once;
it equals that decode whenever the decode does not end with an incomplete
character. A generation that ends mid-character never emits that last U+FFFD. (Both hold
when the prompt ends on a character boundary; if it ends mid-character, the
first output bytes complete the prompt's character and are not output text.)

Stop strings: `find_stop` truncates the text before the first stop string
(the stop string is not included). Only the tail that can hold a match that
touches the new delta is searched, so each step is O(delta + longest stop).

Streaming and stop strings: a delta that was already streamed can hold the
start of a stop string that is completed only by a later token (stop "abc",
delta "xab", then "c"). The engine's outputs carry such text until the stop
string completes (vLLM v0 streamed it so). `next_stream_delta` does as the v1
engine: it holds back the last len(longest stop) - 1 characters until the
request finishes, and the OpenAI server streams through it, so a stream never
sends any part of a stop string.
"""
from __future__ import annotations

from collections.abc import Sequence

# How many prompt tokens before the first generated one are decoded as context.
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5
REPLACEMENT_CHAR = "\ufffd"


def convert_prompt_ids_to_tokens(tokenizer, prompt_ids: Sequence[int],
                                 skip_special_tokens: bool = False) -> tuple[list[str], int, int]:
    """The prompt's last few tokens (as strings) and the initial offsets into them."""
    # Two extra tokens so that a character split over the prompt's end still decodes.
    tail = list(prompt_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET - 2:])
    tokens = [_id_to_token(tokenizer, t, skip_special_tokens) for t in tail]
    read_offset = len(tokens)
    prefix_offset = max(read_offset - INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET, 0)
    return list(tokens), prefix_offset, read_offset


def _id_to_token(tokenizer, token_id: int, skip_special_tokens: bool) -> str:
    # A model's vocabulary can be padded past its tokenizer's (Qwen2), and a prompt can hold
    # any id below the model's: ids the tokenizer does not know have no text.
    if not 0 <= token_id < len(tokenizer):
        return ""
    tokens = tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=skip_special_tokens)
    token = tokens if isinstance(tokens, str) else (tokens[0] if tokens else "")
    return token if token is not None else ""


def detokenize_incrementally(tokenizer, new_token_id: int, prev_tokens: list[str], prefix_offset: int,
                             read_offset: int, skip_special_tokens: bool = True
                             ) -> tuple[list[str], str, int, int]:
    """One token's step: returns (new_tokens, new_text, prefix_offset, read_offset).

    `prev_tokens` are the token strings so far (prompt tail + outputs); the
    caller appends `new_tokens` to them. `new_text` is "" while a character is
    incomplete.
    """
    new_tokens = [_id_to_token(tokenizer, new_token_id, skip_special_tokens)]
    output_tokens = prev_tokens + new_tokens
    prefix_text = tokenizer.convert_tokens_to_string(output_tokens[prefix_offset:read_offset])
    new_text = tokenizer.convert_tokens_to_string(output_tokens[prefix_offset:])
    if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
        # No new text (a skipped special token) or an incomplete UTF-8 character: wait.
        return new_tokens, "", prefix_offset, read_offset
    return new_tokens, new_text[len(prefix_text):], read_offset, len(output_tokens)


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, step by step."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens, self.prefix_offset, self.read_offset = convert_prompt_ids_to_tokens(
            tokenizer, prompt_token_ids, skip_special_tokens)
        self.text = ""

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text they complete (possibly "")."""
        delta = []
        for token_id in new_token_ids:
            new_tokens, new_text, self.prefix_offset, self.read_offset = detokenize_incrementally(
                self.tokenizer, int(token_id), self.tokens, self.prefix_offset, self.read_offset,
                self.skip_special_tokens)
            self.tokens.extend(new_tokens)
            delta.append(new_text)
        out = "".join(delta)
        self.text += out
        return out


def match_stop(text: str, stop: Sequence[str], new_text_len: int) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string that ends in the last
    `new_text_len` characters of `text`, or None.

    Matches lying wholly in older text were found on earlier steps, so the
    search starts where a match could still include a new character.
    """
    if not stop or new_text_len <= 0:
        return None
    best: tuple[int, str] | None = None
    for s in stop:
        start = max(0, len(text) - new_text_len - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def find_stop(text: str, stop: Sequence[str], new_text_len: int, include: bool = False) -> tuple[str, bool]:
    """(text truncated before the first stop string, or after it with include, whether one
    was found)."""
    hit = match_stop(text, stop, new_text_len)
    if hit is None:
        return text, False
    return text[:hit[0] + (len(hit[1]) if include else 0)], True


def stop_buffer_length(stop: Sequence[str]) -> int:
    """Characters to hold back while streaming so no part of a stop string is sent."""
    return max((len(s) for s in stop), default=1) - 1


def next_stream_delta(text: str, num_sent: int, stop: Sequence[str], finished: bool) -> str:
    """The text to stream now, given `num_sent` characters already sent (opt-in
    hold-back, see the module docstring). Call with the already truncated text."""
    end = len(text) if finished else max(num_sent, len(text) - stop_buffer_length(stop))
    return text[num_sent:end]


__all__ = ["IncrementalDetokenizer", "detokenize_incrementally", "convert_prompt_ids_to_tokens",
           "find_stop", "match_stop", "stop_buffer_length", "next_stream_delta",
           "INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET"]
