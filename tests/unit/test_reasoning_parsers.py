"""The deepseek_r1 reasoning parser on replies, whole and as a stream sees them."""
import pytest

from driver.reasoning_parsers import DeepSeekR1ReasoningParser, Spans, get_reasoning_parser

P = DeepSeekR1ReasoningParser()


@pytest.mark.parametrize("text, want", [
    ("thinking</think>answer", ("thinking", "answer")),
    ("<think>thinking</think>\n\nanswer", ("thinking", "\n\nanswer")),  # a written <think> is dropped
    ("cut off while thinking", ("cut off while thinking", None)),
    ("</think>answer", (None, "answer")),
])
def test_split(text, want):
    assert P.split(text) == want


def test_a_stream_holds_back_what_may_be_a_tag():
    assert P.spans("thinking</thi", finished=False) == (Spans(0, 13, 13), len("thinking"))
    assert P.spans("thinking</thi", finished=True)[1] == 13  # ended: all of it is reasoning
    assert P.spans("<thi", finished=False)[1] == 0  # may be the start tag
    assert P.spans("a</think>b", finished=False) == (Spans(0, 1, 9), 10)


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match=r"choose one of \['deepseek_r1'\]"):
        get_reasoning_parser("qwen3")
