"""Regular expressions as byte-level DFAs, for structured outputs (vLLM's guided_regex).

A pattern always matches the whole output (anchors ^ and $ are accepted and ignored).
Supported: literals, escapes (\\d \\w \\s and their negations, \\n \\t \\xHH \\uHHHH, escaped
metacharacters), classes [a-z_] and [^...], '.', groups (...), (?:...), (?P<name>...),
alternation, and the quantifiers * + ? {m} {m,} {m,n} (lazy forms match the same); and
PCRE's subroutine calls, which make grammars: (?&name) or (?P>name) matches what the group
named `name` matches, which may call itself, with the definitions in (?(DEFINE)(?<name>...))
(as PCRE and the `regex` module read them; nesting is bounded at MAX_CALL_DEPTH calls).
Not supported: backreferences, lookaround, flags.

The automaton reads UTF-8 bytes, since tokens are byte strings that may split a character.
A literal non-ASCII character is its UTF-8 bytes; '.', negated classes and \\D \\W \\S also
match any non-ASCII character (a lead byte and its continuation bytes). \\d \\w \\s and
ranges are ASCII, and a negated class may not list non-ASCII characters.

Thompson's construction gives an NFA, where a call is an edge that pushes its return state
and jumps to the group's own fragment, whose end pops it. The DFA is built lazily by subset
construction over (call stack, NFA state) pairs, one state's 256 transitions at a time, the
first time a walk reaches it. DEAD (-1) is the state no continuation can leave.
"""
from __future__ import annotations

from driver.guided.regex_syntax import RegexError, parse

DEAD = -1
MAX_NFA_STATES = 200_000  # a pattern whose counted repeats would build more is refused
MAX_CALL_DEPTH = 64  # calls in progress at once (JSON nesting takes two per level)
# (call stack, NFA state) pairs one DFA state may hold: an ambiguous grammar's grow without
# end (x ::= "a" x x | "": a million after 15 bytes), and a step must not wait on one.
MAX_STATE_PAIRS = 20_000


# ----------------------------------------------------------------------------- automata

class _NFA:
    """Thompson NFA: per state, epsilon targets and (byte set, target) edges; and calls:
    calls[a] = (group, b) goes from a to b through one match of the group, whose fragment
    (each group built once, when first called) starts at starts[group] and ends in a state
    of `returns`."""

    def __init__(self, groups: dict | None = None):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[frozenset, int]]] = []
        self.groups = groups or {}
        self.calls: dict[int, tuple[str, int]] = {}
        self.starts: dict[str, int] = {}
        self.returns: set[int] = set()

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
        if kind == "call":
            a, b = self.state(), self.state()
            self.calls[a] = (node[1], b)
            if node[1] not in self.starts:
                self.starts[node[1]] = -1  # (being built: a call inside it needs no second copy)
                start, end = self.build(self.groups[node[1]])
                self.starts[node[1]] = start
                self.returns.add(end)
            return a, b
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
    """The lazily determinized automaton of a pattern: states are ints from 0 (the start),
    each a set of (call stack, NFA state) pairs, the stack a tuple of return states."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        node, groups = parse(pattern)
        self.nfa = _NFA(groups)
        start, self.accept = self.nfa.build(node)
        self._ids: dict[frozenset, int] = {}
        self._sets: list[frozenset] = []
        self._table: list[list[int] | None] = []  # per state, its 256 next states once built
        self.accepting: list[bool] = []
        first = self._closure({((), start)})
        if first is None:
            raise RegexError(f"the pattern is too ambiguous: its start holds more than {MAX_STATE_PAIRS} "
                             f"(call stack, state) pairs")
        self._add(first)

    def _closure(self, pairs) -> frozenset | None:
        """pairs and all they reach without a byte; None past MAX_STATE_PAIRS (the bytes that
        lead there are then DEAD: an output of a grammar that ambiguous is cut there)."""
        nfa = self.nfa
        seen, todo = set(pairs), list(pairs)
        while todo:
            if len(seen) > MAX_STATE_PAIRS:
                return None
            stack, q = todo.pop()
            nxt = [(stack, t) for t in nfa.eps[q]]
            if q in nfa.calls and len(stack) < MAX_CALL_DEPTH:  # (deeper: that path dies)
                group, back = nfa.calls[q]
                nxt.append((stack + (back,), nfa.starts[group]))
            if q in nfa.returns and stack:
                nxt.append((stack[:-1], stack[-1]))
            for pair in nxt:
                if pair not in seen:
                    seen.add(pair)
                    todo.append(pair)
        return frozenset(seen)

    def _add(self, pairs: frozenset) -> int:
        sid = self._ids.get(pairs)
        if sid is None:
            sid = self._ids[pairs] = len(self._sets)
            self._sets.append(pairs)
            self._table.append(None)
            self.accepting.append(((), self.accept) in pairs)
        return sid

    def transitions(self, state: int) -> list[int]:
        """state's next state per byte (DEAD where none)."""
        row = self._table[state]
        if row is None:
            moves: dict[int, set] = {}
            edges = self.nfa.edges
            for stack, q in self._sets[state]:
                for byteset, target in edges[q]:
                    for b in byteset:
                        moves.setdefault(b, set()).add((stack, target))
            row, targets = [DEAD] * 256, {}
            for b, pairs in moves.items():
                key = frozenset(pairs)
                if key not in targets:
                    closure = self._closure(pairs)
                    targets[key] = DEAD if closure is None else self._add(closure)
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


__all__ = ["DFA", "DEAD", "MAX_CALL_DEPTH", "RegexError", "parse"]
