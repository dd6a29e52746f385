import openai
import pytest
import ray
from ray import serve

from benchmarks.common import free_port
from driver import serve as raytp_serve
from driver.config import EngineConfig, ServeConfig
from tests.checkpoints import make_checkpoint

# The OpenAI server modules' app (the `server` and `client` fixtures).
MODEL = "tiny-llama"
MAX_REQUESTS = 4
MAX_MODEL_LEN = 2048
KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="session", autouse=True)
def ray_cluster():
    """One local Ray cluster for the integration tests; engines join it."""
    if not ray.is_initialized():
        # Ray metrics every second (default 10 s): the Serve tests read engines' metrics.
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
                 _system_config={"metrics_report_interval_ms": 1000})
    yield
    ray.shutdown()


def alive_raytp_actors() -> list[str]:
    """Names of live raytp worker actors (killed actors leave the named registry)."""
    return [name for name in ray.util.list_named_actors() if name.startswith("raytp-")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Serve app on a tiny random Llama (CPU, float32): (its checkpoint, its URL)."""
    ckpt = make_checkpoint(str(tmp_path_factory.mktemp("served")), "llama", seed=3,
                           max_position_embeddings=MAX_MODEL_LEN)
    port = free_port()
    engine_cfg = EngineConfig.create(ckpt, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)
    serve_cfg = ServeConfig(host="127.0.0.1", port=port, served_model_name=MODEL,
                            max_num_requests=MAX_REQUESTS, replica_num_cpus=0, api_key=KEY)
    raytp_serve.run(engine_cfg, serve_cfg, blocking=False)
    yield ckpt, f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)
