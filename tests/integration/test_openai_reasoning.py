"""--reasoning-parser deepseek_r1 end to end: a scripted checkpoint whose greedy reply is
thinking, `</think>`, then an answer (as DeepSeek-R1 distills reply, their template having
opened <think>); the chat API returns the two apart, whole and streamed, and completions
leave the text as it is."""
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
