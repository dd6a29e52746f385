"""Structured outputs (vLLM's guided_regex / guided_json / response_format): the tokens a
sequence may sample next are those whose bytes keep its output inside a regular language.

A pattern compiles to a byte DFA (driver/guided/regex.py; JSON schemas become patterns in
driver/guided/json_schema.py). Over a vocabulary (each token's bytes), `TokenFSM.bits`
walks a trie of all tokens along the DFA once per DFA state and caches, as bits, the tokens
that survive. `GuidedCursor` follows one sequence: its DFA state after its output so far.

The driver (to end a sequence whose output is complete) and rank 0's sampler (to mask the
logits) each hold the vocabulary, set once per process with `set_vocab`, and compile a
pattern once per process (`fsm_for`).
"""
from __future__ import annotations

import functools
import json

import numpy as np

from driver.guided.regex import DEAD, DFA

_vocab: "Vocab | None" = None


class Vocab:
    """Each token id's bytes (None: a special token, which no pattern allows), as a trie."""

    def __init__(self, token_bytes: list[bytes | None]):
        self.size = len(token_bytes)
        self.token_bytes = token_bytes
        self._trie: tuple[list, list] | None = None

    @property
    def trie(self) -> tuple[list[dict[int, int]], list[list[int]]]:
        """(node -> {byte: child node}, node -> the token ids its path spells); root 0.
        Built on first use (a second or so for a 128k vocabulary)."""
        if self._trie is None:
            self._trie = self._build()
        return self._trie

    def _build(self) -> tuple[list, list]:
        children: list[dict[int, int]] = [{}]
        tokens: list[list[int]] = [[]]
        for tid, data in enumerate(self.token_bytes):
            if not data:
                continue
            node = 0
            for b in data:
                nxt = children[node].get(b)
                if nxt is None:
                    nxt = children[node][b] = len(children)
                    children.append({})
                    tokens.append([])
                node = nxt
            tokens[node].append(tid)
        return children, tokens


class TokenFSM:
    """A pattern's DFA over a vocabulary: per DFA state, the tokens that do not kill it (kept
    as bits: 16 KB per state for a 128k vocabulary)."""

    def __init__(self, pattern: str, vocab: Vocab):
        self.dfa, self.vocab = DFA(pattern), vocab
        self._bits: dict[int, np.ndarray] = {}

    def mask(self, state: int) -> np.ndarray:
        """[vocab size] bool: True for the tokens whose bytes lead from `state` to a live state."""
        return PackedMask(self.bits(state), self.vocab.size).to_bool()

    def bits(self, state: int) -> np.ndarray:
        """mask(state) packed (np.packbits: token t is bit 7 - t % 8 of byte t // 8); cached,
        so not to be written."""
        bits = self._bits.get(state)
        if bits is None:
            (children, tokens), transitions = self.vocab.trie, self.dfa.transitions
            out: list[int] = []
            stack = [(0, state)]
            while stack:
                node, s = stack.pop()
                row = transitions(s)
                for b, child in children[node].items():
                    nxt = row[b]
                    if nxt != DEAD:
                        out.extend(tokens[child])
                        if children[child]:
                            stack.append((child, nxt))
            mask = np.zeros(self.vocab.size, dtype=bool)
            mask[out] = True
            bits = self._bits[state] = np.packbits(mask)
        return bits

    def advance(self, state: int, token: int) -> int:
        data = self.vocab.token_bytes[token] if 0 <= token < self.vocab.size else None
        return self.dfa.walk(state, data) if data else DEAD


class GuidedCursor:
    """One sequence's DFA state after the first `pos` of its output tokens."""

    def __init__(self, fsm: TokenFSM):
        self.fsm, self.state, self.pos = fsm, 0, 0

    def follow(self, output: list[int]) -> int:
        """The DFA state after all of `output` (which extends what was followed before)."""
        for token in output[self.pos:]:
            if self.state == DEAD:
                break
            self.state = self.fsm.advance(self.state, token)
        self.pos = len(output)
        return self.state

    def complete(self, output: list[int]) -> bool:
        """The output is a whole match that nothing can extend."""
        return self.fsm.dfa.is_final(self.follow(output))

    def allowed(self, output: list[int], stop_ids: tuple[int, ...]) -> PackedMask | None:
        """The tokens that may come next (the stop ids too where the output may end), as bits;
        None past the end (a token sampled with the sequence already complete)."""
        state = self.follow(output)
        if state == DEAD:
            return None
        bits = self.fsm.bits(state)
        if self.fsm.dfa.accepting[state]:
            bits = bits.copy()
            for t in stop_ids:
                if t < self.fsm.vocab.size:
                    bits[t >> 3] |= 0x80 >> (t & 7)
        return PackedMask(bits, self.fsm.vocab.size)


class PackedMask:
    """A row's allowed tokens as np.packbits bits [ceil(size / 8)] uint8 (unpacked on the
    device, so a step copies 16 KB per row at 128k tokens)."""

    def __init__(self, bits: np.ndarray, size: int):
        self.bits, self.size = bits, size

    def to_bool(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=self.size).astype(bool)


def set_vocab(token_bytes: list[bytes | None] | None) -> None:
    global _vocab
    _vocab = Vocab(token_bytes) if token_bytes is not None else None
    fsm_for.cache_clear()


@functools.lru_cache(maxsize=64)
def fsm_for(pattern: str) -> TokenFSM:
    """The pattern compiled over this process's vocabulary (RegexError on a bad pattern)."""
    if _vocab is None:
        raise ValueError("structured outputs need the model's tokenizer, and this engine has none")
    return TokenFSM(pattern, _vocab)


def structured_regex(params) -> str:
    """The regex a request's completion must match (its guided_regex, or its guided_json as
    a regex), compiled now so that a bad one fails the request, not a step."""
    from driver.guided.json_schema import schema_to_regex

    pattern = params.guided_regex if params.guided_regex is not None else schema_to_regex(params.guided_json)
    fsm_for(pattern)
    return pattern


# ----------------------------------------------------------------------------- tokenizers

def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tokenizer) -> list[bytes | None]:
    """Each token id's bytes as the model emits them (None for special tokens), for
    byte-level BPE (GPT-2, Llama 3, Qwen2) and SentencePiece-style (Llama 2, Mistral) vocabularies."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") or {} if backend is not None else {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    inverse = _bytes_to_unicode()
    special = set(tokenizer.all_special_ids)
    size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    out: list[bytes | None] = [None] * size
    for token, tid in tokenizer.get_vocab().items():
        if tid in special:
            continue
        if byte_level:
            if all(c in inverse for c in token):
                out[tid] = bytes(inverse[c] for c in token)
            else:  # an added (non-special) token, stored as plain text
                out[tid] = token.encode()
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[tid] = bytes([int(token[3:5], 16)])  # SentencePiece's byte fallback
        else:
            out[tid] = token.replace("\u2581", " ").encode()
    return out


__all__ = ["GuidedCursor", "PackedMask", "TokenFSM", "Vocab", "fsm_for", "set_vocab", "structured_regex", "token_bytes"]
