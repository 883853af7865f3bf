"""Serving benchmark: our OpenAI endpoint (Gateway -> ray.serve.llm LLMServer -> vLLM) against
``vllm serve`` (vLLM's own OpenAI server) on the same model and engine settings, in the same run.

Concurrent streaming chat clients send a fixed prompt and read a fixed number of output tokens
(``ignore_eos``). Reported per concurrency level: output tokens/s, time to first token (TTFT) p50/p99,
inter-token latency (ITL, gaps between streamed tokens) p50/p99, and the ratios ours/raw.

    python benchmarks/serve_bench.py                      # 1, 8 and 32 clients, both targets
    python benchmarks/serve_bench.py --concurrency 1 8 --requests-per-client 2 --targets ours

Writes benchmarks/results/serve_bench.json and serve_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_WORDS = ("Ray Serve routes each request to a replica of the model. " * 40).split()


@dataclass
class RequestResult:
    ttft_s: float
    itls_s: list[float]
    output_tokens: int
    seconds: float


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    errors: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def count_prompt_tokens(tokenizer, prompt: str) -> int:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, output_tokens: int) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": output_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    token_times: list[float] = []
    usage_tokens = 0
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage") and not chunk.get("choices"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                token_times.append(now)
    end = time.perf_counter()
    itls = [b - a for a, b in zip(token_times, token_times[1:])]
    return RequestResult(token_times[0] - start, itls, usage_tokens, end - start)


async def run_level(base_url: str, model: str, prompt: str, concurrency: int, requests_per_client: int,
                    output_tokens: int) -> LevelResult:
    url = base_url + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as http:
        results: list[RequestResult] = []
        errors = 0

        async def client() -> None:
            nonlocal errors
            for _ in range(requests_per_client):
                try:
                    results.append(await one_request(http, url, model, prompt, output_tokens))
                except (httpx.HTTPError, KeyError, IndexError):
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = [r.ttft_s * 1000 for r in results]
    itls = [x * 1000 for r in results for x in r.itls_s]
    tokens = sum(r.output_tokens for r in results)
    return LevelResult(
        concurrency=concurrency, requests=len(results), wall_s=round(wall, 2), output_tokens=tokens,
        tokens_per_s=round(tokens / wall, 2),
        ttft_p50_ms=round(percentile(ttfts, 50), 1), ttft_p99_ms=round(percentile(ttfts, 99), 1),
        itl_p50_ms=round(percentile(itls, 50), 1), itl_p99_ms=round(percentile(itls, 99), 1),
        errors=errors,
    )


def median_level(concurrency: int, results: list[LevelResult]) -> dict:
    """The median of each figure over the rounds, with every round kept for the record."""
    keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "wall_s")
    level = {"concurrency": concurrency, "rounds": len(results),
             "requests": sum(r.requests for r in results), "errors": sum(r.errors for r in results),
             "output_tokens": sum(r.output_tokens for r in results)}
    level |= {k: round(statistics.median(getattr(r, k) for r in results), 1) for k in keys}
    level["tokens_per_s_range"] = [min(r.tokens_per_s for r in results), max(r.tokens_per_s for r in results)]
    level["per_round"] = [{k: getattr(r, k) for k in keys} for r in results]
    return level


def wait_ready(base_url: str, model: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.post(base_url + "/v1/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{base_url} not ready after {timeout_s}s")


class RawVLLM:
    """``vllm serve`` (vLLM's OpenAI api_server) on the same model with the same engine settings."""

    def __init__(self, model_name: str, model_path: str, llm: dict):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        kwargs = llm.get("engine_kwargs", {})
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
                    "--served-model-name", model_name, "--host", "127.0.0.1", "--port", str(self.port),
                    "--dtype", kwargs.get("dtype", "float32"), "--max-model-len", str(kwargs.get("max_model_len", 2048)),
                    "--disable-uvicorn-access-log"]
        if kwargs.get("enforce_eager"):
            self.cmd.append("--enforce-eager")
        self.env = os.environ | {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(llm.get("cpu_kv_cache_gib", 2)),
                                 "HF_HUB_OFFLINE": "1"}

    def __enter__(self) -> "RawVLLM":
        self.log = open(ROOT / "benchmarks" / "results" / "vllm_serve.log", "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Ours:
    """The shipped serve_config.yaml application on a local Ray cluster."""

    def __init__(self, args: dict, runtime_env: dict):
        self.args, self.runtime_env = args, runtime_env
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Ours":
        import ray
        from ray import serve

        from ray_app.serve.app import build_app

        ray.init(num_cpus=4, include_dashboard=False, runtime_env=self.runtime_env, logging_level="ERROR",
                 log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(build_app(self.args), name="ray_app", route_prefix="/")
        return self

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for target, style, color in (("ours", "o-", "tab:blue"), ("raw", "s--", "tab:orange")):
        levels = report["results"].get(target)
        if not levels:
            continue
        xs = [lv["concurrency"] for lv in levels]
        label = "ray_app gateway" if target == "ours" else "vllm serve"
        tps = [lv["tokens_per_s"] for lv in levels]
        spread = [[t - lv["tokens_per_s_range"][0] for t, lv in zip(tps, levels)],
                  [lv["tokens_per_s_range"][1] - t for t, lv in zip(tps, levels)]]
        axes[0].errorbar(xs, tps, yerr=spread, fmt=style, color=color, capsize=3, label=f"{label} (median, range)")
        for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(xs, [lv[f"{key}_p50_ms"] for lv in levels], style, color=color, label=f"{label} p50")
            ax.plot(xs, [lv[f"{key}_p99_ms"] for lv in levels], style, color=color, alpha=0.35, label=f"{label} p99")
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
                 f"{s['prompt_tokens']} prompt + {s['output_tokens']} output tokens per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "serve_config.yaml"), help="Serve config to benchmark")
    parser.add_argument("--model", default=None, help="LLM name in the config (default: its first LLM)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=None,
                        help="requests each client sends (default: 8 at 1 client, 4 at 8, 2 at 32)")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--targets", nargs="+", choices=["ours", "raw"], default=["raw", "ours"])
    parser.add_argument("--stream-batching-ms", type=float, default=None,
                        help="override the LLM's stream_batching_interval_ms for `ours`")
    parser.add_argument("--ray-env", nargs="*", default=["RAY_SERVE_THROUGHPUT_OPTIMIZED=1"], metavar="KEY=VALUE",
                        help="environment for the Ray cluster behind `ours` (default: the README's serving mode)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (medians reported)")
    parser.add_argument("--settle-s", type=float, default=15.0, help="idle time after warm-up, before measuring")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from ray_app.serve.app import resolve_sources
    from ray_app.serve.config import AppConfig

    application = yaml.safe_load(Path(args.config).read_text())["applications"][0]
    app_args = copy.deepcopy(application["args"])
    config = AppConfig.load(app_args)
    llm = next(m for m in config.llms if args.model in (None, m.name))
    app_args["llms"] = [m for m in app_args["llms"] if m["name"] == llm.name]
    app_args["embedders"] = []  # the benchmark measures the LLM path only
    if args.stream_batching_ms is not None:
        app_args["llms"][0]["stream_batching_interval_ms"] = args.stream_batching_ms
    ray_env = dict(kv.split("=", 1) for kv in args.ray_env)
    os.environ.update(ray_env)  # inherited by the local Ray cluster `ours` starts
    model_path = resolve_sources(config)[llm.name]

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt = " ".join(PROMPT_WORDS[:100])
    prompt_tokens = count_prompt_tokens(tokenizer, prompt)
    per_client = {1: 8, 8: 4, 32: 2}

    report = {
        "benchmark": "serve_bench",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpu": platform.processor() or _cpu_name(), "cores": os.cpu_count(), "gpu": None},
        "settings": {"model": llm.name, "engine_kwargs": llm.engine_kwargs, "prompt_tokens": prompt_tokens,
                     "output_tokens": args.output_tokens,
                     "stream_batching_interval_ms": app_args["llms"][0].get("stream_batching_interval_ms"),
                     "ray_env": ray_env},
        "results": {},
    }
    # Both servers stay up and the rounds alternate between them, so slow drift of this shared
    # machine hits both alike; each figure is the median over the rounds (idle, the other server
    # costs a few percent of a core: Ray's control loops, vLLM's idle engine).
    with contextlib.ExitStack() as stack:
        runners = {}
        for target in args.targets:
            runner = (RawVLLM(llm.name, model_path, next(m for m in application["args"]["llms"]
                                                         if m["name"] == llm.name))
                      if target == "raw" else Ours(app_args, application.get("runtime_env")))
            print(f"== {target}: starting ({'vllm serve' if target == 'raw' else 'ray_app on Ray Serve'})", flush=True)
            runners[target] = stack.enter_context(runner)
            wait_ready(runner.base_url, llm.name)
        for target, runner in runners.items():
            # warm up at the highest concurrency before anything is measured
            asyncio.run(run_level(runner.base_url, llm.name, prompt, max(args.concurrency), 1, 8))
        # let one-off start-up work (Ray's idle worker pool, ray.serve.llm's telemetry actor) finish
        time.sleep(args.settle_s)
        rounds: dict[str, dict[int, list[LevelResult]]] = {t: {c: [] for c in args.concurrency} for t in runners}
        for r in range(args.rounds):
            for c in args.concurrency:
                order = list(runners) if r % 2 == 0 else list(reversed(runners))
                for target in order:
                    n = args.requests_per_client or per_client.get(c, 1)
                    result = asyncio.run(run_level(runners[target].base_url, llm.name, prompt, c, n, args.output_tokens))
                    rounds[target][c].append(result)
                    print(f"   round {r + 1} {target:4s} c={c:3d}: {result.tokens_per_s:7.1f} tok/s  "
                          f"TTFT p50 {result.ttft_p50_ms:7.1f} p99 {result.ttft_p99_ms:7.1f} ms  "
                          f"ITL p50 {result.itl_p50_ms:6.1f} p99 {result.itl_p99_ms:6.1f} ms  "
                          f"({result.requests} requests, {result.errors} errors)", flush=True)
    for target, by_level in rounds.items():
        report["results"][target] = [median_level(c, results) for c, results in by_level.items()]

    if {"ours", "raw"} <= set(report["results"]):
        report["ours_vs_raw"] = [
            {"concurrency": o["concurrency"],
             "throughput_ratio": round(o["tokens_per_s"] / r["tokens_per_s"], 3),
             "ttft_p50_added_ms": round(o["ttft_p50_ms"] - r["ttft_p50_ms"], 1),
             "ttft_p99_added_ms": round(o["ttft_p99_ms"] - r["ttft_p99_ms"], 1)}
            for o, r in zip(report["results"]["ours"], report["results"]["raw"])]
        for row in report["ours_vs_raw"]:
            print(f"   median ours/raw c={row['concurrency']:3d}: throughput x{row['throughput_ratio']:.3f}, "
                  f"TTFT p50 {row['ttft_p50_added_ms']:+.1f} ms, p99 {row['ttft_p99_added_ms']:+.1f} ms")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "serve_bench" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
