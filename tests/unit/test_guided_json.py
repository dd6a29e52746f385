"""driver/guided: JSON schemas as regexes (valid instances match, written compactly or with
spaces; invalid ones do not; unsupported schemas are refused by name), and the token level:
a state's allowed tokens are exactly those whose bytes keep the DFA alive (brute force over
the test tokenizer's vocabulary), stop ids join only where the output is a match."""
import json
import zlib

import numpy as np
import pytest
import torch

from driver.guided import GuidedCursor, TokenFSM, Vocab, token_bytes
from driver.guided.json_schema import SchemaError, free_json_regex, schema_to_regex
from driver.guided.regex import DEAD, DFA, MAX_CALL_DEPTH
from tests.checkpoints import fresh_tokenizer

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
                   "ok": {"type": ["boolean", "null"]}, "pet": {"$ref": "#/$defs/pet"},
                   "score": {"type": "number"}},
    "required": ["name", "age"],
    "$defs": {"pet": {"anyOf": [{"const": "none"}, {"type": "object", "properties": {"kind": {"type": "string"}},
                                                     "required": ["kind"]}]}},
}
GOOD = [{"name": "bo", "age": 3}, {"name": "", "age": -3, "ok": None}, {"name": "x\"é", "age": 0, "tags": ["a"]},
        {"name": "x", "age": 1, "tags": ["b", "a"], "ok": True, "pet": {"kind": "cat"}, "score": -1.5e3},
        {"name": "x", "age": 1, "pet": "none", "score": 2}]
BAD = [{"age": 3, "name": "bo"}, {"name": "bo"}, {"name": "bo", "age": 3.5}, {"name": "bo", "age": 3, "tags": []},
       {"name": "bo", "age": 3, "tags": ["a", "b", "a"]}, {"name": "012345678", "age": 1},
       {"name": "bo", "age": 1, "pet": {}}, {"name": "bo", "age": 1, "extra": 1}, {"name": "bo", "age": "1"}]


def _texts(value) -> list[str]:
    return [json.dumps(value, ensure_ascii=False, separators=sep) for sep in ((",", ":"), (", ", ": "))]


def test_schema_regex_accepts_exactly_the_valid_instances():
    dfa = DFA(schema_to_regex(PERSON))
    assert all(dfa.fullmatch(t) for v in GOOD for t in _texts(v))
    assert not any(dfa.fullmatch(t) for v in BAD for t in _texts(v))
    assert DFA(schema_to_regex(json.dumps({"type": "string", "pattern": "^[a-z]{2}$"}))).fullmatch('"ab"')


def _nested(levels: int) -> str:
    value: object = {"a": 1}
    for k in range(levels - 1):
        value = {"k": value} if k % 2 else [value, "x"]
    return json.dumps(value)


def test_free_json_nests_deeply():
    obj = DFA(free_json_regex())
    assert obj.fullmatch('{"a": {"b": [{"c": [1]}]}, "d": [true, "x", 1.5]}') and obj.fullmatch("{}")
    assert obj.fullmatch(_nested(31)) and not obj.fullmatch(_nested(33))  # two calls a level, 64 at most
    assert not obj.fullmatch("[1]") and not obj.fullmatch('{"a": [1}') and not obj.fullmatch('{"a": 1,}')
    assert DFA(schema_to_regex({"type": "object"})).fullmatch('{"k": [1, {"z": [[false]]}]}')


TREE = {"type": "object", "properties": {"value": {"type": "integer"},
                                         "children": {"type": "array", "items": {"$ref": "#/$defs/tree"}}},
        "required": ["value"], "$defs": {"tree": {"$ref": "#"}}}
