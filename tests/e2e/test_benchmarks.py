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


def _written(tmp_path, stem: str, report: dict) -> dict:
    """The JSON the benchmark wrote is what it returned, and its picture was drawn."""
    written = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    assert written == json.loads(json.dumps(report))
    return written


def test_serve_bench_smoke(ray_cluster, served, tmp_path):
    from benchmarks import serve_bench

    report = _written(tmp_path, "serve_bench_smoke", serve_bench.main(
        ["--smoke", "--port", str(ray_cluster.http_port), "--out", str(tmp_path), "--targets", "ours", "raw"]))
    for target in ("ours", "raw"):
        (level,) = report["results"][target]
        assert level["errors"] == 0 and level["output_tokens"] == 2 * 2 * 8, level  # 2 clients x 2 requests
    assert report["settings"]["requests_per_client"] == {"2": 2}  # the file says how long each level ran
    (ratio,) = report["vs_raw"]["ours"]
    assert ratio["throughput_ratio"] > 0


def test_router_bench_smoke(ray_cluster, served, tmp_path):
    from benchmarks import router_bench

    report = _written(tmp_path, "router_bench_smoke", router_bench.main(
        ["--smoke", "--port", str(ray_cluster.http_port), "--out", str(tmp_path)]))
    # the PII prompt stays local, the others may go anywhere; every decision was timed
    assert report["decision"]["card number (PII)"]["chain"] == ["local-small"]
    assert report["decision"]["all"]["p99_us"] > 0
    level = report["throughput"]["2"]
    assert level["errors"] == 0 and level["ratio"] > 0
    # the two kinds ran side by side, each measured on its own requests
    assert report["settings"]["mode"] == "interleaved"
    assert set(level["ttft_p50_ms_per_round"]) == {"tiny-llama", "auto"}


def test_adapter_bench_smoke(ray_cluster, served, tmp_path):
    from benchmarks import adapter_bench

    report = _written(tmp_path, "adapter_bench_smoke", adapter_bench.main(
        ["--smoke", "--port", str(ray_cluster.http_port), "--out", str(tmp_path)]))
    assert set(report["results"]) == {"base (LoRA off)", "0 adapters (LoRA on)", "1 adapter", "4 adapters"}
    assert all(r["errors"] == 0 and r["tokens_per_s"] > 0 for r in report["results"].values())


def test_ingest_bench_smoke(ray_cluster, tmp_path):
    from benchmarks import ingest_bench

    report = _written(tmp_path, "ingest_bench_smoke", ingest_bench.main(["--smoke", "--out", str(tmp_path)]))
    assert report["mixed"]["pipeline"]["files"] == report["mixed"]["sequential"]["files"] == 12
    assert report["mixed"]["pipeline"]["chunks"] == report["mixed"]["sequential"]["chunks"] > 0
    assert report["ratios"]["pipeline_vs_sequential"] > 0


def test_ocr_bench_smoke(tmp_path):
    from benchmarks import ocr_bench

    report = _written(tmp_path, "ocr_bench_smoke", ocr_bench.main(["--smoke", "--out", str(tmp_path)]))
    ours = next(r for r in report["runs"] if r.get("psm") == 3 and r["workers"] == 1 and "cer" in r)
    assert 0 <= ours["cer"] < 0.5 and report["ours_vs_cli_speed"] > 0


def test_retrieval_bench_smoke(tmp_path):
    from benchmarks import retrieval_bench

    report = _written(tmp_path, "retrieval_bench_smoke", retrieval_bench.main(["--smoke", "--out", str(tmp_path)]))
    assert report["queries"] == 10 and report["documents"] >= 300
    # on 300 documents the relevant ones are easy to find: a broken retriever would score near 0
    assert report["results"]["hybrid"]["ndcg@10"] > 0.5


def test_train_bench_smoke(ray_cluster, tmp_path):
    from benchmarks import train_bench

    report = _written(tmp_path, "train_bench_smoke", train_bench.main(["--smoke", "--out", str(tmp_path)]))
    assert report["plain"]["tokens_per_s"] > 0 and report["ray_1_worker"]["tokens_per_s"] > 0
    assert report["ray_2_workers"]["workers"] == 2


def test_console_bench_smoke(served, tmp_path):
    from benchmarks import console_bench

    report = _written(tmp_path, "console_bench_smoke", console_bench.main(
        ["--smoke", "--base-url", served.base_url, "--model", "tiny-llama", "--out", str(tmp_path)]))
    assert report["load"]["fcp_ms_p50"] > 0 and report["ttft"]["console_vs_client"] > 0
    assert len(report["screenshots"]) == 6
    assert all((tmp_path / shot).stat().st_size > 5_000 for shot in report["screenshots"])


def test_tool_bench_smoke(served, tmp_path):
    from benchmarks import tool_bench

    report = _written(tmp_path, "tool_bench_smoke", tool_bench.main(
        ["--smoke", "--base-url", served.base_url, "--out", str(tmp_path)]))
    assert report["settings"]["prompts"] == 5 and report["baseline"]["errors"] == 0
    # a named function is decoded against its schema: every call is the meant tool with valid arguments
    assert report["results"]["named"]["valid_rate"] == report["results"]["named"]["right_tool_rate"] == 1.0
    assert report["results"]["required"]["call_rate"] == 1.0


def test_ledger_bench_smoke(tmp_path):
    from benchmarks import ledger_bench

    report = _written(tmp_path, "ledger_bench_smoke", ledger_bench.main(
        ["--smoke", "--dir", str(tmp_path), "--out", str(tmp_path)]))
    # every settle wrote its row, and a burst of 8 shared one transaction (the baseline used 8)
    assert report["rows_written"] == {"per request": 36, "group commit": 36}
    assert report["results"]["8"]["group commit"]["transactions_per_burst"] == 1
