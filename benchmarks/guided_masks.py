"""Structured outputs' host cost (CPU, no model): building the token trie of a vocabulary, and
the allowed-token mask of each new DFA state, which rank 0 computes the first time a pattern
reaches that state (later requests of the pattern reuse it).

The vocabulary is synthetic (seeded): --vocab random tokens of 1-10 characters drawn like
text and JSON (letters, digits, spaces, punctuation), plus the 256 single bytes, as a
byte-level BPE has them. Each pattern is walked along a sample JSON reply one single-byte
token at a time, which visits every state a tokenizer's longer tokens could stop in.

    python3 -m benchmarks.guided_masks [--vocab 128000]
"""
from __future__ import annotations

import argparse
import random
import string
import time

from benchmarks.common import print_table, write_result
from driver.guided import GuidedCursor, TokenFSM, Vocab
from driver.guided.json_schema import free_json_regex, schema_to_regex

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
CASES = {"schema": (schema_to_regex(SCHEMA), '{"name": "Alice Smith", "age": 42, "tags": ["x y", "zz"]}'),
         "json_object": (free_json_regex(), '{"a": {"b": [1, "two"]}, "c": null, "d": -1.5e3}')}


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + " " * 10 + ".,:;\"'{}[]()-_!?\n"
    tokens: set[str] = set()
    while len(tokens) < size:
        tokens.add("".join(rng.choice(chars) for _ in range(rng.choice([1, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 10]))))
    return [t.encode() for t in sorted(tokens)] + [bytes([b]) for b in range(256)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128000, help="synthetic tokens besides the 256 bytes")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    token_bytes = synthetic_vocab(args.vocab)
    vocab = Vocab(token_bytes)
    start = time.perf_counter()
    nodes = len(vocab.trie[0])
    trie_s = time.perf_counter() - start
    single = {data[0]: tid for tid, data in enumerate(token_bytes) if len(data) == 1}
    rows, results = [], []
    for name, (pattern, reply) in CASES.items():
        start = time.perf_counter()
        cursor, out, states = GuidedCursor(TokenFSM(pattern, vocab)), [], set()
        for b in reply.encode():
            assert cursor.allowed(out, ())[single[b]]
            states.add(cursor.state)
            out.append(single[b])
        seconds = time.perf_counter() - start
        assert cursor.fsm.dfa.is_final(cursor.follow(out))
        results.append({"pattern": name, "states": len(states), "total_s": round(seconds, 3),
                        "per_state_ms": round(1000 * seconds / len(states), 1)})
        rows.append([name, len(states), round(seconds, 3), round(1000 * seconds / len(states), 1)])
    print(f"trie of {len(token_bytes)} tokens: {nodes} nodes in {trie_s:.2f} s")
    print_table(["pattern", "dfa_states", "total_s", "ms_per_state"], rows)
    write_result("guided_masks", {"config": {"vocab": len(token_bytes)}, "trie_s": round(trie_s, 3),
                                  "trie_nodes": nodes, "results": results}, args.out, device="cpu")


if __name__ == "__main__":
    main()
