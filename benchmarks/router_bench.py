"""What the smart router costs: its decision time, and serving throughput with the router in the path
vs. naming the model directly, in the same run.

1. Decision time, in-process: ``RouterService.features`` + ``decide`` over the shipped
   ``configs/router.yaml`` (all four targets deployed) for a mix of prompts (short chat, code, a
   ~2,000-token document to summarise, a prompt with a card number); p50/p99 in microseconds.
2. Throughput: the shipped app (SmolLM2 + the Router deployment; no cloud credentials, so ``auto``
   picks the local model) under concurrent streaming clients sending ``model: smollm2-135m-instruct``
   (direct) and ``model: auto`` (routed). Both take the same in-process path to the engine; ``auto``
   adds the decision and the route's headers. Two ways to compare them:

   - ``interleaved`` (default): both kinds in one level, each client taking them in turn, so they meet
     the same load at the same moments; a kind's throughput is its requests' own rate (their tokens
     over the seconds they took) times the clients (``load.run_interleaved``). It compares each
     request's own path; CPU that one kind burns slows both alike, so only the other mode shows it.
   - ``alternating``: one level per kind, one after the other; the whole level's throughput, so any
     shared cost counts, and so does the machine's drift between the two levels (on 2 shared cores
     the same server's throughput moves by 20% from one minute to the next).

   Medians of the rounds, which swap the kind that goes (or starts) first; the ratio is routed / direct.

    python benchmarks/router_bench.py
    python benchmarks/router_bench.py --concurrency 8 32 --rounds 5 --mode alternating
    python benchmarks/router_bench.py --smoke --port PORT     # tiny model, seconds, on a running cluster

Writes benchmarks/results/router_bench.json and router_bench.png (``_smoke``, ``_alternating``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402
from benchmarks.load import PROMPT, PROMPT_WORDS, OnServe, run_interleaved, run_level, wait_ready  # noqa: E402

PROMPTS = {
    "short chat": "What is a good name for a cat?",
    "code": "Why does this fail?\n```python\ndef f(x):\n    return x[0]\nf([])\n```",
    "summarize 2k tokens": "Summarize the key points of this report:\n" + " ".join(PROMPT_WORDS * 20)[:8000],
    "card number (PII)": "My card 4111 1111 1111 1111 was charged twice, what can I do?",
}
GOALS = {"decision_p99_us": 1000, "throughput_ratio": 0.97}


def decision_times(iterations: int) -> dict:
    from ray_app.router.config import RouterConfig
    from ray_app.router.service import RouterService

    config = RouterConfig.load(ROOT / "configs" / "router.yaml")
    router = RouterService(config)
    # every cloud target deployed: the policy weighs all four (nothing is called here)
    router.set_deployed({t.name: None for t in config.targets if t.kind != "local"})
    results, everything = {}, []
    for name, text in PROMPTS.items():
        request = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 256}
        samples = []
        for i in range(iterations + 200):
            start = time.perf_counter_ns()
            router.decide(router.features(request))
            if i >= 200:  # warm-up
                samples.append((time.perf_counter_ns() - start) / 1000)
        samples.sort()
        everything += samples
        chain = router.decide(router.features(request)).chain
        results[name] = {"p50_us": round(samples[len(samples) // 2], 1),
                         "p99_us": round(samples[int(len(samples) * 0.99)], 1), "chain": chain}
        print(f"decision {name:22s} p50 {results[name]['p50_us']:7.1f} us  p99 {results[name]['p99_us']:7.1f} us"
              f"  -> {' > '.join(chain)}", flush=True)
    everything.sort()
    results["all"] = {"p50_us": round(everything[len(everything) // 2], 1),
                      "p99_us": round(everything[int(len(everything) * 0.99)], 1)}
    return results


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in report["decision"] if n != "all"]
    left.barh(names, [report["decision"][n]["p99_us"] for n in names], color="#fc8d62", label="p99")
    left.barh(names, [report["decision"][n]["p50_us"] for n in names], color="#66c2a5", label="p50")
    left.set_xlabel("routing decision (microseconds)")
    left.legend()
    levels = [str(c) for c in report["throughput"]]
    direct = [report["throughput"][c]["direct_tokens_per_s"] for c in levels]
    routed = [report["throughput"][c]["routed_tokens_per_s"] for c in levels]
    x = range(len(levels))
    right.bar([i - 0.2 for i in x], direct, 0.4, label="model named directly", color="#8da0cb")
    bars = right.bar([i + 0.2 for i in x], routed, 0.4, label="model: auto (router)", color="#a6d854")
    right.bar_label(bars, labels=[f"{report['throughput'][c]['ratio']:.2f}x" for c in levels])
    right.set_xticks(list(x), [f"c={c}" for c in levels])
    right.set_ylabel("output tokens/s")
    right.legend(loc="lower right")
    right.set_title(f"{report['settings']['model']} through the gateway")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bench_app(smoke: bool) -> tuple[dict, dict | None, str]:
    """The shipped app's LLM and router (the tiny model in smoke mode), nothing else."""
    application = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    app_args = copy.deepcopy(application["args"]) | {"embedders": [], "ocr": None, "knowledge": None,
                                                     "fine_tuning": None}
    router = yaml.safe_load((ROOT / "configs" / "router.yaml").read_text())
    if smoke:
        from tests.e2e.conftest import TINY

        app_args["llms"] = [copy.deepcopy(TINY)]
        local = next(t for t in router["targets"] if t["kind"] == "local")
        # the tiny model has no tool calling, so its target cannot offer it
        local |= {"model": "tiny-llama", "context_window": 512,
                  "capabilities": [c for c in local.get("capabilities", []) if c != "tools"]}
    else:
        app_args["llms"] = app_args["llms"][:1]
    app_args["router"]["config"] = router
    app_args["gateway"]["host_llm"] = app_args["llms"][0]["name"]  # as shipped: the gateway in the LLM's replica
    return app_args, application.get("runtime_env"), app_args["llms"][0]["name"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 clients, 1 round (tests)")
    parser.add_argument("--iterations", type=int, default=None, help="decisions timed per prompt (default 5000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 8 32; smoke 2")
    parser.add_argument("--mode", choices=["interleaved", "alternating"], default="interleaved",
                        help="both kinds in one level, each client taking them in turn (default), or one "
                             "level per kind, one after the other")
    parser.add_argument("--requests-per-client", type=int, default=None,
                        help="per level; interleaved: half direct, half routed (default 8; smoke 2)")
    parser.add_argument("--output-tokens", type=int, default=None, help="default 32; smoke 8")
    parser.add_argument("--rounds", type=int, default=None, help="default 3; smoke 1")
    parser.add_argument("--skip-serving", action="store_true", help="only time the decisions")
    parser.add_argument("--port", type=int, default=None,
                        help="deploy on the Ray cluster this process is connected to, whose proxy listens here")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    iterations = args.iterations or (200 if args.smoke else 5000)
    concurrency = args.concurrency or ([2] if args.smoke else [1, 8, 32])
    per_client = args.requests_per_client or (2 if args.smoke else 8)
    output_tokens = args.output_tokens or (8 if args.smoke else 32)
    rounds_n = args.rounds or (1 if args.smoke else 3)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    app_args, runtime_env, model = bench_app(args.smoke)
    report: dict = {"benchmark": "router_bench", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
                    "settings": {"model": model, "output_tokens": output_tokens, "rounds": rounds_n, "mode": args.mode,
                                 "requests_per_client": per_client,
                                 "iterations": iterations, "smoke": args.smoke},
                    "decision": decision_times(iterations), "throughput": {}, "goals": GOALS}
    if not args.skip_serving:
        with OnServe(app_args, "router_bench", runtime_env, port=args.port) as ours:
            for m in (model, "auto"):
                wait_ready(ours.base_url, m)
                asyncio.run(run_level(ours.base_url, m, PROMPT, 4, 1, 8))  # warm-up
            for c in concurrency:
                rounds: dict[str, list] = {model: [], "auto": []}
                for r in range(rounds_n):
                    order = [model, "auto"] if r % 2 == 0 else ["auto", model]  # who goes (or starts) first
                    if args.mode == "interleaved":
                        levels = asyncio.run(run_interleaved(ours.base_url, order, PROMPT, c, per_client,
                                                             output_tokens))
                    else:
                        levels = {m: asyncio.run(run_level(ours.base_url, m, PROMPT, c, per_client, output_tokens))
                                  for m in order}
                    for m in order:
                        rounds[m].append(levels[m])
                        print(f"c={c} round {r + 1} {m:22s} {levels[m].tokens_per_s:7.1f} tok/s  "
                              f"TTFT p50 {levels[m].ttft_p50_ms:.0f} ms  errors {levels[m].errors}", flush=True)
                direct = statistics.median(x.tokens_per_s for x in rounds[model])
                routed = statistics.median(x.tokens_per_s for x in rounds["auto"])
                report["throughput"][str(c)] = {
                    "direct_tokens_per_s": round(direct, 1), "routed_tokens_per_s": round(routed, 1),
                    "ratio": round(routed / direct, 3) if direct else None,
                    # each round's own ratio: the two kinds shared that level's clients and moments
                    "ratio_per_round": [round(a.tokens_per_s / b.tokens_per_s, 3)
                                        for a, b in zip(rounds["auto"], rounds[model]) if b.tokens_per_s],
                    "ttft_p50_ms_per_round": {m: [x.ttft_p50_ms for x in v] for m, v in rounds.items()},
                    "direct_ttft_p50_ms": statistics.median(x.ttft_p50_ms for x in rounds[model]),
                    "routed_ttft_p50_ms": statistics.median(x.ttft_p50_ms for x in rounds["auto"]),
                    "errors": sum(x.errors for x in rounds[model] + rounds["auto"]),
                    "per_round": {m: [x.tokens_per_s for x in v] for m, v in rounds.items()}}
    print(f"decision: p50 {report['decision']['all']['p50_us']} us, p99 {report['decision']['all']['p99_us']} us")
    for c, t in report["throughput"].items():
        print(f"c={c}: direct {t['direct_tokens_per_s']} tok/s, routed {t['routed_tokens_per_s']} tok/s "
              f"({t['ratio']}x; rounds {t['ratio_per_round']}), TTFT p50 {t['direct_ttft_p50_ms']:.0f} -> "
              f"{t['routed_ttft_p50_ms']:.0f} ms")
    stem = "router_bench" + ("_smoke" if args.smoke else "") + ("_alternating" if args.mode == "alternating" else "")
    write_results(stem, report, Path(args.out),
                  plot if report["throughput"] else None)
    return report


if __name__ == "__main__":
    main()
