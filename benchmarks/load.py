"""Streaming load and the servers it is pointed at, shared by the serving benchmarks (serve, router,
adapters): concurrent chat clients that read a fixed number of tokens, their figures, the app on Ray
Serve (on the cluster this process is connected to, or one it starts) and ``vllm serve`` as the baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.common import free_port, percentile, prepare_local_ray
from ray_app.serve import SERVING_ENV

ROOT = Path(__file__).resolve().parents[1]
PROMPT_WORDS = ("Ray Serve routes each request to a replica of the model. " * 40).split()
PROMPT = " ".join(PROMPT_WORDS[:100])

__all__ = ["PROMPT", "PROMPT_WORDS", "LevelResult", "OnServe", "RawVLLM", "RequestResult", "count_prompt_tokens",
           "median_level", "one_request", "output_length", "run_interleaved", "run_level", "wait_ready"]


@dataclass
class RequestResult:
    model: str
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


def count_prompt_tokens(tokenizer, prompt: str) -> int:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def output_length(mean: int, spread: float, seed: int, client: int, request: int) -> int:
    """The output tokens client ``client`` asks for in its ``request``-th request: ``mean``, or with a
    ``spread`` drawn uniformly from ``mean * (1 ± spread)``. The draw depends only on (seed, client,
    request), so every server measured with the same seed is asked for the same lengths.

    Equal lengths keep a closed loop of clients in lockstep: their streams end in the same engine step
    and the next requests arrive together, so TTFT then measures where each wave's arrivals fall
    against the engine's steps as much as the server. Unequal lengths, as real traffic has, break the
    waves up."""
    if not spread:
        return mean
    low, high = max(1, round(mean * (1 - spread))), round(mean * (1 + spread))
    return random.Random(f"{seed}:{client}:{request}").randint(low, high)


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
    return RequestResult(model, token_times[0] - start, itls, usage_tokens, end - start)


async def _drive(base_url: str, pick: Callable[[int, int], str], prompt: str, concurrency: int,
                 requests_per_client: int, output_tokens: int, spread: float = 0.0,
                 seed: int = 0) -> tuple[list[RequestResult], list[str], float]:
    """``concurrency`` clients, each sending ``requests_per_client`` requests one after another; client
    ``i``'s ``j``-th asks for ``pick(i, j)`` and ``output_length(output_tokens, spread, seed, i, j)``
    tokens. The results, the models of the failed requests, the wall time."""
    url = base_url + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    results: list[RequestResult] = []
    failed: list[str] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as http:

        async def client(i: int) -> None:
            for j in range(requests_per_client):
                model = pick(i, j)
                try:
                    results.append(await one_request(http, url, model, prompt,
                                                     output_length(output_tokens, spread, seed, i, j)))
                except (httpx.HTTPError, KeyError, IndexError):
                    failed.append(model)

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    return results, failed, wall


def _level(concurrency: int, results: list[RequestResult], errors: int, wall: float,
           tokens_per_s: float) -> LevelResult:
    ttfts = [r.ttft_s * 1000 for r in results]
    itls = [x * 1000 for r in results for x in r.itls_s]
    return LevelResult(
        concurrency=concurrency, requests=len(results), wall_s=round(wall, 2),
        output_tokens=sum(r.output_tokens for r in results), tokens_per_s=round(tokens_per_s, 2),
        ttft_p50_ms=round(percentile(ttfts, 50), 1), ttft_p99_ms=round(percentile(ttfts, 99), 1),
        itl_p50_ms=round(percentile(itls, 50), 1), itl_p99_ms=round(percentile(itls, 99), 1),
        errors=errors,
    )


async def run_level(base_url: str, models: str | list[str], prompt: str, concurrency: int, requests_per_client: int,
                    output_tokens: int, spread: float = 0.0, seed: int = 0) -> LevelResult:
    """``concurrency`` clients, each sending ``requests_per_client`` requests one after another; client
    ``i`` asks for ``models[i % len(models)]`` (one model, or a mix such as several adapters), and for
    output lengths as ``output_length`` draws them."""
    models = [models] if isinstance(models, str) else models
    results, failed, wall = await _drive(base_url, lambda i, j: models[i % len(models)], prompt, concurrency,
                                         requests_per_client, output_tokens, spread, seed)
    return _level(concurrency, results, len(failed), wall, sum(r.output_tokens for r in results) / wall)


async def run_interleaved(base_url: str, models: list[str], prompt: str, concurrency: int,
                          requests_per_client: int, output_tokens: int) -> dict[str, LevelResult]:
    """One level in which every client takes the models in turn, request by request (client ``i``
    starts with ``models[i % len(models)]``), so each model's requests meet the same load at the same
    moments: two servers' paths compared without the drift between rounds. A model's ``tokens_per_s``
    is its requests' own rate (their tokens over the seconds they took) times ``concurrency``: what
    the level would give if every request were that model's."""
    results, failed, wall = await _drive(base_url, lambda i, j: models[(i + j) % len(models)], prompt,
                                         concurrency, requests_per_client, output_tokens)
    levels = {}
    for model in models:
        mine = [r for r in results if r.model == model]
        busy = sum(r.seconds for r in mine)
        rate = sum(r.output_tokens for r in mine) / busy * concurrency if busy else 0.0
        levels[model] = _level(concurrency, mine, failed.count(model), wall, rate)
    return levels


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

    def __init__(self, model_name: str, model_path: str, llm: dict, log: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        kwargs = llm.get("engine_kwargs", {})
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
                    "--served-model-name", model_name, "--host", "127.0.0.1", "--port", str(self.port),
                    "--dtype", kwargs.get("dtype", "float32"),
                    "--max-model-len", str(kwargs.get("max_model_len", 2048)), "--disable-uvicorn-access-log"]
        if kwargs.get("enforce_eager"):
            self.cmd.append("--enforce-eager")
        if llm.get("adapters"):  # LoRA layers in every forward pass, adapter or not: the same engine as ours
            from ray_app.serve.config import AdapterServeSettings

            adapters = AdapterServeSettings.model_validate(llm["adapters"])
            self.cmd += ["--enable-lora", "--max-loras", str(adapters.max_per_replica),
                         "--max-lora-rank", str(adapters.max_rank)]
        if llm.get("tools"):  # the same tool calling as ours: the parser runs on every streamed token
            from ray_app.serve.config import ToolCallingSettings

            tools = ToolCallingSettings.model_validate(llm["tools"])
            self.cmd += ["--tool-call-parser", tools.parser, "--tool-strict-level", tools.strict]
            self.cmd += ["--enable-auto-tool-choice"] if tools.auto_tool_choice else []
            self.cmd += ["--chat-template", str(tools.template_file())] if tools.chat_template else []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
            "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(llm.get("cpu_kv_cache_gib", 2)),
            "HF_HUB_OFFLINE": "1"}

    def __enter__(self) -> RawVLLM:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class OnServe:
    """An application of ours on Ray Serve under its own name and route prefix.

    On the cluster this process is already connected to (the test session's: a benchmark's smoke run
    shares it, ``port`` is its proxy), or on a local Ray it starts, in the README's serving mode, and
    stops (``num_cpus`` logical CPUs).
    Its spend ledger is a temporary file unless the args name one: a benchmark's requests are not a
    user's spend.
    """

    def __init__(self, app_args: dict, name: str, runtime_env: dict | None = None, port: int | None = None,
                 num_cpus: int = 4):
        self.app_args, self.name, self.runtime_env, self.num_cpus = app_args, name, runtime_env, num_cpus
        self.port = port
        self.started_ray = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.name}"

    def __enter__(self) -> OnServe:
        import ray
        from ray import serve

        from ray_app.serve.app import build_app

        if not ray.is_initialized():
            self.started_ray = True
            self.port = self.port or free_port()
            prepare_local_ray(SERVING_ENV)  # the README's serving mode
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, runtime_env=self.runtime_env,
                     logging_level="ERROR", log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        elif self.port is None:
            raise SystemExit("--port: the HTTP port of the running cluster's Serve proxy")
        self.ledger_dir = tempfile.mkdtemp(prefix=f"{self.name}-ledger-")
        auth = dict(self.app_args.get("auth") or {})
        auth.setdefault("ledger_path", str(Path(self.ledger_dir) / "ledger.sqlite"))
        serve.run(build_app(self.app_args | {"auth": auth}), name=self.name, route_prefix=f"/{self.name}")
        return self

    def __exit__(self, *exc) -> None:
        from ray import serve

        serve.delete(self.name)
        shutil.rmtree(self.ledger_dir, ignore_errors=True)
        if self.started_ray:
            import ray

            serve.shutdown()
            ray.shutdown()
