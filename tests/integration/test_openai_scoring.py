"""Scoring and steering through the OpenAI API. As evaluation harnesses score: `echo` with
`logprobs` (the legacy completions way, lm-eval's loglikelihood requests) and vLLM's
`prompt_logprobs` extension give each prompt token's logprob given the tokens before it,
equal to Hugging Face transformers' (float32). As clients steer: OpenAI's `logit_bias` and
vLLM's `allowed_token_ids`."""
import random

import httpx
import openai
import pytest

from driver.tokenizer import load_tokenizer
from tests.hf_reference import hf_embedding, hf_greedy, hf_prompt_logprobs
from tests.integration.conftest import AUTH, MAX_MODEL_LEN, MODEL

PROMPT = [random.Random(5).randrange(3, 500) for _ in range(21)]


def test_echo_with_logprobs_scores_the_prompt(server, client):
    """lm-eval's request: echo, logprobs=1, max_tokens=1, greedy."""
    ckpt, _ = server
    tok = load_tokenizer(ckpt)
    ref = hf_prompt_logprobs(ckpt, PROMPT, 1)
    [next_token], [next_lp] = hf_greedy(ckpt, PROMPT, 1)
    out = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1,
                                    temperature=0, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    lp = out.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in PROMPT + [next_token]]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    assert lp.token_logprobs[1:] == pytest.approx([own for own, _, _ in ref] + [next_lp], abs=2e-4)
    # The greedy check lm-eval makes: is each prompt token the top-1 there?
    is_top = [list(top)[0] == tok.decode([t]) for top, t in zip(lp.top_logprobs[1:-1], PROMPT[1:])]
    assert is_top == [ids[0] == t for (_, ids, _), t in zip(ref, PROMPT[1:])]
    assert out.choices[0].text.startswith(tok.decode(PROMPT))

    # Streamed: the first chunk carries the prompt's, the rest follow.
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    streamed = [x for ch in chunks for x in ch.choices[0].logprobs.token_logprobs]
    whole = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert streamed == whole.choices[0].logprobs.token_logprobs and len(streamed) == len(PROMPT) + 3


def test_prompt_logprobs_extension(server, client):
    ckpt, url = server
    tok = load_tokenizer(ckpt)
    ref = hf_prompt_logprobs(ckpt, PROMPT, 2)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": 2})
    rows = out.choices[0].model_extra["prompt_logprobs"]
    assert len(rows) == len(PROMPT) and rows[0] is None
    for row, t, (own, top_ids, top_lps) in zip(rows[1:], PROMPT[1:], ref):
        assert row[str(t)]["logprob"] == pytest.approx(own, abs=2e-4)
        assert row[str(t)]["decoded_token"] == tok.decode([t])
        top = sorted(row.items(), key=lambda kv: -kv[1]["logprob"])[:2]
        assert [int(u) for u, _ in top] == top_ids
        assert set(row) <= {str(t)} | {str(u) for u in top_ids}

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2, extra_body={"prompt_logprobs": 0})
    rows = chat.model_extra["prompt_logprobs"]
    assert len(rows) == chat.usage.prompt_tokens and rows[0] is None
    assert all(len(r) == 1 for r in rows[1:])

    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=30,
                   json={"model": MODEL, "prompt": "hi", "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError, match="'prompt_logprobs' must be"):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"prompt_logprobs": 21})


def test_logit_bias_and_allowed_token_ids_steer_the_tokens(server, client):
    ckpt, _ = server
    greedy, _ = hf_greedy(ckpt, PROMPT, 6)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
              extra_body={"ignore_eos": True, "skip_special_tokens": False})
    tok = load_tokenizer(ckpt)
    favoured = next(t for t in range(300, 500) if t not in greedy)
    out = client.completions.create(logit_bias={str(favoured): 100}, **kw).choices[0]
    assert out.logprobs.tokens == [tok.decode([favoured])] * 6
    banned = client.completions.create(logit_bias={str(greedy[0]): -100}, **kw).choices[0]
    assert banned.logprobs.tokens[0] != tok.decode([greedy[0]])
    allowed = [favoured, favoured + 1, greedy[0]]
    kw["extra_body"] = {**kw["extra_body"], "allowed_token_ids": allowed}
    restricted = client.completions.create(**kw).choices[0]
    assert restricted.logprobs.tokens[0] == tok.decode([greedy[0]])  # the best of them
    assert set(restricted.logprobs.tokens) <= {tok.decode([t]) for t in allowed}


def test_embeddings_equal_transformers(server, client):
    ckpt, url = server
    tok = load_tokenizer(ckpt)
    out = client.embeddings.create(model=MODEL, input=["Hello there", PROMPT])  # the client asks for base64
    assert [d.index for d in out.data] == [0, 1]
    ids = tok.encode("Hello there")
    assert out.data[0].embedding == pytest.approx(hf_embedding(ckpt, ids), abs=1e-4)
    assert out.data[1].embedding == pytest.approx(hf_embedding(ckpt, PROMPT), abs=1e-4)
    assert out.usage.prompt_tokens == len(ids) + len(PROMPT)

    r = httpx.post(url + "/v1/embeddings", headers=AUTH, timeout=30,
                   json={"model": MODEL, "input": PROMPT, "encoding_format": "float"}).json()
    assert r["object"] == "list" and r["data"][0]["object"] == "embedding"
    assert r["data"][0]["embedding"] == pytest.approx(out.data[1].embedding, abs=1e-6)
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {MAX_MODEL_LEN}"):
        client.embeddings.create(model=MODEL, input=[5] * MAX_MODEL_LEN)
    with pytest.raises(openai.BadRequestError, match="'dimensions' is not supported"):
        client.embeddings.create(model=MODEL, input="hi", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="'input' is empty"):
        client.embeddings.create(model=MODEL, input="")
