"""Faults under load: concurrent clients for a fixed time while the LLM replica, the vector-store actor
and the Router replica are each killed once.

Clients, each of one kind (streaming and non-streaming chat on the local model, chat on a cloud route
answered by a loopback OpenAI server, retrieval), run for ``--duration`` seconds; early on the LLM
replica is killed (it takes longest to come back), past half the store actor's process, at three
quarters the Router replica. Every request ends in one of:

- answered: 200, a whole answer (a stream ends with ``[DONE]`` and carries no error event);
- refused clearly: 503 with ``retry-after`` (or a stream error event naming the unavailable model);
- lost: no answer in time, a connection dropped, a 500, or a stream cut without ``[DONE]``.

Each client has its own API key (the app is in open mode, so a key only identifies its caller), so
answered requests and ledger rows can be compared per client. Reported: the counts, ledger rows vs
answered requests, p99 latency before, during and after each kill, and how long each fault took to
recover (from the kill to the first answer after the last refusal of that kind).

    python benchmarks/chaos_bench.py                     # SmolLM2, 8 clients, 180 s
    python benchmarks/chaos_bench.py --smoke             # tiny model, 4 clients, 80 s (the test suite)

Writes benchmarks/results/chaos_bench.json and chaos_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, percentile, write_results  # noqa: E402
from benchmarks.load import wait_ready  # noqa: E402

APP = "ray_app_chaos"
KINDS = ("stream", "chat", "cloud", "retrieve")


@dataclass
class Sample:
    kind: str
    client: int
    started: float  # seconds since the run started
    seconds: float
    outcome: str  # answered | refused | lost
    detail: str = ""


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    kills: dict[str, float] = field(default_factory=dict)  # fault -> seconds since the start


def app_args(model: str, router: dict, ledger: str, smoke: bool) -> dict:
    shipped = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    args = copy.deepcopy(shipped)
    if smoke:
        args["llms"] = [{"name": "tiny-llama", "source": "tiny-llama", "cpu_kv_cache_gib": 1,
                         "engine_kwargs": {"dtype": "float32", "enforce_eager": True, "max_model_len": 512},
                         "replicas": {"num_replicas": 1, "max_ongoing_requests": 64}}]
    args["llms"] = [m for m in args["llms"] if m["name"] == model]
    # The gateway as a deployment of its own, which outlives the LLM replica killed here: what is measured
    # is how it answers while the model is gone. Hosted in that replica (the shipped `host_llm`), the
    # gateway would go down with it, and HAProxy would refuse its requests until the replica is back.
    args["gateway"]["host_llm"] = None
    args["router"]["config"] = router
    args["auth"] = {"mode": "open", "ledger_path": ledger, "default_rpm": 100_000, "default_tpm": 100_000_000}
    args["gateway"]["status_poll_interval_s"] = 0.5
    return args


def router_config(model: str, cloud_url: str, key_env: str) -> dict:
    return {"targets": [
        {"name": "local", "kind": "local", "model": model, "context_window": 512 if "tiny" in model else 2048,
         "hourly_rate_usd": 0.5, "timeout_s": 60},
        {"name": "cloud", "kind": "openai", "model": "gpt-loop", "base_url": cloud_url + "/v1",
         "api_key_env": key_env, "context_window": 16000, "price_in_per_mtok": 1.0,
         "price_out_per_mtok": 2.0, "timeout_s": 10, "max_retries": 1}],
        "routes": {"auto": {"targets": ["local"]}, "cloud": {"targets": ["cloud"]}},
        "policy": {"breaker": {"failure_threshold": 5, "cooldown_s": 2}}}


async def one(http: httpx.AsyncClient, base: str, kind: str, model: str, collection: str, key: str,
              timeout_s: float) -> tuple[str, str]:
    headers = {"authorization": f"Bearer {key}"}
    try:
        async with asyncio.timeout(timeout_s):
            if kind == "retrieve":
                r = await http.post(base + "/v1/retrieve", headers=headers,
                                    json={"collection": collection, "query": "where is the offsite"})
                return _classify(r, lambda: "Lisbon" in r.text)
            body = {"model": "cloud" if kind == "cloud" else model, "max_tokens": 8,
                    "messages": [{"role": "user", "content": "Say something short."}]}
            if kind != "stream":
                r = await http.post(base + "/v1/chat/completions", headers=headers, json=body)
                return _classify(r, lambda: bool(r.json()["choices"]))
            async with http.stream("POST", base + "/v1/chat/completions", headers=headers,
                                   json=body | {"stream": True}) as r:
                if r.status_code != 200:
                    await r.aread()
                    return _classify(r, lambda: False)
                done = error = False
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith('data: {"error"'):
                        error = json.loads(line[6:])["error"]
                if error:  # a clear, in-band refusal when the replica died mid-stream
                    return ("refused", error.get("code") or "") if error.get("code") in (
                        "engine_unavailable", "no_target_available", "timeout") else ("lost", str(error)[:80])
                return ("answered", "") if done else ("lost", "stream cut without [DONE]")
    except TimeoutError:
        return "lost", "no answer in time"
    except httpx.HTTPError as e:
        return "lost", type(e).__name__


def _classify(r: httpx.Response, complete) -> tuple[str, str]:
    if r.status_code == 200:
        return ("answered", "") if complete() else ("lost", "incomplete answer")
    if r.status_code == 503 and r.headers.get("retry-after"):
        return "refused", r.json().get("error", {}).get("code") or "503"
    return "lost", f"HTTP {r.status_code}"


async def drive(base: str, model: str, collection: str, keys: list[str], duration_s: float, kills, timeout_s: float,
                pace_s: float) -> Run:
    run = Run()
    start = time.monotonic()
    limits = httpx.Limits(max_connections=len(keys) * 2 + 4)

    async def client(i: int) -> None:
        kind = KINDS[i % len(KINDS)]  # one kind per client: one fault's outage does not stall the others
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s + 5), limits=limits) as http:
            while time.monotonic() - start < duration_s:
                t0 = time.monotonic()
                outcome, detail = await one(http, base, kind, model, collection, keys[i], timeout_s)
                run.samples.append(Sample(kind, i, t0 - start, time.monotonic() - t0, outcome, detail))
                await asyncio.sleep(pace_s)

    async def faults() -> None:
        for at, name, kill in kills:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            await asyncio.to_thread(kill)
            run.kills[name] = time.monotonic() - start
            print(f"   t={run.kills[name]:6.1f}s killed {name}", flush=True)

    await asyncio.gather(faults(), *(client(i) for i in range(len(keys))))
    return run


def kill_replica(deployment: str):
    def kill() -> None:
        import ray

        [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}")]
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    return kill


def kill_store(store):
    def kill() -> None:
        import ray

        os.kill(ray.get(store.pid.remote()), signal.SIGKILL)
    return kill


def summarise(run: Run, ledger_path: str, key_ids: list[str], duration_s: float) -> dict:
    from ray_app.accounting.ledger import Ledger

    totals = {o: sum(s.outcome == o for s in run.samples) for o in ("answered", "refused", "lost")}
    by_kind = {k: {o: sum(s.kind == k and s.outcome == o for s in run.samples)
                   for o in ("answered", "refused", "lost")} for k in KINDS}
    with Ledger(ledger_path) as ledger:
        rows = {r["key"]: r for r in ledger.usage(group_by=("key", "status"))
                if r["status"] == "ok" and r["key"] in key_ids}
    chat_kinds = ("stream", "chat", "cloud")  # retrieval is free: no ledger row
    answered_per_key = {k: sum(s.client == i and s.outcome == "answered" and s.kind in chat_kinds
                               for s in run.samples) for i, k in enumerate(key_ids)}
    rows_per_key = {k: (rows.get(k) or {}).get("requests", 0) for k in key_ids}

    def window(lo: float, hi: float, kinds=KINDS) -> float | None:
        """p99 latency of the answered requests of ``kinds`` that were in flight at some time in [lo, hi)."""
        lat = [s.seconds * 1000 for s in run.samples if s.kind in kinds and s.outcome == "answered"
               and s.started < hi and s.started + s.seconds >= max(lo, 0)]
        return round(percentile(lat, 99), 1) if lat else None

    faults = {}
    ordered = sorted(run.kills.items(), key=lambda kv: kv[1])
    first_kill = ordered[0][1] if ordered else duration_s
    kind_of = {"llm replica": ("stream", "chat"), "store actor": ("retrieve",), "router replica": ("cloud",)}
    for name, at in ordered:
        # clients are of one kind each, so a fault is judged on its own kinds, from the kill to the end
        hit = [s for s in run.samples if s.kind in kind_of[name] and s.started + s.seconds >= at]
        after = [s.started + s.seconds for s in hit if s.outcome == "answered" and s.started >= at]
        faults[name] = {"at_s": round(at, 1), "refused": sum(s.outcome == "refused" for s in hit),
                        "lost": sum(s.outcome == "lost" for s in hit),
                        # the first request sent after the kill that was answered: the service is back
                        "recovered_after_s": round(min(after) - at, 1) if after else None,
                        "p99_before_ms": window(0, first_kill, kind_of[name]),
                        "p99_during_ms": window(at, at + 15, kind_of[name])}
    lost = [asdict(s) for s in run.samples if s.outcome == "lost"]
    return {"sent": len(run.samples), **totals, "by_kind": by_kind, "faults": faults,
            "p99_before_ms": window(0, first_kill),
            "p99_after_ms": window(max(f["at_s"] + (f["recovered_after_s"] or 0) for f in faults.values()) + 5
                                   if faults else 0, duration_s),
            "ledger_rows_ok": sum(rows_per_key.values()), "answered_chat": sum(answered_per_key.values()),
            "ledger_matches_answers": rows_per_key == answered_per_key, "lost_examples": lost[:10],
            "timeline": [asdict(s) for s in run.samples]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    colors = {"answered": "tab:green", "refused": "tab:orange", "lost": "tab:red"}
    for outcome, color in colors.items():
        points = [x for x in s["timeline"] if x["outcome"] == outcome]
        axes[0].scatter([p["started"] for p in points], [p["seconds"] * 1000 for p in points], s=10, c=color,
                        label=f"{outcome} ({len(points)})", alpha=0.7)
    for name, fault in s["faults"].items():
        axes[0].axvline(fault["at_s"], color="grey", ls="--")
        axes[0].text(fault["at_s"], axes[0].get_ylim()[1] * 0.95, f" kill {name}", rotation=90, va="top", fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("seconds into the run")
    axes[0].set_ylabel("request latency (ms)")
    axes[0].set_title("every request, by outcome")
    axes[0].legend(fontsize=8)
    kinds = list(s["by_kind"])
    bottom = [0] * len(kinds)
    for outcome, color in colors.items():
        values = [s["by_kind"][k][outcome] for k in kinds]
        axes[1].bar(kinds, values, bottom=bottom, color=color, label=outcome)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[1].set_title(f"ledger rows {s['ledger_rows_ok']} / answered chats {s['answered_chat']}")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{report['settings']['model']}, {report['settings']['clients']} clients for "
                 f"{report['settings']['duration_s']:.0f} s: {s['sent']} sent, {s['lost']} lost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 clients, a short run (the test suite)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load (default 180; smoke 80)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default 8; smoke 4)")
    parser.add_argument("--timeout", type=float, default=60.0, help="a request with no answer after this is lost")
    parser.add_argument("--address", default=None, help="a running Ray cluster to deploy on (default: start one)")
    parser.add_argument("--port", type=int, default=None, help="the HTTP port of that cluster's Serve proxy")
    parser.add_argument("--cloud-key-env", default="RAY_APP_CHAOS_KEY",
                        help="environment variable the Router replica reads the loopback cloud's key from (set "
                             "here for a cluster this script starts; an existing cluster must already have it)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    duration = args.duration or (80.0 if args.smoke else 180.0)
    clients = args.clients or (4 if args.smoke else 8)
    model = "tiny-llama" if args.smoke else "smollm2-135m-instruct"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    from ray import serve

    from ray_app.accounting.keys import KeyStore
    from ray_app.documents.config import IngestConfig
    from ray_app.documents.store_actor import get_store
    from ray_app.serve.app import build_app
    from tests.router_servers import OpenAIServer

    cloud = OpenAIServer("Hello from the loopback cloud").start()
    started_ray = not ray.is_initialized()
    if started_ray:
        from benchmarks.common import free_port, prepare_local_ray

        port = args.port or free_port()
        prepare_local_ray({})  # HAProxy ports of its own, beside a running server
        # the Router replica reads the (loopback) cloud target's key from its environment
        ray.init(address=args.address, num_cpus=None if args.address else 4, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", args.cloud_key_env: "sk-loopback"}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    elif args.port is None:
        raise SystemExit("--port: the HTTP port of the running cluster's Serve proxy")
    else:
        port = args.port
    base = f"http://127.0.0.1:{port}/chaos"
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    ledger = str(tmp / "ledger.sqlite")
    serve.run(build_app(app_args(model, router_config(model, cloud.url, args.cloud_key_env), ledger, args.smoke)), name=APP,
              route_prefix="/chaos")
    keys = KeyStore(ledger)
    created = [keys.create(f"chaos-{i}") for i in range(clients)]
    collection = f"chaos-{uuid.uuid4().hex[:6]}"
    try:
        wait_ready(base, model)
        assert httpx.post(base + "/v1/collections", json={"name": collection}, timeout=60).status_code == 201
        up = httpx.post(f"{base}/v1/collections/{collection}/documents", timeout=300,
                        files={"file": ("memo.md", b"# Memo\n\nThe offsite is in Lisbon this year.\n")})
        assert up.status_code == 201, up.text
        store = get_store(IngestConfig.load(ROOT / "configs" / "ingest.yaml").store,
                          IngestConfig.load(ROOT / "configs" / "ingest.yaml").paths)
        kills = [(duration * 0.15, "llm replica", kill_replica(f"LLM:{model}")),
                 (duration * 0.55, "store actor", kill_store(store)),
                 (duration * 0.75, "router replica", kill_replica("Router"))]
        print(f"== {clients} clients for {duration:.0f} s on {model}", flush=True)
        run = asyncio.run(drive(base, model, collection, [c.secret for c in created], duration, kills, args.timeout,
                                pace_s=0.2 if args.smoke else 0.05))
        results = summarise(run, ledger, [c.record.key_id for c in created], duration)
    finally:
        httpx.delete(f"{base}/v1/collections/{collection}", timeout=60)
        serve.delete(APP)
        cloud.stop()
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    print(f"   sent {results['sent']}: {results['answered']} answered, {results['refused']} refused with 503 + "
          f"retry-after, {results['lost']} lost; ledger rows {results['ledger_rows_ok']} for "
          f"{results['answered_chat']} answered chats (match per client: {results['ledger_matches_answers']})")
    for name, fault in results["faults"].items():
        print(f"   {name:15s} killed at {fault['at_s']:5.1f} s: {fault['refused']} refused, {fault['lost']} lost, "
              f"recovered after {fault['recovered_after_s']} s, p99 before {fault['p99_before_ms']} ms, "
              f"during {fault['p99_during_ms']} ms")
    report = {"benchmark": "chaos_bench", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
              "settings": {"model": model, "clients": clients, "duration_s": duration, "timeout_s": args.timeout,
                           "smoke": args.smoke},
              "results": results}
    write_results("chaos_bench" + ("_smoke" if args.smoke else ""), report, Path(args.out), plot)
    return report


if __name__ == "__main__":
    main()
