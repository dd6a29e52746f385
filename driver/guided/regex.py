"""Regular expressions as byte-level DFAs, for structured outputs (vLLM's guided_regex).

A pattern always matches the whole output (anchors ^ and $ are accepted and ignored).
Supported: literals, escapes (\\d \\w \\s and their negations, \\n \\t \\xHH \\uHHHH, escaped
metacharacters), classes [a-z_] and [^...], '.', groups (...), (?:...), (?P<name>...),
alternation, and the quantifiers * + ? {m} {m,} {m,n} (lazy forms match the same).
Not supported: backreferences, lookaround, flags.

The automaton reads UTF-8 bytes, since tokens are byte strings that may split a character.
A literal non-ASCII character is its UTF-8 bytes; '.', negated classes and \\D \\W \\S also
match any non-ASCII character (a lead byte and its continuation bytes). \\d \\w \\s and
ranges are ASCII, and a negated class may not list non-ASCII characters.

Thompson's construction gives an NFA; its DFA is built lazily by subset construction, one
state's 256 transitions at a time, the first time a walk reaches it. DEAD (-1) is the
state no continuation can leave.
"""
from __future__ import annotations

ASCII = frozenset(range(128))
DEAD = -1
MAX_NFA_STATES = 200_000  # a pattern whose counted repeats would build more is refused

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


# ----------------------------------------------------------------------------- parsing
# AST: ("set", frozenset of bytes) | ("cat", [nodes]) | ("alt", [nodes]) | ("rep", node, lo, hi|None)

def _literal(ch: str):
    data = ch.encode()
    return ("set", frozenset(data)) if len(data) == 1 else ("cat", [("set", frozenset([b])) for b in data])


class _Parser:
    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

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
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i):
                self.i = self.p.index(">", self.i) + 1
            elif self.peek() == "?":
                raise self.error("lookaround, flags and backreferences are not supported")
            node = self.alt()
            if self.take() != ")":
                raise self.error("missing ')'")
            return node
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


def parse(pattern: str):
    return _Parser(pattern).parse()


# ----------------------------------------------------------------------------- automata

class _NFA:
    """Thompson NFA: per state, epsilon targets and (byte set, target) edges."""

    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[frozenset, int]]] = []

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise RegexError(f"the pattern is too large (more than {MAX_NFA_STATES} automaton states); "
                             f"lower its repeat counts")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node) -> tuple[int, int]:
        """(start, end) of a fragment for node; fresh states on every call."""
        kind = node[0]
        if kind == "set":
            a, b = self.state(), self.state()
            self.edges[a].append((node[1], b))
            return a, b
        if kind == "cat":
            start = end = self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[end].append(s)
                end = e
            return start, end
        if kind == "alt":
            start, end = self.state(), self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        _, child, lo, hi = node
        start = end = self.state()
        for _ in range(lo):  # the required copies
            s, e = self.build(child)
            self.eps[end].append(s)
            end = e
        if hi is None:  # then a loop
            s, e = self.build(child)
            self.eps[end].append(s)
            self.eps[e].append(s)
            loop_end = self.state()
            self.eps[end].append(loop_end)
            self.eps[e].append(loop_end)
            return start, loop_end
        final = self.state()
        for _ in range(hi - lo):  # each optional copy may end the repeat
            self.eps[end].append(final)
            s, e = self.build(child)
            self.eps[end].append(s)
            end = e
        self.eps[end].append(final)
        return start, final


class DFA:
    """The lazily determinized automaton of a pattern: states are ints from 0 (the start)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.nfa = _NFA()
        start, self.accept = self.nfa.build(parse(pattern))
        self._ids: dict[frozenset, int] = {}
        self._sets: list[frozenset] = []
        self._table: list[list[int] | None] = []  # per state, its 256 next states once built
        self.accepting: list[bool] = []
        self._add(self._closure({start}))

    def _closure(self, states) -> frozenset:
        seen, stack = set(states), list(states)
        while stack:
            for t in self.nfa.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    def _add(self, nfa_states: frozenset) -> int:
        sid = self._ids.get(nfa_states)
        if sid is None:
            sid = self._ids[nfa_states] = len(self._sets)
            self._sets.append(nfa_states)
            self._table.append(None)
            self.accepting.append(self.accept in nfa_states)
        return sid

    def transitions(self, state: int) -> list[int]:
        """state's next state per byte (DEAD where none)."""
        row = self._table[state]
        if row is None:
            moves: dict[int, set] = {}
            for s in self._sets[state]:
                for byteset, target in self.nfa.edges[s]:
                    for b in byteset:
                        moves.setdefault(b, set()).add(target)
            row, targets = [DEAD] * 256, {}
            for b, ts in moves.items():
                key = frozenset(ts)
                if key not in targets:
                    targets[key] = self._add(self._closure(ts))
                row[b] = targets[key]
            self._table[state] = row
        return row

    def walk(self, state: int, data: bytes) -> int:
        for b in data:
            if state == DEAD:
                break
            state = self.transitions(state)[b]
        return state

    def is_final(self, state: int) -> bool:
        """Accepting, and no byte can follow: the output is complete."""
        return state != DEAD and self.accepting[state] and all(t == DEAD for t in self.transitions(state))

    def fullmatch(self, text: str) -> bool:
        state = self.walk(0, text.encode())
        return state != DEAD and self.accepting[state]


__all__ = ["DFA", "DEAD", "RegexError", "parse"]
