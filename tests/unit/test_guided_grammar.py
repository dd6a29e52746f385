"""driver/guided/grammar.py: a GBNF grammar's pattern accepts exactly what the grammar allows:
the byte DFA agrees with the `regex` module reading the same pattern on random strings and
on strings generated from the grammar; bad grammars are refused, naming the rule."""
import random

import pytest
import regex

from driver.guided.grammar import GrammarError, grammar_to_regex
from driver.guided.regex import DFA

SQL = """
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"""
ARITH = """
# right-recursive arithmetic, with a comment
root      ::= expr
expr      ::= term ([+*-] term)*
term      ::= num | "(" expr ")" | "-" term
num       ::= [0-9]{1,3} ("." [0-9]+)?
"""
LISTS = r"""
root ::= "[" ws ( value ("," ws value)* )? ws "]"
value ::= string | root | "null"
string ::= "\"" ( [^"\\] | "\\" ["\\n] )* "\""
ws ::= [ \t\n]?
"""
DASHED = 'root ::= greet-word " " name\ngreet-word ::= "hi" | "hé"\nname ::= [A-Z] [a-z]* .'


def _generate(rng: random.Random, grammar: str, depth: int = 0) -> str:
    """A random string of ARITH's language (for the strings random letters rarely hit)."""
    if depth > 4 or rng.random() < 0.5:
        return str(rng.randint(0, 999)) + (f".{rng.randint(0, 99)}" if rng.random() < 0.3 else "")
    if rng.random() < 0.5:
        return "(" + _generate(rng, grammar, depth + 1) + rng.choice("+*-") + _generate(rng, grammar, depth + 1) + ")"
    return "-" + _generate(rng, grammar, depth + 1)


@pytest.mark.parametrize("grammar, good, alphabet", [
    (SQL, ["SELECT col_1  from table_2  where col_2 = 1 "], "SELECTcol_12 fromtablewhere="),
    (ARITH, ["1+2*3", "(1.5-(2))*-3", "-(-(4))"], "0123456789.+-*()"),
    (LISTS, ['[]', '["a", [null, ["x\\"y"]]]', '[\n"é"]'], '[]",\\n ul\t\nxé'),
    (DASHED, ["hi Bob!", "hé Zé"], "hié BobZ!"),
])
def test_grammar_equals_the_regex_module(grammar, good, alphabet):
    pattern = grammar_to_regex(grammar)
    dfa, ref = DFA(pattern), regex.compile(pattern)
    rng = random.Random(grammar)
    texts = good + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(2000)]
    if grammar is ARITH:
        texts += [_generate(rng, grammar) for _ in range(300)]
    for text in texts:
        assert dfa.fullmatch(text) == (ref.fullmatch(text) is not None), (text, pattern)
    assert all(dfa.fullmatch(t) for t in good)
    if grammar is ARITH:
        assert sum(dfa.fullmatch(t) for t in texts) > 300


@pytest.mark.parametrize("grammar, why", [
    ("expr ::= [0-9]", "no rule 'root'"),
    ("root ::= item\nitem ::= item \"+\" | \"1\"", "rule 'item' may call itself before matching anything"),
    ("root ::= \"(\" root \")\"", "matches nothing"),
    ("root ::= thing", "undefined rules ['thing']"),
    ("root ::= \"a\"\nroot ::= \"b\"", "defined twice"),
    ("root ::= (\"a\"", "missing ')'"),
    ("root ::= \"a\" )", "unexpected ')'"),
    ("root ::= \"\\q\"", "unknown escape"),
    ("root ::= \"a\" @", "cannot read '@'"),
    ("root ::=", "a rule is empty"),
    ("\"a\" ::= x", "expected 'name ::='"),
])
def test_bad_grammars_are_refused(grammar, why):
    with pytest.raises(GrammarError, match=regex.escape(why)):
        grammar_to_regex(grammar)
