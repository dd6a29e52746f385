"""The regex syntax structured outputs read (driver/guided/regex.py has the automata): a
pattern's AST, and the checks a grammar of named groups needs (that its calls can end, and
that none can call itself before matching a byte).

AST: ("set", frozenset of bytes) | ("cat", [nodes]) | ("alt", [nodes]) | ("rep", node, lo, hi|None)
   | ("call", group name). Non-ASCII characters are their UTF-8 bytes.
"""
from __future__ import annotations

ASCII = frozenset(range(128))

_CONT = ("set", frozenset(range(0x80, 0xC0)))
# Any non-ASCII character in UTF-8: a lead byte, then its 1-3 continuation bytes.
NON_ASCII = ("alt", [("cat", [("set", frozenset(range(0xC2, 0xE0))), _CONT]),
                     ("cat", [("set", frozenset(range(0xE0, 0xF0))), _CONT, _CONT]),
                     ("cat", [("set", frozenset(range(0xF0, 0xF5))), _CONT, _CONT, _CONT])])
_CLASSES = {"d": frozenset(range(48, 58)),
            "w": frozenset(b for b in ASCII if chr(b).isalnum() or b == ord("_")),
            "s": frozenset(b" \t\n\r\f\v")}
_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


class RegexError(ValueError):
    pass


def _literal(ch: str):
    data = ch.encode()
    return ("set", frozenset(data)) if len(data) == 1 else ("cat", [("set", frozenset([b])) for b in data])


class _Parser:
    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0
        self.groups: dict[str, object] = {}  # named group -> its AST (what calls to it match)
        self.called: list[str] = []

    def error(self, msg: str) -> RegexError:
        return RegexError(f"regex {self.p!r} at {self.i}: {msg}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        if self.i >= len(self.p):
            raise self.error("unexpected end")
        self.i += 1
        return self.p[self.i - 1]

    def parse(self):
        node = self.alt()
        if self.i != len(self.p):
            raise self.error("unbalanced ')'")
        if missing := sorted(set(self.called) - set(self.groups)):
            raise RegexError(f"regex {self.p!r}: calls to undefined groups {missing}")
        if not _can_match(node, _groups_that_can(self.groups, empty=False), empty=False):
            raise RegexError(f"regex {self.p!r} matches nothing: its calls never end (each match "
                             f"of a group it needs calls the group again)")
        if loop := _left_recursion(self.groups):
            raise RegexError(f"group {loop!r} may call itself before matching anything (left recursion); "
                             f"write `a ::= a x | y` as `a ::= y x*`")
        return node

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.repeat())
        return ("cat", [n for n in items if n is not None])

    def repeat(self):
        node = self.atom()
        while self.peek() in ("*", "+", "?", "{"):
            c = self.peek()
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}.get(c) or self.counts()
            if c != "{":
                self.i += 1
            if node is None:
                raise self.error("nothing to repeat")
            node = ("rep", node, *bounds)
            if self.peek() in ("?", "+"):  # lazy / possessive: the same language
                self.i += 1
        return node

    def counts(self) -> tuple[int, int | None]:
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1:end] if end > 0 else ""
        lo, _, hi = body.partition(",")
        try:
            bounds = (int(lo), None if "," in body and not hi.strip() else int(hi if "," in body else lo))
        except ValueError:
            raise self.error("a '{' must be a count {m}, {m,} or {m,n}") from None
        if bounds[1] is not None and bounds[1] < bounds[0]:
            raise self.error(f"bad count {{{body}}}")
        self.i = end + 1
        return bounds

    def atom(self):
        c = self.take()
        if c == "(":
            return self.group()
        if c == "[":
            return self.klass()
        if c == ".":
            return ("alt", [("set", ASCII - {10}), NON_ASCII])
        if c in "^$":
            return None  # the whole output always matches
        if c == "\\":
            return self.escape(in_class=False)
        if c in "*+?{":
            raise self.error(f"nothing to repeat before {c!r}")
        return _literal(c)

    def group(self):
        name, define = None, False
        if self.p.startswith(("?&", "?P>"), self.i):  # a call
            self.i += 2 if self.p[self.i + 1] == "&" else 3
            name = self.name(")")
            self.called.append(name)
            return ("call", name)
        if self.p.startswith("?:", self.i):
            self.i += 2
        elif self.p.startswith(("?P<", "?<"), self.i) and self.p[self.i + 2:self.i + 3] not in ("=", "!"):
            self.i += 3 if self.p[self.i + 1] == "P" else 2
            name = self.name(">")
        elif self.p.startswith("?(DEFINE)", self.i):  # definitions only: matches the empty string
            self.i += 9
            define = True
        elif self.peek() == "?":
            raise self.error("lookaround, flags and backreferences are not supported")
        node = self.alt()
        if self.take() != ")":
            raise self.error("missing ')'")
        if name is not None:
            if name in self.groups:
                raise self.error(f"group name {name!r} defined twice")
            self.groups[name] = node
        return None if define else node

    def name(self, end: str) -> str:
        stop = self.p.find(end, self.i)
        name = self.p[self.i:stop] if stop >= 0 else ""
        if not name.isidentifier():
            raise self.error(f"a group name must be a word, ending in {end!r}")
        self.i = stop + 1
        return name

    def escape(self, in_class: bool):
        c = self.take()
        if c.lower() in _CLASSES:
            s = _CLASSES[c.lower()]
            return ("set", s) if c.islower() else ("alt", [("set", ASCII - s), NON_ASCII])
        if c in _SIMPLE:
            return _literal(_SIMPLE[c])
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.p[self.i:self.i + n]
            self.i += n
            try:
                return _literal(chr(int(digits, 16)))
            except ValueError:
                raise self.error(f"bad \\{c} escape") from None
        if c.isalnum() and not in_class:
            raise self.error(f"unsupported escape \\{c}")
        return _literal(c)

    def klass(self):
        negate = self.peek() == "^"
        self.i += negate
        members: set[int] = set()  # the ASCII bytes listed
        wide: list = []  # non-ASCII characters listed, as their byte sequences
        any_wide = False  # \\D, \\W or \\S listed: every non-ASCII character
        first = True
        while first or self.peek() != "]":
            first = False
            node = self.class_item()
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_item()
                if node[0] != "set" or hi[0] != "set" or min(node[1]) > min(hi[1]):
                    raise self.error("a range must join two ASCII characters in order")
                members.update(range(min(node[1]), min(hi[1]) + 1))
            elif node[0] == "set":
                members.update(node[1])
            elif node[0] == "alt" and node[1][-1] is NON_ASCII:
                members.update(node[1][0][1])
                any_wide = True
            else:
                wide.append(node)
        self.i += 1
        if negate:
            if wide:
                raise self.error("non-ASCII characters in a negated class are not supported")
            rest = ("set", ASCII - members)
            return rest if any_wide else ("alt", [rest, NON_ASCII])
        return ("alt", [("set", frozenset(members)), *([NON_ASCII] if any_wide else wide)])

    def class_item(self):
        c = self.take()
        return self.escape(in_class=True) if c == "\\" else _literal(c)


