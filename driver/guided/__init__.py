"""Structured outputs (vLLM's guided_regex / guided_json / response_format): the tokens a
sequence may sample next are those whose bytes keep its output inside a regular language.

A pattern compiles to a byte DFA (driver/guided/regex.py; JSON schemas become patterns in
driver/guided/json_schema.py). Over a vocabulary (each token's bytes), `TokenFSM.bits`
walks a trie of all tokens along the DFA once per DFA state (a depth of the trie at a time,
in numpy) and caches, as bits, the tokens that survive. `GuidedCursor` follows one
sequence: its DFA state after its output so far.

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
UNBUILT = -2  # in TokenFSM's table: a state whose row the DFA has not built yet


class Vocab:
    """Each token id's bytes (None: a special token, which no pattern allows), and the trie
    of them, flattened breadth first for numpy: node 0 is the root, each depth's nodes are
    contiguous, and every node's parent has a smaller id."""

    def __init__(self, token_bytes: list[bytes | None]):
        self.size = len(token_bytes)
        self.token_bytes = token_bytes
        self._trie: Trie | None = None

    @property
    def trie(self) -> "Trie":
        """Built on first use (half a second or so for a 128k vocabulary)."""
        if self._trie is None:
            self._trie = Trie(self.token_bytes)
        return self._trie


class Trie:
    """parent[node], byte[node] (the byte from parent to node), depths[d] = (first, end) of
    depth d + 1's nodes, token_node[token id] (-1 for None tokens)."""

    def __init__(self, token_bytes: list[bytes | None]):
        ids: dict[bytes, int] = {b"": 0}
        parent, byte, self.depths = [0], [0], []
        longest_first = sorted((t for t in token_bytes if t), key=len, reverse=True)
        depth, reach = 1, len(longest_first)  # longest_first[:reach]: the tokens >= depth bytes long
        while reach:
            level = sorted({t[:depth] for t in longest_first[:reach]})
            self.depths.append((len(parent), len(parent) + len(level)))
            for prefix in level:
                ids[prefix] = len(parent)
                parent.append(ids[prefix[:-1]])
                byte.append(prefix[-1])
            depth += 1
            while reach and len(longest_first[reach - 1]) < depth:
                reach -= 1
        self.parent, self.byte = np.array(parent, np.int64), np.array(byte, np.uint8)
        self.token_node = np.array([ids[t] if t else -1 for t in token_bytes], np.int64)
        self.num_nodes = len(parent)


class TokenFSM:
    """A pattern's DFA over a vocabulary: per DFA state, the tokens that do not kill it (kept
    as bits: 16 KB per state for a 128k vocabulary)."""

    def __init__(self, pattern: str, vocab: Vocab):
        self.dfa, self.vocab = DFA(pattern), vocab
        self._bits: dict[int, np.ndarray] = {}
        # The DFA's transitions as an array, a row per state once the DFA built it (UNBUILT
        # until then); row -1, which DEAD indexes, is all DEAD, so dead stays dead.
        self._table = np.full((1, 256), DEAD, np.int32)

    def mask(self, state: int) -> np.ndarray:
        """[vocab size] bool: True for the tokens whose bytes lead from `state` to a live state."""
        return PackedMask(self.bits(state), self.vocab.size).to_bool()

    def bits(self, state: int) -> np.ndarray:
        """mask(state) packed (np.packbits: token t is bit 7 - t % 8 of byte t // 8); cached,
        so not to be written."""
        bits = self._bits.get(state)
        if bits is None:
            trie = self.vocab.trie
            node_state = np.empty(trie.num_nodes, np.int32)  # each trie node's DFA state from `state`
            node_state[0] = state
            for first, end in trie.depths:  # a depth at a time: parents are done first
                from_states, by = node_state[trie.parent[first:end]], trie.byte[first:end]
                node_state[first:end] = self._step(from_states, by)
            live = node_state[trie.token_node] != DEAD
            live[trie.token_node < 0] = False
            bits = self._bits[state] = np.packbits(live)
        return bits

    def _step(self, states: np.ndarray, by: np.ndarray) -> np.ndarray:
        """The next state of each (state, byte) pair, building the rows the DFA lacks."""
        self._grow()
        nxt = self._table[states, by]
        unbuilt = nxt == UNBUILT
        if unbuilt.any():
            for s in np.unique(states[unbuilt]).tolist():
                row = self.dfa.transitions(s)
                self._grow()  # (the row may name new states)
                self._table[s] = row
            nxt[unbuilt] = self._table[states[unbuilt], by[unbuilt]]
        return nxt

    def _grow(self) -> None:
        """Rows for every state the DFA has, plus the DEAD row last."""
        have, need = len(self._table) - 1, len(self.dfa.accepting)
        if need > have:
            table = np.full((max(need, 2 * have) + 1, 256), UNBUILT, np.int32)
            table[:have], table[-1] = self._table[:have], DEAD
            self._table = table

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
        # Stuck: alive, but no token leads on (a grammar nested to MAX_CALL_DEPTH): the output
        # ends there, or, with no stop id to end it, goes on unconstrained.
        stuck = not bits.any()
        if self.fsm.dfa.accepting[state] or stuck:
            bits = bits.copy()
            for t in stop_ids:
                if t < self.fsm.vocab.size:
                    bits[t >> 3] |= 0x80 >> (t & 7)
            if stuck and not bits.any():
                return None
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
    """The regex a request's completion must match (its guided_regex, or its guided_json or
    guided_grammar as a regex), compiled now so that a bad one fails the request, not a step."""
    from driver.guided.grammar import grammar_to_regex
    from driver.guided.json_schema import schema_to_regex

    if params.guided_regex is not None:
        pattern = params.guided_regex
    elif params.guided_grammar is not None:
        pattern = grammar_to_regex(params.guided_grammar)
    else:
        pattern = schema_to_regex(params.guided_json)
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
