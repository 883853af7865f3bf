"""What the smart router costs: its decision time, and serving throughput with the router in the path
vs. naming the model directly, in the same run.

1. Decision time, in-process: ``RouterService.features`` + ``decide`` over the shipped
   ``configs/router.yaml`` (all four targets deployed) for a mix of prompts (short chat, code, a
   ~2,000-token document to summarise, a prompt with a card number); p50/p99 in microseconds.
2. Throughput: the shipped app (SmolLM2 + the Router deployment; no cloud credentials, so ``auto``
   picks the local model) under concurrent streaming clients, alternating rounds of ``model:
   smollm2-135m-instruct`` (gateway -> LLM deployment) and ``model: auto`` (gateway -> Router ->
   LLM deployment). Medians of the rounds; the ratio is routed / direct.

    python benchmarks/router_bench.py
    python benchmarks/router_bench.py --concurrency 1 8 --rounds 2

Writes benchmarks/results/router_bench.json and router_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_bench import PROMPT_WORDS, Ours, run_level, wait_ready  # noqa: E402

PROMPTS = {
    "short chat": "What is a good name for a cat?",
    "code": "Why does this fail?\n```python\ndef f(x):\n    return x[0]\nf([])\n```",
    "summarize 2k tokens": "Summarize the key points of this report:\n" + " ".join(PROMPT_WORDS * 20)[:8000],
    "card number (PII)": "My card 4111 1111 1111 1111 was charged twice, what can I do?",
}


def decision_times(iterations: int) -> dict:
    from ray_app.router.config import RouterConfig
    from ray_app.router.ledger import Ledger
    from ray_app.router.providers import Provider
    from ray_app.router.service import RouterService

    config = RouterConfig.load(ROOT / "configs" / "router.yaml")
    with tempfile.TemporaryDirectory() as tmp, Ledger(Path(tmp) / "ledger.sqlite") as ledger:
        # every target deployed: the policy weighs all four (the providers are never called here)
        router = RouterService(config, {t.name: Provider(t) for t in config.targets}, ledger)
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
    right.set_title("SmolLM2-135M through the gateway")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5000, help="Decisions timed per prompt.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-serving", action="store_true", help="Only time the decisions.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")

    report: dict = {"benchmark": "router", "decision": decision_times(args.iterations), "throughput": {},
                    "targets": {"decision_p99_us": 1000, "throughput_ratio": 0.95}}
    if not args.skip_serving:
        application = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
        app_args = copy.deepcopy(application["args"]) | {"embedders": [], "ocr": None, "knowledge": None}
        model = app_args["llms"][0]["name"]
        prompt = " ".join(PROMPT_WORDS[:100])
        with tempfile.TemporaryDirectory() as tmp:
            router = yaml.safe_load((ROOT / "configs" / "router.yaml").read_text())
            router["keys"]["ledger_path"] = str(Path(tmp) / "ledger.sqlite")
            app_args["router"]["config"] = router
            with Ours(app_args, application.get("runtime_env")) as ours:
                wait_ready(ours.base_url, model)
                for m in (model, "auto"):  # warm-up
                    asyncio.run(run_level(ours.base_url, m, prompt, 4, 1, 8))
                for c in args.concurrency:
                    rounds: dict[str, list] = {model: [], "auto": []}
                    for r in range(args.rounds):
                        for m in ((model, "auto") if r % 2 == 0 else ("auto", model)):
                            level = asyncio.run(run_level(ours.base_url, m, prompt, c, args.requests_per_client,
                                                          args.output_tokens))
                            rounds[m].append(level)
                            print(f"c={c} round {r + 1} {m:22s} {level.tokens_per_s:7.1f} tok/s  "
                                  f"TTFT p50 {level.ttft_p50_ms:.0f} ms  errors {level.errors}", flush=True)
                    direct = statistics.median(x.tokens_per_s for x in rounds[model])
                    routed = statistics.median(x.tokens_per_s for x in rounds["auto"])
                    report["throughput"][str(c)] = {
                        "direct_tokens_per_s": round(direct, 1), "routed_tokens_per_s": round(routed, 1),
                        "ratio": round(routed / direct, 3),
                        "direct_ttft_p50_ms": statistics.median(x.ttft_p50_ms for x in rounds[model]),
                        "routed_ttft_p50_ms": statistics.median(x.ttft_p50_ms for x in rounds["auto"]),
                        "errors": sum(x.errors for x in rounds[model] + rounds["auto"])}
        report |= {"model": model, "output_tokens": args.output_tokens, "rounds": args.rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["throughput"]:
        plot(report, out / "router_bench.png")
    print(f"decision: p50 {report['decision']['all']['p50_us']} us, p99 {report['decision']['all']['p99_us']} us")
    for c, t in report["throughput"].items():
        print(f"c={c}: direct {t['direct_tokens_per_s']} tok/s, routed {t['routed_tokens_per_s']} tok/s "
              f"({t['ratio']:.3f}x), TTFT p50 {t['direct_ttft_p50_ms']:.0f} -> {t['routed_ttft_p50_ms']:.0f} ms")


if __name__ == "__main__":
    main()
