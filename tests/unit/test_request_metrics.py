"""The server's latency histograms in Prometheus' text format."""
from driver.request_metrics import Histogram, RequestMetrics


def _parse(lines: list[str]) -> dict[str, float]:
    return {k: float(v) for k, v in (line.split() for line in lines if not line.startswith("#"))}


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    got = _parse(h.prometheus("x", "help"))
    assert got == {'x_bucket{le="0.1"}': 2, 'x_bucket{le="1.0"}': 3, 'x_bucket{le="+Inf"}': 4,
                   "x_sum": 3.65, "x_count": 4}


def test_request_metrics_skip_tpot_for_one_token_and_ttft_without_tokens():
    m = RequestMetrics()
    m.finished(arrived=0.0, first=None, num_tokens=0)  # ended before any token (e.g. max_tokens hit at 0)
    m.finished(arrived=0.0, first=0.0, num_tokens=1)
    assert (m.e2e.count, m.ttft.count, m.tpot.count) == (2, 1, 0)
    names = {line.split()[2] for line in m.prometheus("raytp_") if line.startswith("# TYPE")}
    assert names == {"raytp_time_to_first_token_seconds", "raytp_time_per_output_token_seconds",
                     "raytp_e2e_request_latency_seconds"}
