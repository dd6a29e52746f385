"""Ray Serve autoscaling of engines (ServeConfig.autoscaling_config): load above the target
brings up a second replica, with its own engine core and workers, that serves requests; when
the load ends Serve takes it down again, and its engine goes with it."""
import threading
import time

import openai
import pytest
import ray
from ray import serve

from benchmarks.common import free_port
from driver import serve as raytp_serve
from driver.config import EngineConfig, ServeConfig
from tests.checkpoints import make_checkpoint

AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
               "downscale_delay_s": 2, "look_back_period_s": 1, "metrics_interval_s": 0.5}


def _running_replicas() -> int:
    app = serve.status().applications.get("raytp")
    return app.deployments["raytp"].replica_states.get("RUNNING", 0) if app else 0


def _cores() -> list[dict]:
    """The engine cores alive: {namespace, name} (each replica made one, in its namespace)."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("raytp-core-")]


def _engine_cores() -> int:
    return len(_cores())


def _finished_per_core() -> list[int]:
    stats = [ray.get_actor(a["name"], namespace=a["namespace"]).stats.remote() for a in _cores()]
    return [s["requests_finished_total"] for s in ray.get(stats)]


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.5)
    return predicate()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ckpt = make_checkpoint(str(tmp_path_factory.mktemp("auto")), "llama", max_position_embeddings=1024)
    port = free_port()
    engine_cfg = EngineConfig.create(ckpt, device="cpu", dtype="float32", max_model_len=1024)
    serve_cfg = ServeConfig(host="127.0.0.1", port=port, served_model_name="auto", replica_num_cpus=0,
                            autoscaling_config=AUTOSCALING)
    raytp_serve.run(engine_cfg, serve_cfg, blocking=False)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    serve.shutdown()


def test_load_adds_an_engine_and_its_end_takes_it_away(client):
    assert _running_replicas() == 1 and _engine_cores() == 1
    stop, served = threading.Event(), []

    def load():
        while not stop.is_set():
            out = client.completions.create(model="auto", prompt="Once upon a time", max_tokens=200,
                                            extra_body={"ignore_eos": True})
            served.append(out.usage.completion_tokens)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert _wait(lambda: _running_replicas() == 2, 90), serve.status()
        assert _engine_cores() == 2  # the new replica's own engine
        assert _wait(lambda: min(_finished_per_core()) > 0, 60), _finished_per_core()  # both serve
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert served and set(served) == {200}
    assert _wait(lambda: _running_replicas() == 1 and _engine_cores() == 1, 90), serve.status()
    again = client.completions.create(model="auto", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert again.usage.completion_tokens == 3
