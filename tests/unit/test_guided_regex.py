"""driver/guided/regex.py: the byte DFA of a pattern accepts exactly the strings Python's re
(ASCII mode, DOTALL off) fully matches, on random strings over an alphabet that includes the
pattern's characters, multi-byte UTF-8 characters and newlines; unsupported syntax is refused
with a reason. Patterns with PCRE's subroutine calls are decided by the `regex` module."""
import random
import re

import pytest
import regex

from driver.guided.regex import DEAD, DFA, MAX_CALL_DEPTH, MAX_STATE_PAIRS, RegexError

# (pattern, strings it must match): each also meets random strings, which re decides.
PATTERNS = [
    (r"[a-z]+@[a-z]+\.com", ["ab@cd.com"]), (r"(ab|cd)*e?", ["", "abcde"]), (r"\d{3}-\d{2,4}", ["123-45"]),
    (r'"(?:[^"\\]|\\.)*"', ['"a\\"é"']), (r"x{0,3}y", ["xxy"]), (r"x{2,}", ["xxxx"]),
    (r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?", ["-10.5"]), (r"[^a-c]+", ["xé!"]), (r"a.b", ["aéb", "a b"]),
    (r"\w+\s\W", ["ab_1 é"]), (r"^(?P<n>foo)|bar$", ["foo", "bar"]), (r"[\W\d]{2}", ["1é"]),
    (r"[éa-c]x", ["éx", "bx"]), (r"[^\S]", ["\n"]), (r"caf[é]{1,2}", ["caféé"]), (r"a+?b*?", ["aab"]),
    (r"\x41\u00e9", ["Aé"]), (r"(?:é|ü)+.", ["éüé\t"]), (r"[-a]\]|\.\*", ["-]", ".*"]), (r"", [""]),
]
ALPHABET = 'abcdefoxyz0123456789-.@"\\ _!*]éüA\n'


@pytest.mark.parametrize("pattern, examples", PATTERNS)
def test_dfa_equals_python_re(pattern, examples):
    dfa, ref = DFA(pattern), re.compile(pattern, re.ASCII)
    rng = random.Random(pattern)
    own = [c for c in pattern if c.isprintable()] or ["a"]
    texts = examples + ["".join(rng.choice(own if k % 2 else ALPHABET) for _ in range(rng.randint(0, 7)))
                        for k in range(3000)]
    for text in texts:
        want = ref.fullmatch(text) is not None
        assert dfa.fullmatch(text) == want, (pattern, text, want)
    assert all(dfa.fullmatch(t) for t in examples)


# Grammars through PCRE's subroutine calls, decided by the `regex` module (which reads them as PCRE).
RECURSIVE = [
    (r"(?(DEFINE)(?<v>a|\[(?&v)(?:,(?&v))*\]))(?&v)", ["[a,[a,[a]]]"]),
    (r"(?<p>\((?&p)*\))+", ["(()())()"]),
    (r"(?(DEFINE)(?<e>(?&t)(?:[+-](?&t))*)(?<t>[0-9]+|\((?&e)\)))(?&e)", ["1+(2-(3))"]),
    (r"(?P<x>a(?P>x)?b)c", ["aabbc"]),
]


@pytest.mark.parametrize("pattern, examples", RECURSIVE)
def test_calls_equal_the_regex_module(pattern, examples):
    dfa, ref = DFA(pattern), regex.compile(pattern, regex.ASCII)
    rng = random.Random(pattern)
    own = sorted({c for c in pattern if c in "ab()[],+-0123c"})
    texts = examples + ["".join(rng.choice(own) for _ in range(rng.randint(0, 10))) for _ in range(3000)]
    for text in texts:
        assert dfa.fullmatch(text) == (ref.fullmatch(text) is not None), (pattern, text)
    assert all(dfa.fullmatch(t) for t in examples)


def test_calls_nest_up_to_the_bound():
    dfa = DFA(r"(?(DEFINE)(?<v>a|\[(?&v)\]))(?&v)")
    assert dfa.fullmatch("[" * 60 + "a" + "]" * 60)
    assert not dfa.fullmatch("[" * MAX_CALL_DEPTH + "a" + "]" * MAX_CALL_DEPTH)


def test_an_ambiguous_grammar_is_cut_not_waited_on():
    """x ::= "a" x x | "" has ever more ways to read each "a" (a million after 15): past
    MAX_STATE_PAIRS a state's bytes lead nowhere, so a step never waits long on one."""
    dfa = DFA(r"(?(DEFINE)(?<x>a(?&x)(?&x)|))(?&x)")
    assert dfa.fullmatch("aaa") and not dfa.fullmatch("a" * 40)  # (cut: the `regex` module matches it)
    assert all(len(pairs) <= MAX_STATE_PAIRS for pairs in dfa._sets)


def test_walks_bytes_and_ends():
    dfa = DFA(r"(yes|no)!")
    state = dfa.walk(0, b"ye")
    assert state != DEAD and not dfa.accepting[state]
    assert dfa.walk(state, b"x") == DEAD
    done = dfa.walk(state, b"s!")
    assert dfa.accepting[done] and dfa.is_final(done)
    digits = DFA(r"[0-9]+")
    assert not digits.is_final(digits.walk(0, b"12"))  # a match, but more digits may follow
    e = DFA("é")
    split = e.walk(0, "é".encode()[:1])  # a token may end inside a character
    assert split != DEAD and e.is_final(e.walk(split, "é".encode()[1:]))


@pytest.mark.parametrize("pattern, why", [
    ("(?=a)b", "lookaround"), (r"(a)\1", "unsupported escape"), ("a{3,1}", "bad count"), ("*a", "nothing to repeat"),
    ("(ab", "unexpected end"), ("ab)", "unbalanced"), ("[^é]", "negated class"), ("[é-ü]", "range"), ("a{x}", "count"),
    ("a{0,100000}", "too large"), ("(?&v)", "undefined groups"), ("(?<v>a)(?<v>b)", "defined twice"),
    ("(?&1)", "group name"), (r"(?(DEFINE)(?<x>a(?&x)))b(?&x)", "matches nothing"),
])
def test_refuses_what_it_cannot_do(pattern, why):
    with pytest.raises(RegexError, match=why):
        DFA(pattern)
