"""Serving benchmark: our OpenAI endpoint against ``vllm serve`` (vLLM's own OpenAI server) on the same
model and engine settings (dtype, context, LoRA and tool-calling flags), in the same run.

Concurrent streaming chat clients send a fixed prompt and read a fixed number of output tokens
(``ignore_eos``), or with ``--output-tokens-spread`` a number drawn per request around it (the same
draws for every target of a round). Reported per concurrency level: output tokens/s, time to first
token (TTFT) p50/p99, inter-token latency (ITL, gaps between streamed tokens) p50/p99, and each
target's ratios to raw.

Targets:
  ours       the shipped app (its gateway runs in the LLM's replica: ``gateway.host_llm``)
  ours-hop   the same app with the gateway as a deployment of its own (every token crosses a handle)
  raw        ``vllm serve``
  serve-llm  Ray Serve LLM's own OpenAI app on the same ``LLMConfig``; with
             ``--ray-env RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`` its LLMServer is the HTTP ingress (Ray's
             "direct streaming"; with adapters it also needs RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1)

The Ray cluster this script starts gets the README's serving environment (``ray_app.serve.SERVING_ENV``:
throughput mode, HAProxy) plus ``--ray-env``. ``--without-adapters`` serves the model without LoRA on
both sides; ``--stream-batching-ms`` sets ``stream_batching_interval_ms`` on ours.

    python benchmarks/serve_bench.py                      # SmolLM2, 8 and 32 clients, ours and raw
    python benchmarks/serve_bench.py --targets ours ours-hop raw --tag paths
    python benchmarks/serve_bench.py --output-tokens-spread 0.5 --tag spread   # 32 to 96 tokens a request
    python benchmarks/serve_bench.py --smoke --port PORT  # tiny model, seconds, on a running cluster (tests)
    python benchmarks/serve_bench.py --pool benchmarks/results/serve_bench_{balanced,spread}.json  # rounds pooled

Writes benchmarks/results/serve_bench.json and serve_bench.png (``_smoke``, ``_<tag>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402
from benchmarks.load import (  # noqa: E402
    PROMPT,
    LevelResult,
    OnServe,
    RawVLLM,
    count_prompt_tokens,
    median_level,
    run_level,
    wait_ready,
)
from ray_app.serve import SERVING_ENV  # noqa: E402

LABELS = {"ours": "ray_app (gateway in the LLM replica)", "ours-hop": "ray_app (gateway deployment)",
          "raw": "vllm serve", "serve-llm": "Ray Serve LLM app"}
STYLES = {"ours": ("o-", "tab:blue"), "ours-hop": ("v:", "tab:purple"), "raw": ("s--", "tab:orange"),
          "serve-llm": ("^-.", "tab:green")}


class ServeLLMApp:
    """Ray Serve LLM's own OpenAI app (``build_openai_app``) on the same LLMConfig as ours."""

    def __init__(self, llm, model_path: str, port: int | None):
        self.llm, self.model_path, self.port = llm, model_path, port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/serve-llm"

    def __enter__(self) -> ServeLLMApp:
        from ray import serve
        from ray.serve.llm import build_openai_app

        from ray_app.serve.llm import to_llm_config

        serve.run(build_openai_app({"llm_configs": [to_llm_config(self.llm, self.model_path)]}), name="serve-llm",
                  route_prefix="/serve-llm")
        return self

    def __exit__(self, *exc) -> None:
        from ray import serve

        serve.delete("serve-llm")


