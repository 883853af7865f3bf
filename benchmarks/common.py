"""What every benchmark shares: percentiles, a description of the machine, free ports, and writing
the JSON + PNG pair under ``benchmarks/results/``."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# a benchmark's clients send thousands of requests: httpx's line per request would drown the report
logging.getLogger("httpx").setLevel(logging.WARNING)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_local_ray(serving_env: dict[str, str]) -> None:
    """Before this process starts a Ray cluster of its own: ``serving_env`` (a variable the caller
    exported wins), and HAProxy's statistics and metrics ports on free ones: its defaults are fixed and
    would clash with a server running beside (the user's, or another test cluster)."""
    for key, value in serving_env.items():
        os.environ.setdefault(key, value)
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        os.environ.setdefault(name, str(free_port()))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": None}


def write_results(stem: str, report: dict, out: Path = RESULTS, plot: Callable[[dict, Path], None] | None = None
                  ) -> tuple[Path, Path | None]:
    """``<out>/<stem>.json`` and, with ``plot``, ``<out>/<stem>.png``; prints where they went."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{stem}.json"
    data.write_text(json.dumps(report, indent=2) + "\n")
    picture = None
    if plot is not None:
        picture = out / f"{stem}.png"
        plot(report, picture)
    print(f"wrote {data}" + (f" and {picture}" if picture else ""), flush=True)
    return data, picture
