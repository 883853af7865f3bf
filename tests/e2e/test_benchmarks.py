"""Every benchmark's --smoke mode on the e2e session's cluster, so a config or API change that breaks a
benchmark fails here; the figures themselves are the benchmarks' business, not the tests'."""

from __future__ import annotations

import json
import sys

import pytest

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e
sys.path.insert(0, str(ROOT))


def test_chaos_bench_smoke(ray_cluster, served, tmp_path):
    from benchmarks import chaos_bench

    report = chaos_bench.main(["--smoke", "--port", str(ray_cluster.http_port), "--out", str(tmp_path),
                               "--cloud-key-env", "RAY_APP_TEST_OPENAI_KEY"])
    written = json.loads((tmp_path / "chaos_bench_smoke.json").read_text())
    assert (tmp_path / "chaos_bench_smoke.png").stat().st_size > 10_000
    results = written["results"]
    assert results == report["results"] and results["sent"] > 20
    assert set(results["faults"]) == {"llm replica", "store actor", "router replica"}
    # the goals: nothing lost, and exactly one ledger row per answered chat, client by client
    assert results["lost"] == 0, results["lost_examples"]
    assert results["ledger_matches_answers"], (results["ledger_rows_ok"], results["answered_chat"])
