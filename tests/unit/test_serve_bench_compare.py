"""serve_bench's comparison of a target with ``vllm serve``: medians, each round, and the place in the round."""

from __future__ import annotations

import pytest

from benchmarks.load import LevelResult
from benchmarks.serve_bench import compare, main, pool


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


def report(spread: float, rounds: dict[int, list[tuple[float, float, float, float]]], target: str = "ours") -> dict:
    """A result file: per concurrency, rounds of (raw tok/s, raw TTFT p50, target tok/s, target TTFT p50)."""
    def levels(pick):
        return [{"concurrency": c, "per_round": [{"tokens_per_s": pick(r)[0], "ttft_p50_ms": pick(r)[1]} for r in rs]}
                for c, rs in rounds.items()]
    return {"benchmark": "serve_bench", "settings": {"output_tokens_spread": spread, "smoke": False},
            "results": {"raw": levels(lambda r: r[:2]), target: levels(lambda r: r[2:])}}


def test_pooled_rounds_give_medians_with_intervals_per_level_and_workload():
    runs = [report(0.0, {8: [(100, 300, 101, 290), (100, 300, 99, 320)], 32: [(100, 1000, 95, 1100)]}),
            report(0.0, {32: [(100, 1000, 98, 980), (100, 1000, 100, 1010)]}),
            report(0.5, {32: [(100, 500, 100, 505)]}),
            report(0.0, {32: [(1, 1, 1, 1)]}, target="serve-llm"),  # another target: not pooled as ours
            report(0.0, {32: [(1, 1, 1, 1)]}) | {"settings": {"smoke": True}},  # the tiny model: not a round
            {"benchmark": "serve_bench_pooled", "pooled": []}]  # a glob over the results finds these too
    rows = pool(runs, resamples=2000)
    assert [(r["concurrency"], r["output_tokens_spread"], r["runs"], r["rounds"]) for r in rows] == [
        (8, 0.0, 1, 2), (32, 0.0, 2, 3), (32, 0.5, 1, 1)]
    eight, lockstep, spread = rows
    assert eight["ttft_p50_added_ms_per_round"] == [-10.0, 20.0] and eight["ttft_p50_added_ms"] == 5.0
    assert lockstep["ttft_p50_added_ms_per_round"] == [100.0, -20.0, 10.0] and lockstep["ttft_p50_added_ms"] == 10.0
    assert lockstep["throughput_ratio"] == 0.98
    low, high = lockstep["ttft_p50_added_ms_ci95"]
    assert -20.0 <= low <= 10.0 <= high <= 100.0 and low < high  # an interval drawn from the rounds themselves
    assert spread["ttft_p50_added_ms_ci95"] == [5.0, 5.0]


def test_pool_mode_reads_result_files_and_writes_its_own(tmp_path):
    import json

    files = []
    for i, run in enumerate([report(0.0, {32: [(100, 1000, 97, 1030), (100, 1000, 99, 990)]}),
                             report(0.0, {32: [(100, 1000, 101, 1000)]})]):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(run))
    out = tmp_path / "out"
    result = main(["--pool", *map(str, files), "--out", str(out)])
    assert json.loads((out / "serve_bench_pooled.json").read_text()) == result
    assert (out / "serve_bench_pooled.png").stat().st_size > 10_000
    (row,) = result["pooled"]
    assert (row["runs"], row["rounds"], row["ttft_p50_added_ms"], row["throughput_ratio"]) == (2, 3, 0.0, 0.99)


@pytest.mark.parametrize("spread", ["-0.1", "1", "1.5"])
def test_a_spread_outside_zero_to_one_is_refused_before_anything_starts(capsys, spread):
    with pytest.raises(SystemExit):
        main(["--output-tokens-spread", spread])
    assert "--output-tokens-spread must be in [0, 1)" in capsys.readouterr().err
