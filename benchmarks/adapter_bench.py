"""Serving throughput with LoRA adapters: 0, 1 and 4 adapters active against the base model, through
our endpoint, in the same run.

Two deployments of SmolLM2-135M-Instruct run side by side in one Serve app: ``base`` (LoRA off) and
``lora`` (``adapters:`` on, four rank-8 adapters on q/k/v/o served as local adapters). Concurrent
streaming clients send a fixed prompt and read a fixed number of tokens (``ignore_eos``); for "4
adapters" each client asks for a different adapter, so every engine batch mixes four. The adapters
are randomly initialised (throughput does not depend on what they learned). Rounds alternate between
the configurations and the medians are reported.

    python benchmarks/adapter_bench.py
    python benchmarks/adapter_bench.py --concurrency 4 --rounds 2

Writes benchmarks/results/adapter_bench.json and adapter_bench.png.
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

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_bench import PROMPT_WORDS, Ours, one_request, wait_ready  # noqa: E402

ADAPTERS = [f"style{i}" for i in range(4)]


def make_adapters(model_path: str, folder: Path) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
        peft.save_pretrained(folder / name)
        out[name] = str(folder / name)
    return out


async def run_mix(base_url: str, models: list[str], prompt: str, concurrency: int, per_client: int, tokens: int) -> dict:
    url = base_url + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as http:
        results = []

        async def client(i: int) -> None:
            for _ in range(per_client):
                results.append(await one_request(http, url, models[i % len(models)], prompt, tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    produced = sum(r.output_tokens for r in results)
    ttfts = sorted(r.ttft_s * 1000 for r in results)
    return {"tokens_per_s": round(produced / wall, 2), "ttft_p50_ms": round(ttfts[len(ttfts) // 2], 1),
            "requests": len(results)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, [rows[n]["tokens_per_s"] for n in names], color=["#8da0cb", "#a6d854", "#66c2a5", "#fc8d62"])
    ax.bar_label(bars, labels=[f"{rows[n]['tokens_per_s']:.0f}\n({rows[n]['vs_base']:.2f}x)" for n in names])
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(0, max(rows[n]["tokens_per_s"] for n in names) * 1.2)
    ax.set_title(f"SmolLM2-135M, {report['concurrency']} concurrent streams x {report['output_tokens']} tokens: LoRA adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")

    from ray_app.serve.app import resolve_sources
    from ray_app.serve.config import AppConfig

    application = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    app_args = copy.deepcopy(application["args"])
    smol = app_args["llms"][0]
    model_path = resolve_sources(AppConfig.load(app_args))[smol["name"]]
    prompt = " ".join(PROMPT_WORDS[:100])
    with tempfile.TemporaryDirectory(prefix="adapters-") as tmp:
        local = make_adapters(model_path, Path(tmp))
        lora = copy.deepcopy(smol) | {"name": "smollm2-lora",
                                      "adapters": {"max_per_replica": 4, "max_rank": 8, "local": local}}
        app_args |= {"llms": [smol, lora], "embedders": [], "ocr": None, "knowledge": None}
        configs = {"base (LoRA off)": [smol["name"]], "0 adapters (LoRA on)": ["smollm2-lora"],
                   "1 adapter": [f"smollm2-lora:{ADAPTERS[0]}"],
                   "4 adapters": [f"smollm2-lora:{a}" for a in ADAPTERS]}
        rounds: dict[str, list[dict]] = {name: [] for name in configs}
        with Ours(app_args, application.get("runtime_env")) as ours:
            for models in configs.values():
                for model in models:
                    wait_ready(ours.base_url, model)
            for models in configs.values():  # warm-up: every adapter loaded before measuring
                asyncio.run(run_mix(ours.base_url, models, prompt, args.concurrency, 1, 8))
            time.sleep(10)
            for r in range(args.rounds):
                order = list(configs) if r % 2 == 0 else list(reversed(configs))
                for name in order:
                    result = asyncio.run(run_mix(ours.base_url, configs[name], prompt, args.concurrency,
                                                 args.requests_per_client, args.output_tokens))
                    rounds[name].append(result)
                    print(f"round {r + 1} {name:22s} {result['tokens_per_s']:7.1f} tok/s  TTFT p50 {result['ttft_p50_ms']:.0f} ms",
                          flush=True)
    base = statistics.median(x["tokens_per_s"] for x in rounds["base (LoRA off)"])
    results = {}
    for name, values in rounds.items():
        tps = statistics.median(x["tokens_per_s"] for x in values)
        results[name] = {"tokens_per_s": round(tps, 1), "vs_base": round(tps / base, 3),
                         "ttft_p50_ms": statistics.median(x["ttft_p50_ms"] for x in values),
                         "per_round": [x["tokens_per_s"] for x in values]}
    report = {"benchmark": "adapters", "model": smol["name"], "concurrency": args.concurrency,
              "output_tokens": args.output_tokens, "rounds": args.rounds, "adapter_rank": 8,
              "results": results, "target_4_adapters_vs_base": 0.85}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "adapter_bench.png")
    for name, r in results.items():
        print(f"{name:22s} {r['tokens_per_s']:7.1f} tok/s  {r['vs_base']:.3f}x base")


if __name__ == "__main__":
    main()
