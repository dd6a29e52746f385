"""EBNF grammars in GBNF (llama.cpp's and xgrammar's form, which vLLM's guided_grammar takes)
-> a pattern of driver/guided/regex.py: each rule a named group in (?(DEFINE)...), each use of
a rule a call of it, and the pattern matches the rule `root`.

    root      ::= "SELECT " column " FROM " table
    column    ::= [a-z_]+ | "*"
    table     ::= "t" [0-9]{1,3}   # a comment

Rules: `name ::= alternatives`, names of letters, digits, '-' and '_'. Terms: "strings"
(escapes \\n \\t \\r \\" \\\\ \\xHH \\uHHHH), [classes] (ranges, ^, the same escapes), '.' (any
character), rule names, ( groups ), and the postfixes * + ? {m} {m,} {m,n}. A rule may call
itself, nested up to regex.MAX_CALL_DEPTH calls, but not before it matches a character: left
recursion (`a ::= a "x" | "y"`) is refused with its rewrite (`a ::= "y" "x"*`).
"""
from __future__ import annotations

import re

from driver.guided.regex import RegexError, parse

_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<define>::=)
  | (?P<name>[A-Za-z][A-Za-z0-9_-]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<klass>\[(?:[^\]\\]|\\.)*\])
  | (?P<count>\{\s*\d+\s*(?:,\s*\d*\s*)?\})
  | (?P<op>[|()*+?.])
""", re.VERBOSE | re.DOTALL)
_ESCAPES = {"n": "\\n", "t": "\\t", "r": "\\r", "\\": "\\\\", '"': '"'}


class GrammarError(ValueError):
    pass


def grammar_to_regex(text: str) -> str:
    """The pattern of a GBNF grammar (GrammarError, naming the place, if it is not one)."""
    tokens = _tokenize(text)
    heads = [i for i in range(len(tokens) - 1) if tokens[i][0] == "name" and tokens[i + 1][0] == "define"]
    if not heads or heads[0] != 0:
        raise GrammarError(f"grammar: expected 'name ::=' at {tokens[0][1] if tokens else 'the end'!r}")
    groups: dict[str, str] = {}  # rule name -> its group's name (rule names may hold '-')
    for i in heads:
        if tokens[i][1] in groups:
            raise GrammarError(f"grammar: rule {tokens[i][1]!r} is defined twice")
        groups[tokens[i][1]] = f"rule{len(groups)}"
    if "root" not in groups:
        raise GrammarError("grammar: there is no rule 'root' (the rule the output must match)")
    bodies = []
    for i, end in zip(heads, heads[1:] + [len(tokens)]):
        rule = _Rule(tokens[i + 2:end], groups)
        bodies.append(f"(?<{groups[tokens[i][1]]}>{rule.parse()})")
        if rule.undefined:
            raise GrammarError(f"grammar: rule {tokens[i][1]!r} uses undefined rules {sorted(rule.undefined)}")
    pattern = f"(?(DEFINE){''.join(bodies)})(?&{groups['root']})"
    try:
        parse(pattern)
    except RegexError as e:  # (named by the grammar's rules, not by their groups)
        names = {g: n for n, g in groups.items()}
        message = str(e).replace(f"regex {pattern!r}", "the grammar")
        message = re.sub(r"'(rule\d+)'", lambda m: repr(names.get(m[1], m[1])), message)
        raise GrammarError("grammar: " + message.replace("group", "rule")) from None
    return pattern


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, i = [], 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            raise GrammarError(f"grammar: cannot read {text[i:i + 20]!r}")
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
        i = m.end()
    return tokens


class _Rule:
    """One rule's alternatives, from its tokens (those after its 'name ::=')."""

    def __init__(self, tokens: list[tuple[str, str]], groups: dict[str, str]):
        self.tokens, self.groups, self.i = tokens, groups, 0
        self.undefined: set[str] = set()

    def parse(self) -> str:
        if not self.tokens:
            raise GrammarError("grammar: a rule is empty (write \"\" for the empty string)")
        body = self.alternatives()
        if self.more():
            raise GrammarError(f"grammar: unexpected {self.peek()[1]!r}")
        return body

    def more(self) -> bool:
        return self.i < len(self.tokens)

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i]

    def alternatives(self) -> str:
        options = [self.sequence()]
        while self.more() and self.peek()[1] == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"

    def sequence(self) -> str:
        items = []
        while self.more() and self.peek()[1] not in ("|", ")"):
            items.append(self.postfix(self.term()))
        return "".join(items)

    def postfix(self, term: str) -> str:
        while self.more() and (self.peek()[1] in ("*", "+", "?") or self.peek()[0] == "count"):
            term = f"(?:{term}){self.peek()[1].replace(' ', '')}"
            self.i += 1
        return term

    def term(self) -> str:
        kind, text = self.peek()
        self.i += 1
        if kind == "name":
            if text not in self.groups:
                self.undefined.add(text)
            return f"(?&{self.groups.get(text, 'undefined')})"
        if kind == "string":
            return _string(text[1:-1])
        if kind == "klass":
            return text
        if text == ".":
            return r"(?:.|\n)"
        if text == "(":
            inner = self.alternatives()
            if not self.more() or self.peek()[1] != ")":
                raise GrammarError("grammar: missing ')'")
            self.i += 1
            return f"(?:{inner})"
        raise GrammarError(f"grammar: unexpected {text!r}")


def _string(body: str) -> str:
    """A GBNF string's contents as a regex of exactly that text."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            n = {"x": 2, "u": 4}.get(nxt)
            if n is None:
                raise GrammarError(f"grammar: unknown escape \\{nxt} in a string")
            out.append(f"\\{nxt}{body[i + 2:i + 2 + n]}")
            i += 2 + n
            continue
        out.append(c if c.isalnum() or c == " " or ord(c) > 127 else "\\" + c)
        i += 1
    return "".join(out)


__all__ = ["GrammarError", "grammar_to_regex"]
