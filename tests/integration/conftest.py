import pytest
import ray


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
