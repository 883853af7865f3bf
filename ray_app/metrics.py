"""Our Prometheus metrics, exported through Ray's metrics agent next to Ray's own (every node's
``--metrics-export-port``; names get Ray's ``ray_`` prefix, e.g. ``ray_ray_app_requests_total``).

Metrics are created on first use and only inside a Ray process: the plain classes that record them
are also used without Ray (unit tests, single-process tools), where recording is a no-op.
"""

from __future__ import annotations

from functools import cache

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


@cache
def _metrics():
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "requests": Counter("ray_app_requests_total", "Completed API requests.", ("model", "endpoint")),
        "errors": Counter("ray_app_errors_total", "API requests answered with an error.", ("status", "code")),
        "tokens": Counter("ray_app_tokens_total", "Tokens in (prompt) and out (completion).", ("model", "direction")),
        "latency": Histogram("ray_app_request_seconds", "Request latency.", LATENCY_BUCKETS, ("model", "endpoint")),
        "ttft": Histogram("ray_app_time_to_first_token_seconds", "Time to the first streamed token.",
                          LATENCY_BUCKETS, ("model",)),
        "ingest_files": Counter("ray_app_ingest_files_total", "Files through ingestion, by outcome.",
                                ("collection", "status")),
        "ingest_chunks": Counter("ray_app_ingest_chunks_total", "Chunks written by ingestion.", ("collection",)),
        "routed": Counter("ray_app_routed_requests_total", "Requests by route (direct for a named model), "
                          "target and outcome.", ("route", "target", "status")),
        "spend": Counter("ray_app_spend_usd_total", "USD charged to callers.", ("route", "target")),
        "train_step": Gauge("ray_app_train_step", "The latest optimizer step of a training run.", ("run",)),
        "train_loss": Gauge("ray_app_train_loss", "The latest training loss of a run.", ("run",)),
        "train_tokens_per_s": Gauge("ray_app_train_tokens_per_second", "Training throughput.", ("run",)),
    }


def _get(name: str):
    import ray

    return _metrics()[name] if ray.is_initialized() else None


def _add(name: str, value: float, tags: dict[str, str]) -> None:
    # Ray's Counter.inc refuses 0 (ValueError), and a metric must never fail the request it counts.
    if value > 0:
        _get(name).inc(value, tags)


def record_request(model: str, endpoint: str, prompt_tokens: int, completion_tokens: int, seconds: float,
                   ttft_seconds: float | None) -> None:
    if (requests := _get("requests")) is None:
        return
    requests.inc(1, {"model": model, "endpoint": endpoint})
    _add("tokens", prompt_tokens, {"model": model, "direction": "in"})
    _add("tokens", completion_tokens, {"model": model, "direction": "out"})  # 0 for embeddings
    _get("latency").observe(seconds, {"model": model, "endpoint": endpoint})
    if ttft_seconds is not None:
        _get("ttft").observe(ttft_seconds, {"model": model})


def record_error(status: int, code: str | None) -> None:
    if (errors := _get("errors")) is not None:
        errors.inc(1, {"status": str(status), "code": code or ""})


def record_ingest(collection: str, status: str, chunks: int) -> None:
    if (files := _get("ingest_files")) is not None:
        files.inc(1, {"collection": collection, "status": status})
        _add("ingest_chunks", chunks, {"collection": collection})


def record_spend(route: str, target: str, status: str, cost_usd: float) -> None:
    if (routed := _get("routed")) is not None:
        routed.inc(1, {"route": route, "target": target, "status": status})
        _add("spend", cost_usd, {"route": route, "target": target})


def record_train_step(run: str, step: int, loss: float, tokens_per_s: float) -> None:
    if (gauge := _get("train_step")) is not None:
        gauge.set(step, {"run": run})
        _get("train_loss").set(loss, {"run": run})
        _get("train_tokens_per_s").set(tokens_per_s, {"run": run})
