"""--reasoning-parser deepseek_r1 end to end: a scripted checkpoint whose greedy reply is
thinking, `</think>`, then an answer (as DeepSeek-R1 distills reply, their template having
opened <think>); the chat API returns the two apart, whole and streamed, and completions
leave the text as it is; the Responses API returns a reasoning item, then the message."""
import openai
import pytest
from ray import serve

from benchmarks.common import free_port
from driver import serve as raytp_serve
from driver.config import EngineConfig, ServeConfig
from tests.checkpoints import make_scripted_checkpoint

MODEL = "r1-llama"
THINKING, ANSWER = "The user asks for 2+2. That is 4.", " The answer is 4."
ASK = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ckpt = make_scripted_checkpoint(str(tmp_path_factory.mktemp("r1")), [THINKING, "</think>", ANSWER])
    port = free_port()
    engine_cfg = EngineConfig.create(ckpt, device="cpu", dtype="float32", max_model_len=512)
    serve_cfg = ServeConfig(host="127.0.0.1", port=port, served_model_name=MODEL, replica_num_cpus=0,
                            reasoning_parser="deepseek_r1")
    raytp_serve.run(engine_cfg, serve_cfg, blocking=False)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    serve.shutdown()


def test_reasoning_and_answer_come_apart(client):
    message = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0).choices[0].message
    assert message.model_extra["reasoning_content"] == THINKING and message.content == ANSWER

    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == THINKING
    assert "".join(d.content or "" for d in deltas) == ANSWER  # the tag is in neither

    text = client.completions.create(model=MODEL, prompt="<|user|>\nhi<|end|>\n<|assistant|>\n",
                                     max_tokens=10).choices[0].text
    assert text == THINKING + "</think>" + ANSWER


def test_responses_api_reasoning_item_then_message(client):
    """The Responses API: a reasoning item (streamed as reasoning_text deltas), then the message."""
    out = client.responses.create(model=MODEL, input=ASK[0]["content"], temperature=0)
    assert [item.type for item in out.output] == ["reasoning", "message"]
    assert out.output[0].content[0].text == THINKING and out.output_text == ANSWER
    events = list(client.responses.create(model=MODEL, input=ASK[0]["content"], temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == THINKING
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")]
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
