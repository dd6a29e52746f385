"""Reasoning in generated text -> OpenAI-style `reasoning_content` (vLLM's --reasoning-parser).

`deepseek_r1` (DeepSeek-R1 and its Qwen2/Llama distills): the reply is the model's thinking,
ended by `</think>`, then its answer. Their chat template opens `<think>` in the prompt, so the
reply usually starts inside it; a `<think>` the model writes itself is dropped. A reply with
no `</think>` is all reasoning (it was cut off while thinking), as vLLM reads it.
"""
from __future__ import annotations

from typing import NamedTuple


class Spans(NamedTuple):
    """Where a reply's parts lie: reasoning text[start:end], content text[content:]."""

    start: int
    end: int
    content: int  # len(text) while no end tag has come


class DeepSeekR1ReasoningParser:
    name = "deepseek_r1"
    START, END = "<think>", "</think>"

    def spans(self, text: str, finished: bool) -> tuple[Spans, int]:
        """The parts of the text so far, and how much of it a stream may send now (a tail that
        may begin the end tag waits, unless the reply is finished)."""
        if not finished and self.START.startswith(text) and text != self.START:
            return Spans(0, 0, len(text)), 0  # may be the start tag: wait
        start = len(self.START) if text.startswith(self.START) else 0
        end = text.find(self.END, start)
        if end >= 0:
            return Spans(start, end, end + len(self.END)), len(text)
        sendable = len(text)
        if not finished:
            for k in range(min(len(self.END) - 1, len(text)), 0, -1):
                if self.END.startswith(text[-k:]):
                    sendable = len(text) - k
                    break
        return Spans(start, len(text), len(text)), sendable

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A finished reply's (reasoning, content); None for an empty part."""
        s, _ = self.spans(text, finished=True)
        return text[s.start:s.end] or None, text[s.content:] or None


REASONING_PARSERS = {p.name: p for p in (DeepSeekR1ReasoningParser,)}


def get_reasoning_parser(name: str):
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {sorted(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]()


__all__ = ["REASONING_PARSERS", "DeepSeekR1ReasoningParser", "Spans", "get_reasoning_parser"]
