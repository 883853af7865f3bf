"""serve_bench's comparison of a target with ``vllm serve``: medians, each round, and the place in the round."""

from __future__ import annotations

import pytest

from benchmarks.load import LevelResult
from benchmarks.serve_bench import compare, main


def level(tokens_per_s: float, ttft_p50_ms: float, ttft_p99_ms: float = 0.0) -> LevelResult:
    return LevelResult(concurrency=32, requests=128, wall_s=60.0, output_tokens=8192, tokens_per_s=tokens_per_s,
                       ttft_p50_ms=ttft_p50_ms, ttft_p99_ms=ttft_p99_ms, itl_p50_ms=200.0, itl_p99_ms=300.0)


def test_rounds_are_split_by_whether_the_target_ran_before_raw():
    raw = [level(100, 1000, 1200), level(100, 1000, 1200), level(100, 1000, 1200), level(100, 1000, 1200)]
    # ahead of raw in rounds 2 and 4, where it measured slower and later
    ours = [level(104, 950, 1300), level(94, 1040, 1300), level(106, 960, 1250), level(96, 1030, 1250)]
    row = compare(ours, raw, [False, True, False, True])
    assert row["concurrency"] == 32
    assert row["throughput_ratio"] == 1.0 and row["ttft_p50_added_ms"] == -5.0 and row["ttft_p99_added_ms"] == 75.0
    assert row["throughput_ratio_per_round"] == [1.04, 0.94, 1.06, 0.96]
    assert row["ttft_p50_added_ms_per_round"] == [-50.0, 40.0, -40.0, 30.0]
    assert row["by_position"] == {"first": {"rounds": 2, "throughput_ratio": 0.95, "ttft_p50_added_ms": 35.0},
                                  "second": {"rounds": 2, "throughput_ratio": 1.05, "ttft_p50_added_ms": -45.0}}


def test_an_odd_number_of_rounds_is_refused_before_anything_starts(capsys):
    with pytest.raises(SystemExit):
        main(["--rounds", "5"])
    assert "even number" in capsys.readouterr().err