def _can_match(node, groups_that_can: set[str], empty: bool) -> bool:
    """Whether node matches some string (empty: the empty string), given the groups known to."""
    kind = node[0]
    if kind == "set":
        return not empty and bool(node[1])
    if kind == "call":
        return node[1] in groups_that_can
    if kind == "rep":
        return node[2] == 0 or _can_match(node[1], groups_that_can, empty)
    found = [_can_match(child, groups_that_can, empty) for child in node[1]]
    return all(found) if kind == "cat" else any(found)


def _groups_that_can(groups: dict, empty: bool) -> set[str]:
    """The groups that match some string (empty: the empty string): a fixed point, as for a
    grammar's productive (nullable) rules."""
    known: set[str] = set()
    while more := {n for n, node in groups.items() if n not in known and _can_match(node, known, empty)}:
        known |= more
    return known


def _first_calls(node, nullable: set[str]) -> set[str]:
    """The groups node may call before it matches any byte."""
    kind = node[0]
    if kind == "set":
        return set()
    if kind == "call":
        return {node[1]}
    if kind == "rep":
        return _first_calls(node[1], nullable)
    calls: set[str] = set()
    for child in node[1]:
        calls |= _first_calls(child, nullable)
        if kind == "cat" and not _can_match(child, nullable, empty=True):
            break
    return calls


def _left_recursion(groups: dict) -> str | None:
    """A group that may call itself before matching a byte (its closure would push calls
    without end), or None."""
    nullable = _groups_that_can(groups, empty=True)
    first = {name: _first_calls(node, nullable) for name, node in groups.items()}
    for name in groups:
        seen, todo = set(), list(first[name])
        while todo:
            callee = todo.pop()
            if callee == name:
                return name
            if callee not in seen:
                seen.add(callee)
                todo.extend(first.get(callee, ()))
    return None


def parse(pattern: str):
    """(the pattern's AST, its named groups' ASTs)."""
    parser = _Parser(pattern)
    node = parser.parse()
    return node, parser.groups


__all__ = ["ASCII", "NON_ASCII", "RegexError", "parse"]
