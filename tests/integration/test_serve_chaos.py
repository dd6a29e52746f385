"""Mixed load with clients that go away: a served engine with a small KV cache (so sequences
are preempted) takes concurrent requests of every kind (streamed or not, chat, responses,
n > 1, beam search, structured outputs, logprobs, stop strings, echo, over-long prompts), about half of
them abandoned by their clients at random moments. Every answer is a success or an error
that says why (never a 500), and afterwards nothing is left: no request in flight, every KV
block free, and the engine answers as before the load."""
import asyncio
import random
import re

import httpx
import pytest
from ray import serve

from benchmarks.common import free_port
from driver import serve as raytp_serve
from driver.config import EngineConfig, ServeConfig
from tests.checkpoints import make_checkpoint

MAX_REQUESTS = 16
WORDS = ["alpha", "beta", "gamma", "delta", "x", "é"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    ckpt = make_checkpoint(str(tmp_path_factory.mktemp("chaos")), "llama", seed=5, max_position_embeddings=512)
    port = free_port()
    engine_cfg = EngineConfig.create(ckpt, device="cpu", dtype="float32", max_model_len=512, num_gpu_blocks=40,
                                     max_num_batched_tokens=256)
    raytp_serve.run(engine_cfg, ServeConfig(host="127.0.0.1", port=port, served_model_name="m",
                                            max_num_requests=MAX_REQUESTS, replica_num_cpus=0), blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if not line.startswith("#"))}


def _request(rng: random.Random) -> tuple[str, dict]:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 130)))
    body = {"model": "m", "prompt": prompt, "max_tokens": rng.randint(1, 120), "temperature": rng.choice([0, 0.8]),
            "stream": rng.random() < 0.4}
    kind = rng.choice(["plain", "chat", "n", "regex", "json", "beam", "logprobs", "stop", "echo", "responses"])
    if kind in ("chat", "json"):
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    if kind == "responses":
        body["input"], body["max_output_tokens"] = body.pop("prompt"), body.pop("max_tokens")
        return "/v1/responses", body
    extra = {"n": {"n": rng.randint(2, 3)}, "regex": {"guided_regex": "(yes|no), [a-z]{2,9}!"},
             "json": {"response_format": {"type": "json_object"}}, "logprobs": {"logprobs": 2},
             "beam": {"use_beam_search": True, "n": 2, "temperature": 0, "stream": False,
                      "max_tokens": rng.randint(1, 8)},
             "stop": {"stop": ["a", "é"]}, "echo": {"echo": True, "stream": False}}
    body.update(extra.get(kind, {}))
    return ("/v1/chat/completions" if "messages" in body else "/v1/completions"), body


async def _send(client: httpx.AsyncClient, url: str, path: str, body: dict) -> tuple[int, str]:
    """(status, the error body or error event, if any)."""
    if not body["stream"]:
        r = await client.post(url + path, json=body)
        return r.status_code, r.text if r.status_code != 200 else ""
    async with client.stream("POST", url + path, json=body) as r:
        # (an error body or event; a response object's `"error": null` is none)
        errors = [line async for line in r.aiter_lines() if re.search(r'"error":\s*\{|"type":\s*"error"', line)]
        return r.status_code, "".join(errors)


async def _load(url: str, n: int, seed: int) -> list:
    rng, outcomes = random.Random(seed), []
    gate = asyncio.Semaphore(MAX_REQUESTS + 2)  # a few past the limit: some are refused

    async def one(client):
        async with gate:
            path, body = _request(rng)
            give_up = rng.choice([None, None, None, 0.05, 0.3, 1.0])  # seconds until the client leaves
            try:
                outcomes.append((body, *await asyncio.wait_for(_send(client, url, path, body), give_up)))
            except asyncio.TimeoutError:
                outcomes.append((body, "gone", ""))

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*[one(client) for _ in range(n)])
    return outcomes


def test_mixed_load_with_disconnects_leaves_nothing_behind(url):
    greedy = {"model": "m", "prompt": "alpha beta", "max_tokens": 20, "temperature": 0}
    before_text = httpx.post(url + "/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"]
    before = _metrics(url)
    outcomes = asyncio.run(_load(url, 160, seed=0))
    for body, status, error in outcomes:
        if status == 400:
            assert "maximum context length is 512 tokens" in error, (body, error)
        elif status == 503:
            assert f"limit of {MAX_REQUESTS} requests" in error, (body, error)
        else:
            assert status in (200, "gone") and not error, (body, status, error)
    kinds = {status for _, status, _ in outcomes}
    assert {200, "gone"} <= kinds and sum(status == 200 for _, status, _ in outcomes) >= 10

    for _ in range(120):  # aborts reach the engine core a moment after the clients leave
        m = _metrics(url)
        if not (m["raytp_requests_in_flight"] or m["raytp_num_running"] or m["raytp_num_waiting"]
                or m["raytp_num_swapped"]):
            break
        asyncio.run(asyncio.sleep(0.5))
    assert (m["raytp_requests_in_flight"], m["raytp_num_running"], m["raytp_num_waiting"], m["raytp_num_swapped"]) \
        == (0, 0, 0, 0)
    assert m["raytp_num_free_gpu_blocks"] == m["raytp_num_gpu_blocks"]
    assert m["raytp_num_preemptions_total"] > before["raytp_num_preemptions_total"]  # the cache ran out
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    after = httpx.post(url + "/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"]
    assert after == before_text
