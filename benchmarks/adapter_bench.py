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
    python benchmarks/adapter_bench.py --smoke --port PORT     # tiny model, seconds, on a running cluster

Writes benchmarks/results/adapter_bench.json and adapter_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402
from benchmarks.load import PROMPT, OnServe, run_level, wait_ready  # noqa: E402

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
    ax.set_title(f"{report['model']}, {report['concurrency']} concurrent streams x {report['output_tokens']} tokens: "
                 "LoRA adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 clients, 1 round (tests)")
    parser.add_argument("--concurrency", type=int, default=None, help="default 8; smoke 2")
    parser.add_argument("--requests-per-client", type=int, default=None, help="default 4; smoke 1")
    parser.add_argument("--output-tokens", type=int, default=None, help="default 64; smoke 8")
    parser.add_argument("--rounds", type=int, default=None, help="default 3; smoke 1")
    parser.add_argument("--port", type=int, default=None,
                        help="deploy on the Ray cluster this process is connected to, whose proxy listens here")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    concurrency = args.concurrency or (2 if args.smoke else 8)
    per_client = args.requests_per_client or (1 if args.smoke else 4)
    output_tokens = args.output_tokens or (8 if args.smoke else 64)
    rounds_n = args.rounds or (1 if args.smoke else 3)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ray_app.serve.app import resolve_sources
    from ray_app.serve.config import AppConfig

    application = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    app_args = copy.deepcopy(application["args"])
    # the gateway as a deployment of its own: the base and the LoRA model take the same path (a handle
    # call), so their figures compare
    app_args["gateway"]["host_llm"] = None
    if args.smoke:
        from tests.e2e.conftest import TINY

        app_args["llms"] = [copy.deepcopy(TINY)]
    base = {k: v for k, v in app_args["llms"][0].items() if k != "adapters"}
    model_path = resolve_sources(AppConfig.load(app_args | {"llms": [base]}))[base["name"]]
    with tempfile.TemporaryDirectory(prefix="adapters-") as tmp:
        local = make_adapters(model_path, Path(tmp))
        lora = copy.deepcopy(base) | {"name": f"{base['name']}-lora",
                                      "adapters": {"max_per_replica": 4, "max_rank": 8, "local": local}}
        app_args |= {"llms": [base, lora], "embedders": [], "ocr": None, "knowledge": None, "router": None,
                     "fine_tuning": None}
        configs = {"base (LoRA off)": [base["name"]], "0 adapters (LoRA on)": [lora["name"]],
                   "1 adapter": [f"{lora['name']}:{ADAPTERS[0]}"],
                   "4 adapters": [f"{lora['name']}:{a}" for a in ADAPTERS]}
        rounds: dict[str, list] = {name: [] for name in configs}
        with OnServe(app_args, "adapter_bench", application.get("runtime_env"), port=args.port) as ours:
            for models in configs.values():
                for model in models:
                    wait_ready(ours.base_url, model)
            for models in configs.values():  # warm-up: every adapter loaded before measuring
                asyncio.run(run_level(ours.base_url, models, PROMPT, concurrency, 1, 8))
            time.sleep(0 if args.smoke else 10)
            for r in range(rounds_n):
                order = list(configs) if r % 2 == 0 else list(reversed(configs))
                for name in order:
                    result = asyncio.run(run_level(ours.base_url, configs[name], PROMPT, concurrency, per_client,
                                                   output_tokens))
                    rounds[name].append(result)
                    print(f"round {r + 1} {name:22s} {result.tokens_per_s:7.1f} tok/s  TTFT p50 "
                          f"{result.ttft_p50_ms:.0f} ms  errors {result.errors}", flush=True)
    reference = statistics.median(x.tokens_per_s for x in rounds["base (LoRA off)"])
    results = {}
    for name, values in rounds.items():
        tps = statistics.median(x.tokens_per_s for x in values)
        results[name] = {"tokens_per_s": round(tps, 1), "vs_base": round(tps / reference, 3) if reference else None,
                         "ttft_p50_ms": statistics.median(x.ttft_p50_ms for x in values),
                         "errors": sum(x.errors for x in values), "per_round": [x.tokens_per_s for x in values]}
    report = {"benchmark": "adapter_bench", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
              "model": base["name"], "concurrency": concurrency, "output_tokens": output_tokens, "rounds": rounds_n,
              "adapter_rank": 8, "smoke": args.smoke, "results": results, "target_4_adapters_vs_base": 0.85}
    for name, r in results.items():
        print(f"{name:22s} {r['tokens_per_s']:7.1f} tok/s  {r['vs_base']}x base")
    write_results("adapter_bench" + ("_smoke" if args.smoke else ""), report, Path(args.out), plot)
    return report


if __name__ == "__main__":
    main()
