"""The engine core's per-step deltas (driver.engine_core.make_delta) and the server's
re-assembly of them (driver.async_engine.RequestStream): what the server hands its callers
equals the engine's own cumulative outputs, step for step, on the CPU without Ray."""
import asyncio
import pickle
import random

from driver.async_engine import RequestStream
from driver.engine_core import OutputDelta, make_delta
from driver.outputs import CompletionOutput, RequestOutput


def _steps(rng: random.Random, n: int, logprobs: bool) -> list[RequestOutput]:
    """Cumulative outputs of a request with n completions as an engine emits them: tokens
    appended (none in a prefill chunk), text grown, and once a stop string that cuts text
    already emitted."""
    ids, texts, lps, reasons = [[] for _ in range(n)], [""] * n, [[] for _ in range(n)], [None] * n
    outs = []
    for step in range(12):
        for i in range(n):
            if reasons[i] is not None or step == 0:
                continue
            t = rng.randrange(1000)
            ids[i].append(t)
            lps[i].append({t: -rng.random()})
            texts[i] += rng.choice(["a", "bc", "", " d", "é"])
            if step == 7 and i == 0:  # a stop string began two chars back: the text shrinks
                texts[i], reasons[i] = texts[i][:-2], "stop"
            elif step == 11:
                reasons[i] = "length"
        comps = [CompletionOutput(i, texts[i], list(ids[i]), reasons[i], list(lps[i]) if logprobs else None)
                 for i in range(n)]
        prompt_logprobs = [None, {2: -1.5, 9: -0.5}, {3: -0.25}] if logprobs else None
        outs.append(RequestOutput("r", None, [1, 2, 3], comps, all(r is not None for r in reasons), 2,
                                  prompt_logprobs=prompt_logprobs))
    return outs


def test_deltas_reassemble_to_the_engine_outputs():
    rng = random.Random(0)
    for n, logprobs in ((1, False), (3, True)):
        outs = _steps(rng, n, logprobs)

        async def run():
            stream, sent, got = RequestStream("r", [1, 2, 3]), {}, []
            for out in outs:
                delta = pickle.loads(pickle.dumps(make_delta(out, sent)))  # as it crosses processes
                stream.apply(delta)
                got.append(stream.output)
            return got

        got = asyncio.run(run())
        for want, have in zip(outs, got):
            assert have.outputs == want.outputs and have.finished == want.finished
            assert have.prompt_token_ids == [1, 2, 3] and have.num_cached_tokens == 2
            assert have.prompt_logprobs == want.prompt_logprobs


def test_a_delta_carries_only_what_is_new():
    out = RequestOutput("r", None, list(range(1000)), [CompletionOutput(0, "hello", [5, 6], None)], False,
                        prompt_logprobs=[None] + [{t: -1.0} for t in range(1, 1000)])
    sent = {0: (1, 3)}
    delta = make_delta(out, sent)
    assert delta.completions[0].token_ids == [6] and delta.completions[0].text == "lo"
    assert delta.completions[0].text_start == 3 and sent == {0: (2, 5)}
    assert not hasattr(delta, "prompt_token_ids")  # the server has the prompt already
    assert delta.prompt_logprobs is None  # sent with the request's first delta only


def test_the_reader_takes_the_newest_output_and_raises_errors():
    async def run():
        stream = RequestStream("r", [1])
        sent = {}
        for k in range(1, 4):
            out = RequestOutput("r", None, [1], [CompletionOutput(0, "x" * k, [7] * k, None)], False)
            stream.apply(make_delta(out, sent))
        first = await anext(stream)  # three steps arrived before the reader looked
        assert first.outputs[0].token_ids == [7, 7, 7]
        stream.apply(OutputDelta("r", [], True, error=ValueError("bad prompt")))
        try:
            await anext(stream)
        except ValueError as e:
            assert "bad prompt" in str(e) and stream.finished
        else:
            raise AssertionError("the error was not raised")

    asyncio.run(run())
