"""benchmarks.common.device_gaps on a hand-built Chrome trace: busy time, span, and the idle
gaps summed per pair of neighbouring device ops (host events ignored)."""
from __future__ import annotations

import json

from benchmarks.common import device_gaps


def test_device_gaps(tmp_path):
    ev = [{"ph": "X", "cat": "kernel", "name": "gemv", "ts": 100.0, "dur": 10.0},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 500.0},  # host: ignored
          {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 112.0, "dur": 1.0},
          {"ph": "X", "cat": "kernel", "name": "gemv", "ts": 120.0, "dur": 10.0},
          {"ph": "X", "cat": "kernel", "name": "attention", "ts": 130.0, "dur": 5.0},
          {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 140.0, "dur": 1.0},
          {"ph": "X", "cat": "kernel", "name": "gemv", "ts": 1141.0, "dur": 10.0}]
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    got = device_gaps(str(path))
    assert (got["busy_ms"], got["span_ms"], got["idle_ms"]) == (0.037, 1.051, 1.014)
    gaps = {g["between"]: (g["ms"], g["count"]) for g in got["top_gaps"]}
    assert gaps["Memcpy HtoD -> gemv"] == (1.007, 2)  # 7 us + 1000 us
    assert gaps["gemv -> Memcpy HtoD"] == (0.002, 1)
    assert gaps["gemv -> attention"] == (0.0, 1)
    assert got["top_gaps"][0]["between"] == "Memcpy HtoD -> gemv"
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"traceEvents": ev[1:2]}))
    assert device_gaps(str(empty))["busy_ms"] == 0.0