def compare(target: list[LevelResult], raw: list[LevelResult], before_raw: list[bool]) -> dict:
    """One target against ``vllm serve`` at one level, from the rounds both ran: the ratio of the
    medians, each round's own figures, and those figures split by whether the target ran before raw in
    its round. A server measured first in a round meets the machine as the previous level left it, the
    second as the first left it; the order alternates over an even number of rounds so that neither
    place favours one server, and the split shows whether the place mattered."""
    ratios = [round(a.tokens_per_s / b.tokens_per_s, 3) for a, b in zip(target, raw)]
    added = [round(a.ttft_p50_ms - b.ttft_p50_ms, 1) for a, b in zip(target, raw)]

    def median(key: str, results: list[LevelResult]) -> float:
        return statistics.median(getattr(r, key) for r in results)

    by_position = {}
    for place, first in (("first", True), ("second", False)):
        picked = [i for i, b in enumerate(before_raw) if b == first]
        if picked:
            by_position[place] = {"rounds": len(picked),
                                  "throughput_ratio": round(statistics.median(ratios[i] for i in picked), 3),
                                  "ttft_p50_added_ms": round(statistics.median(added[i] for i in picked), 1)}
    return {"concurrency": raw[0].concurrency,
            "throughput_ratio": round(median("tokens_per_s", target) / median("tokens_per_s", raw), 3),
            "throughput_ratio_per_round": ratios,
            "ttft_p50_added_ms": round(median("ttft_p50_ms", target) - median("ttft_p50_ms", raw), 1),
            "ttft_p50_added_ms_per_round": added,
            "ttft_p99_added_ms": round(median("ttft_p99_ms", target) - median("ttft_p99_ms", raw), 1),
            "by_position": by_position}


def pool(reports: list[dict], target: str = "ours", resamples: int = 10_000, seed: int = 0) -> list[dict]:
    """Every round of several runs, per concurrency and output-length spread: the median of the rounds'
    own TTFT p50 differences and throughput ratios against raw, each with a bootstrap 95% interval.
    One run's few rounds move by more than a 10 ms target; pooled rounds say how far a figure is known."""
    groups: dict[tuple[int, float], dict] = {}
    for report in reports:
        # a glob over the results also finds smoke runs (the tiny model) and pooled files: not rounds
        if report.get("benchmark") != "serve_bench" or report["settings"].get("smoke"):
            continue
        if target not in report["results"] or "raw" not in report["results"]:
            continue
        spread = report["settings"].get("output_tokens_spread", 0.0)
        raw_levels = {lv["concurrency"]: lv for lv in report["results"]["raw"]}
        for level in report["results"][target]:
            raw = raw_levels.get(level["concurrency"])
            if raw is None:
                continue
            group = groups.setdefault((level["concurrency"], spread), {"runs": 0, "ttft": [], "ratio": []})
            group["runs"] += 1
            for a, b in zip(level["per_round"], raw["per_round"]):
                group["ttft"].append(a["ttft_p50_ms"] - b["ttft_p50_ms"])
                group["ratio"].append(a["tokens_per_s"] / b["tokens_per_s"])
    rng = random.Random(seed)

    def interval(values: list[float]) -> list[float]:
        medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
        return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]

    rows = []
    for (concurrency, spread), group in sorted(groups.items()):
        ttft_ci, ratio_ci = interval(group["ttft"]), interval(group["ratio"])
        rows.append({"concurrency": concurrency, "output_tokens_spread": spread, "runs": group["runs"],
                     "rounds": len(group["ttft"]),
                     "ttft_p50_added_ms": round(statistics.median(group["ttft"]), 1),
                     "ttft_p50_added_ms_ci95": [round(x, 1) for x in ttft_ci],
                     "ttft_p50_added_ms_per_round": [round(x, 1) for x in group["ttft"]],
                     "throughput_ratio": round(statistics.median(group["ratio"]), 3),
                     "throughput_ratio_ci95": [round(x, 3) for x in ratio_ci],
                     "throughput_ratio_per_round": [round(x, 3) for x in group["ratio"]]})
    return rows