LIST = {"$defs": {"node": {"type": "object", "properties": {"v": {"enum": ["a", "b"]},
                                                            "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                           "required": ["v", "next"]}},
        "$ref": "#/$defs/node"}


@pytest.mark.parametrize("schema, good, bad", [
    (TREE, [{"value": 1}, {"value": 1, "children": [{"value": 2, "children": [{"value": 3}]}, {"value": 4}]}],
     [{"value": 1, "children": [{}]}, {"value": 1, "children": [{"value": "2"}]}, {"children": []}]),
    (LIST, [{"v": "a", "next": None}, {"v": "a", "next": {"v": "b", "next": {"v": "a", "next": None}}}],
     [{"v": "a"}, {"v": "a", "next": {"v": "c", "next": None}}, {"v": "a", "next": {"v": "b"}}]),
])
def test_recursive_schemas(schema, good, bad):
    """A $ref that refers to itself, directly or through others: any depth (up to the call
    bound), and the same decisions as the `regex` module reading the pattern."""
    import regex

    pattern = schema_to_regex(schema)
    dfa, ref = DFA(pattern), regex.compile(pattern)
    for value, want in [(v, True) for v in good] + [(v, False) for v in bad]:
        for text in _texts(value):
            assert dfa.fullmatch(text) == want == (ref.fullmatch(text) is not None), text


@pytest.mark.parametrize("schema, why", [
    ({"type": "string", "format": "email", "contentEncoding": "x"}, "contentEncoding"),
    ({"$ref": "#/$defs/missing"}, "does not point"), ({"type": "object", "properties": {}, "required": ["x"]}, "required"),
    ({"type": "tuple"}, "'tuple'"), ({"type": "array", "minItems": 3, "maxItems": 1}, "less than minItems"), ({"allOf": [{}, {}]}, "allOf"), ("{not json", "not valid JSON"),
])
def test_unsupported_schemas_are_refused(schema, why):
    with pytest.raises(SchemaError, match=why):
        schema_to_regex(schema)


@pytest.fixture(scope="module")
def tokenizer():
    return fresh_tokenizer()


def test_token_bytes_spell_each_token(tokenizer):
    tb = token_bytes(tokenizer)
    assert all(tb[i] is None for i in tokenizer.all_special_ids)
    for tid, data in enumerate(tb):
        if data is not None and tokenizer.decode([tid]).strip():
            assert data.decode("utf-8", "replace").strip() == tokenizer.decode([tid]).strip()


def test_allowed_tokens_equal_brute_force(tokenizer):
    vocab = Vocab(token_bytes(tokenizer))
    fsm = TokenFSM(schema_to_regex(PERSON), vocab)
    state, text = 0, '{"name": "the cat", "age": 42, "tags": ["a"]}'
    for tid in tokenizer.encode(text, add_special_tokens=False):
        brute = [t for t, data in enumerate(vocab.token_bytes) if data and fsm.dfa.walk(state, data) != DEAD]
        assert np.flatnonzero(fsm.mask(state)).tolist() == brute and tid in brute
        state = fsm.advance(state, tid)
    assert fsm.dfa.is_final(state)  # the object is closed


@pytest.mark.parametrize("pattern", [schema_to_regex(PERSON), free_json_regex(), r"[a-c]+(\d{2,3}|é+)?"])
def test_allowed_tokens_equal_brute_force_on_random_vocabularies(pattern):
    """Random byte strings (shared prefixes, duplicates, non-ASCII bytes, specials as None), and
    every DFA state a random walk meets, in the lazily built DFA's order of discovery."""
    rng = np.random.default_rng(zlib.crc32(pattern.encode()))
    alphabet = list(b'{}[]":, abc-012.eE\\') + [0xC3, 0xA9, 0xFF]
    vocab_bytes = [bytes(rng.choice(alphabet, size=rng.integers(1, 7)).tolist()) for _ in range(3000)]
    vocab_bytes += [bytes([b]) for b in range(256)] + [None, None]
    vocab = Vocab(vocab_bytes)
    fsm, walked, seen = TokenFSM(pattern, vocab), 0, set()
    for _ in range(40):
        state = 0
        while state != DEAD and walked < 200:
            brute = [t for t, data in enumerate(vocab_bytes) if data and fsm.dfa.walk(state, data) != DEAD]
            assert np.flatnonzero(fsm.mask(state)).tolist() == brute
            walked, _ = walked + 1, seen.add(state)
            if not brute:
                break
            state = fsm.advance(state, int(rng.choice(brute)))
    assert walked == 200 and len(seen) >= 5  # (the walks met several states)


def test_cursor_allows_stop_ids_at_matches_only(tokenizer):
    vocab = Vocab(token_bytes(tokenizer))
    cursor = GuidedCursor(TokenFSM(r"(yes|no)[0-9]?", vocab))
    ids = tokenizer.encode("yes", add_special_tokens=False)
    assert not cursor.allowed([], (99,)).to_bool()[99]
    assert cursor.allowed(ids, (99,)).to_bool()[99] and not cursor.complete(ids)
    assert not cursor.fsm.mask(cursor.state)[99]  # (the cached state mask is left alone)
    done = ids + tokenizer.encode("7", add_special_tokens=False)
    assert cursor.complete(done) and np.flatnonzero(cursor.allowed(done, (99,)).to_bool()).tolist() == [99]
    assert cursor.allowed(done + done, (99,)) is None  # past the end: a token sampled in flight


def test_a_grammar_nested_to_the_bound_ends_the_output(tokenizer):
    """Past MAX_CALL_DEPTH no token leads on: the stop ids may end the output there (and with
    none, nothing is masked, rather than every token)."""
    vocab = Vocab(token_bytes(tokenizer))
    cursor = GuidedCursor(TokenFSM(r"(?(DEFINE)(?<x>\[(?&y)\])(?<y>(?&z))(?<z>(?&x)|a))(?&x)", vocab))
    bracket = vocab.token_bytes.index(b"[")
    out = [bracket]
    while cursor.allowed(out, ()) is not None:
        assert np.flatnonzero(cursor.allowed(out, (99,)).to_bool()).tolist() != [99]  # (not stuck yet)
        out.append(bracket)
        assert len(out) < MAX_CALL_DEPTH
    assert cursor.state != DEAD and np.flatnonzero(cursor.allowed(out, (99,)).to_bool()).tolist() == [99]


def test_bits_unpack_on_the_device_as_numpy_packs_them():
    from workers.logits_processors import unpack_bits

    rng = np.random.default_rng(0)
    masks = rng.random((3, 21)) < 0.5
    bits = torch.from_numpy(np.stack([np.packbits(m) for m in masks]))
    assert torch.equal(unpack_bits(bits, 21), torch.from_numpy(masks))
    wider = unpack_bits(bits, 30)  # a model vocabulary past the tokenizer's
    assert torch.equal(wider[:, :21], torch.from_numpy(masks)) and not wider[:, 21:].any()


def test_structured_outputs_params_map_onto_the_guided_fields():
    from driver import SamplingParams, StructuredOutputsParams

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)).guided_json == schema
    assert SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")).guided_regex == "a+"
    assert SamplingParams(structured_outputs=StructuredOutputsParams(choice=["x", "y"])).guided_choice == ("x", "y")
    grammar = 'root ::= "a"+'
    assert SamplingParams(structured_outputs=StructuredOutputsParams(grammar=grammar)).guided_grammar == grammar
    with pytest.raises(ValueError, match="at most one of"):
        SamplingParams(guided_regex="a", guided_grammar=grammar)
    assert SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True)).guided_json == \
        {"type": "object"}
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(guided_regex="b", structured_outputs=StructuredOutputsParams(regex="a"))
    with pytest.raises(ValueError, match="at most one of"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a", choice=["a"]))
