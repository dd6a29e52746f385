"""Structured outputs' host cost (CPU, no model): building the token trie of a vocabulary, and
the allowed-token mask of each new DFA state, which rank 0 computes the first time a pattern
reaches that state (later requests of the pattern reuse it).

The vocabulary is synthetic (seeded): --vocab random tokens of 1-10 characters drawn like
text and JSON (letters, digits, spaces, punctuation), plus the 256 single bytes, as a
byte-level BPE has them. Each pattern is walked along a sample JSON reply one single-byte
token at a time, which visits every state a tokenizer's longer tokens could stop in.

Then a step's masking of --batch rows' logits on --device (the sampler's cost per step).

    python3 -m benchmarks.guided_masks [--vocab 128000] [--device cuda]
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
    parser.add_argument("--batch", type=int, default=64, help="rows masked per step")
    parser.add_argument("--device", default="cpu", help="where the logits live (cpu or cuda)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    token_bytes = synthetic_vocab(args.vocab)
    vocab = Vocab(token_bytes)
    start = time.perf_counter()
    nodes = vocab.trie.num_nodes
    trie_s = time.perf_counter() - start
    single = {data[0]: tid for tid, data in enumerate(token_bytes) if len(data) == 1}
    rows, results = [], []
    for name, (pattern, reply) in CASES.items():
        start = time.perf_counter()
        cursor, out, states = GuidedCursor(TokenFSM(pattern, vocab)), [], set()
        for b in reply.encode():
            assert cursor.allowed(out, ()).to_bool()[single[b]]
            states.add(cursor.state)
            out.append(single[b])
        seconds = time.perf_counter() - start
        assert cursor.fsm.dfa.is_final(cursor.follow(out))
        results.append({"pattern": name, "states": len(states), "total_s": round(seconds, 3),
                        "per_state_ms": round(1000 * seconds / len(states), 1)})
        rows.append([name, len(states), round(seconds, 3), round(1000 * seconds / len(states), 1)])
    print(f"trie of {len(token_bytes)} tokens: {nodes} nodes in {trie_s:.2f} s")
    print_table(["pattern", "dfa_states", "total_s", "ms_per_state"], rows)
    apply = apply_ms(token_bytes, single, args.batch, args.device)
    print(f"masking {args.batch} rows' logits per step on {args.device}: {apply}")
    write_result("guided_masks", {"config": {"vocab": len(token_bytes), "batch": args.batch},
                                  "trie_s": round(trie_s, 3), "trie_nodes": nodes, "results": results,
                                  "apply_ms": apply}, args.out, device=args.device)


def apply_ms(token_bytes: list[bytes], single: dict, batch: int, device: str) -> dict:
    """Median time of one step's masking of `batch` rows, all inside a JSON string (the widest
    masks), on `device` logits: as the sampler does it (bits, unpacked on the device), and with
    each mask unpacked on the host and copied as bools (what it did before)."""
    import numpy as np
    import torch

    from driver.guided import set_vocab
    from driver.sampling_params import SamplingParams
    from workers.logits_processors import _keep_only, allowed_ids, apply_allowed_token_ids
    from workers.sampler import SamplingRow

    set_vocab(token_bytes)
    pattern = CASES["schema"][0]
    params = SamplingParams(guided_regex=pattern, structured_regex=pattern)
    rows = [SamplingRow(params, 0, [0] + [single[b] for b in b'{"name": "ab'], 1, (0,)) for _ in range(batch)]
    logits = torch.randn(batch, len(token_bytes), device=device)

    def unpacked_on_host():
        keep = torch.from_numpy(np.stack([allowed_ids(r).to_bool() for r in rows]))
        _keep_only(logits, list(range(batch)), keep.to(device))

    out = {}
    for name, fn in (("bits", lambda: apply_allowed_token_ids(logits, rows)), ("host_bools", unpacked_on_host)):
        times = []
        for _ in range(21):
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[name] = round(1000 * sorted(times)[len(times) // 2], 3)
    return out


if __name__ == "__main__":
    main()