def plot_pool(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = report["pooled"]
    labels = [f"{r['concurrency']} clients" + (f", ±{r['output_tokens_spread']:.0%}" if r["output_tokens_spread"]
                                               else "") for r in rows]
    # the goals: >= 0.95x throughput, TTFT p50 at most 10 ms above vllm serve's
    for ax, key, unit, target, goal in ((axes[0], "throughput_ratio", "ours / vllm serve", 1.0, 0.95),
                                        (axes[1], "ttft_p50_added_ms", "ms, ours − vllm serve", 0.0, 10.0)):
        for x, row in enumerate(rows):
            values = row[f"{key}_per_round"]
            ax.plot([x + 0.04 * ((i % 7) - 3) for i in range(len(values))], values, ".", color="tab:gray", alpha=0.6)
            low, high = row[f"{key}_ci95"]
            ax.errorbar([x], [row[key]], yerr=[[row[key] - low], [high - row[key]]], fmt="o", color="tab:blue",
                        capsize=6, label="median, 95% interval" if x == 0 else None)
        ax.axhline(target, color="black", lw=0.8)
        ax.axhline(goal, color="tab:red", lw=0.8, ls="--", label="goal")
        ax.set_xticks(range(len(rows)), labels)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("throughput per round")
    axes[1].set_title("TTFT p50 difference per round")
    fig.suptitle(f"{len(report['files'])} runs of serve_bench pooled, every round a dot")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for target, levels in report["results"].items():
        style, color = STYLES[target]
        xs = [lv["concurrency"] for lv in levels]
        tps = [lv["tokens_per_s"] for lv in levels]
        # the median need not lie inside [min, max] of rounded per-round figures: clip at 0
        spread = [[max(0.0, t - lv["tokens_per_s_range"][0]) for t, lv in zip(tps, levels)],
                  [max(0.0, lv["tokens_per_s_range"][1] - t) for t, lv in zip(tps, levels)]]
        axes[0].errorbar(xs, tps, yerr=spread, fmt=style, color=color, capsize=3,
                         label=f"{LABELS[target]} (median, range)")
        for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(xs, [lv[f"{key}_p50_ms"] for lv in levels], style, color=color, label=f"{LABELS[target]} p50")
            ax.plot(xs, [lv[f"{key}_p99_ms"] for lv in levels], style, color=color, alpha=0.35,
                    label=f"{LABELS[target]} p99")
    for ax, title, unit in zip(axes, ("output throughput", "time to first token", "inter-token latency"),
                               ("tokens/s", "ms", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"{s['model']} on {report['machine']['cpu']} ({report['machine']['cores']} cores), "
                 f"{s['prompt_tokens']} prompt + {s['output_tokens']}"
                 + (f" ± {s['output_tokens_spread']:.0%}" if s.get("output_tokens_spread") else "")
                 + " output tokens per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "serve_config.yaml"), help="Serve config to benchmark")
    parser.add_argument("--model", default=None, help="LLM name in the config (default: its first LLM)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 2 clients, 1 round: seconds (tests)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 8 32; smoke 2")
    parser.add_argument("--requests-per-client", type=int, default=None,
                        help="requests each client sends (default: 8 at 1 client, 4 at 8, 2 at 32)")
    parser.add_argument("--output-tokens", type=int, default=None, help="default 64; smoke 8")
    parser.add_argument("--output-tokens-spread", type=float, default=0.0, metavar="FRACTION",
                        help="draw each request's output tokens uniformly from N*(1-F)..N*(1+F), seeded per round, "
                             "so clients do not move in lockstep (default 0: every request N)")
    parser.add_argument("--targets", nargs="+", choices=list(LABELS), default=["raw", "ours"])
    parser.add_argument("--stream-batching-ms", type=float, default=None,
                        help="override the LLM's stream_batching_interval_ms for `ours`")
    parser.add_argument("--without-adapters", action="store_true",
                        help="serve the model without LoRA (ours drops `adapters`, raw gets no LoRA flags)")
    parser.add_argument("--ray-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment for the Ray cluster this script starts, beside the README's serving mode")
    parser.add_argument("--port", type=int, default=None,
                        help="deploy on the Ray cluster this process is connected to, whose proxy listens here")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds, the targets' order reversed each round; even, so each target runs first as "
                             "often as last (default 4; smoke 1)")
    parser.add_argument("--settle-s", type=float, default=None, help="idle time after warm-up (default 15; smoke 0)")
    parser.add_argument("--pool", nargs="+", metavar="JSON", default=None,
                        help="measure nothing: pool the rounds of earlier runs' result files (serve_bench_pooled.*)")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.pool:
        report = {"benchmark": "serve_bench_pooled", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "files": [Path(f).name for f in args.pool],
                  "pooled": pool([json.loads(Path(f).read_text()) for f in args.pool])}
        for row in report["pooled"]:
            print(f"   c={row['concurrency']:3d} spread {row['output_tokens_spread']:.2f}: {row['rounds']} rounds of "
                  f"{row['runs']} runs: throughput x{row['throughput_ratio']:.3f} {row['throughput_ratio_ci95']}, "
                  f"TTFT p50 {row['ttft_p50_added_ms']:+.1f} ms {row['ttft_p50_added_ms_ci95']}")
        write_results("serve_bench_pooled" + (f"_{args.tag}" if args.tag else ""), report, Path(args.out), plot_pool)
        return report
    if not 0 <= args.output_tokens_spread < 1:
        parser.error("--output-tokens-spread must be in [0, 1)")
    rounds_n = args.rounds or (1 if args.smoke else 4)
    if rounds_n > 1 and rounds_n % 2 and len(args.targets) > 1:
        parser.error(f"--rounds {rounds_n}: use an even number, so each target runs first in as many rounds as last")
    # before Ray is imported: Serve reads these when its modules load (the cluster's processes inherit them)
    ray_env = SERVING_ENV | dict(kv.split("=", 1) for kv in args.ray_env)
    os.environ.update(ray_env)
    concurrency = args.concurrency or ([2] if args.smoke else [8, 32])
    output_tokens = args.output_tokens or (8 if args.smoke else 64)
    settle_s = args.settle_s if args.settle_s is not None else (0.0 if args.smoke else 15.0)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from ray_app.serve.app import resolve_sources
    from ray_app.serve.config import AppConfig

    application = yaml.safe_load(Path(args.config).read_text())["applications"][0]
    app_args = copy.deepcopy(application["args"])
    if args.smoke:
        from tests.e2e.conftest import TINY

        app_args["llms"] = [copy.deepcopy(TINY)]
    name = args.model or app_args["llms"][0]["name"]
    app_args["llms"] = [m for m in app_args["llms"] if m["name"] == name]
    # the benchmark measures the LLM path only, the gateway in the measured model's replicas
    app_args |= {"embedders": [], "ocr": None, "knowledge": None, "fine_tuning": None, "router": None}
    app_args["gateway"]["host_llm"] = name
    if args.without_adapters:
        app_args["llms"][0].pop("adapters", None)
    if args.stream_batching_ms is not None:
        app_args["llms"][0]["stream_batching_interval_ms"] = args.stream_batching_ms
    llm = AppConfig.load(app_args).llms[0]
    model_path = resolve_sources(AppConfig.load(app_args))[llm.name]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    per_client = {c: args.requests_per_client or (2 if args.smoke else {1: 8, 8: 4, 32: 2}.get(c, 1))
                  for c in concurrency}
    report = {
        "benchmark": "serve_bench", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
        "settings": {"model": llm.name, "engine_kwargs": llm.engine_kwargs, "adapters": llm.adapters is not None,
                     "prompt_tokens": count_prompt_tokens(tokenizer, PROMPT), "output_tokens": output_tokens,
                     "output_tokens_spread": args.output_tokens_spread,
                     "stream_batching_interval_ms": app_args["llms"][0].get("stream_batching_interval_ms"),
                     "ray_env": ray_env, "rounds": rounds_n, "requests_per_client": per_client,
                     "smoke": args.smoke},
        "results": {},
    }
    # Every server stays up and the rounds alternate between them, so slow drift of this shared
    # machine hits all alike; each figure is the median over the rounds (idle, the other servers
    # cost a few percent of a core: Ray's control loops, vLLM's idle engine).
    with contextlib.ExitStack() as stack:
        runners = {}
        ours = stack.enter_context(OnServe(app_args, "serve_bench", application.get("runtime_env"), port=args.port))
        for target in args.targets:
            print(f"== {target}: starting ({LABELS[target]})", flush=True)
            if target == "raw":
                runners[target] = stack.enter_context(RawVLLM(llm.name, model_path, app_args["llms"][0],
                                                              Path(args.out) / "vllm_serve.log"))
            elif target == "serve-llm":
                runners[target] = stack.enter_context(ServeLLMApp(llm, model_path, ours.port))
            elif target == "ours-hop":
                hop = copy.deepcopy(app_args)
                hop["gateway"]["host_llm"] = None
                runners[target] = stack.enter_context(OnServe(hop, "serve_bench_hop", application.get("runtime_env"),
                                                              port=ours.port))
            else:
                runners[target] = ours
            wait_ready(runners[target].base_url, llm.name)
        for target, runner in runners.items():
            # warm up at the highest concurrency before anything is measured
            asyncio.run(run_level(runner.base_url, llm.name, PROMPT, max(concurrency), 1, 8))
        # let one-off start-up work (Ray's idle worker pool, ray.serve.llm's telemetry actor) finish
        time.sleep(settle_s)
        rounds: dict[str, dict[int, list[LevelResult]]] = {t: {c: [] for c in concurrency} for t in runners}

        def order(r: int) -> list[str]:
            return list(runners) if r % 2 == 0 else list(reversed(runners))

        for r in range(rounds_n):
            for c in concurrency:
                for target in order(r):
                    result = asyncio.run(run_level(runners[target].base_url, llm.name, PROMPT, c, per_client[c],
                                                   output_tokens, args.output_tokens_spread, seed=r))
                    rounds[target][c].append(result)
                    print(f"   round {r + 1} {target:9s} c={c:3d}: {result.tokens_per_s:7.1f} tok/s  "
                          f"TTFT p50 {result.ttft_p50_ms:7.1f} p99 {result.ttft_p99_ms:7.1f} ms  "
                          f"ITL p50 {result.itl_p50_ms:6.1f} p99 {result.itl_p99_ms:6.1f} ms  "
                          f"({result.requests} requests, {result.errors} errors)", flush=True)
    for target, by_level in rounds.items():
        report["results"][target] = [median_level(c, results) for c, results in by_level.items()]

    if "raw" in report["results"]:
        before_raw = {t: [order(r).index(t) < order(r).index("raw") for r in range(rounds_n)] for t in runners}
        report["vs_raw"] = {target: [compare(rounds[target][c], rounds["raw"][c], before_raw[target])
                                     for c in concurrency]
                            for target in runners if target != "raw"}
        for target, rows in report["vs_raw"].items():
            for row in rows:
                print(f"   median {target}/raw c={row['concurrency']:3d}: throughput x{row['throughput_ratio']:.3f} "
                      f"(rounds {row['throughput_ratio_per_round']}), TTFT p50 {row['ttft_p50_added_ms']:+.1f} ms "
                      f"(rounds {row['ttft_p50_added_ms_per_round']}), "
                      f"p99 {row['ttft_p99_added_ms']:+.1f} ms; by place in the round: {row['by_position']}")
    stem = "serve_bench" + ("_smoke" if args.smoke else "") + (f"_{args.tag}" if args.tag else "")
    write_results(stem, report, Path(args.out), plot)
    return report


if __name__ == "__main__":
    main()
