"""What durable accounting costs at the end of a request: requests that end together (concurrent
clients whose streams finish in the same engine step) settling their ledger rows, each row on disk
before its request's answer completes.

Two ways of writing the rows, on the same disk, in the same run, in alternating rounds:

- ``per request``: the baseline, what the gateway did before: each request hands its row to a worker
  thread (``asyncio.to_thread``) and commits it in a transaction of its own.
- ``group commit``: what ``SpendRecorder.settle`` writes with now (``accounting/recorder.py:
  GroupCommit``): rows that arrive while a commit runs share the next transaction, so a burst pays one
  flush to disk and one thread hop between all its requests.

For each burst size: the median over rounds of the p50 and the slowest request's time from the burst's
start until its settle returned (its row durable), and the transactions the group commit used. The
ratio is per request / group commit for the slowest request.

    python benchmarks/ledger_bench.py
    python benchmarks/ledger_bench.py --bursts 1 8 32 128 --rounds 20 --dir /mnt/ssd/tmp
    python benchmarks/ledger_bench.py --smoke            # seconds (tests)

Writes benchmarks/results/ledger_bench.json and ledger_bench.png (``_smoke`` with --smoke).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, percentile, write_results  # noqa: E402
from ray_app.accounting.ledger import Ledger, LedgerEntry  # noqa: E402
from ray_app.accounting.recorder import GroupCommit  # noqa: E402

METHODS = ("per request", "group commit")


class CountingLedger(Ledger):
    """The real ledger, counting the transactions that write rows."""

    transactions = 0

    def record_many(self, rows):
        self.transactions += 1
        super().record_many(rows)


async def burst(settle, size: int) -> list[float]:
    """``size`` requests settling at once: each one's seconds from the burst's start to its return."""
    start = time.perf_counter()

    async def one() -> float:
        await settle()
        return time.perf_counter() - start

    return list(await asyncio.gather(*(one() for _ in range(size))))


async def measure(folder: Path, sizes: list[int], rounds: int) -> dict:
    per_request = CountingLedger(folder / "per_request.sqlite")
    grouped = CountingLedger(folder / "group_commit.sqlite")
    writer = GroupCommit(grouped)
    entry = LedgerEntry(None, "direct", "bench", "bench", 139, 64, 0.0, 1.0, "ok")
    settles = {
        "per request": lambda: asyncio.to_thread(per_request.record, entry),
        "group commit": lambda: writer.write(entry, None),
    }
    results: dict[str, dict] = {}
    for size in sizes:
        per_round: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
        grouped.transactions = 0
        for r in range(rounds):
            for method in METHODS if r % 2 == 0 else reversed(METHODS):
                times = await burst(settles[method], size)
                per_round[method].append((percentile(times, 50), max(times)))
        figures = results[str(size)] = {
            method: {"p50_ms": round(statistics.median(p for p, _ in v) * 1000, 3),
                     "slowest_ms": round(statistics.median(s for _, s in v) * 1000, 3)}
            for method, v in per_round.items()}
        base, grouped_figures = figures["per request"], figures["group commit"]
        grouped_figures["transactions_per_burst"] = round(grouped.transactions / rounds, 2)
        figures["ratio_slowest"] = (round(base["slowest_ms"] / grouped_figures["slowest_ms"], 2)
                                    if grouped_figures["slowest_ms"] else None)
        print(f"burst of {size:4d}: per request p50 {base['p50_ms']:7.2f} ms, slowest {base['slowest_ms']:7.2f} ms"
              f" | group commit p50 {grouped_figures['p50_ms']:7.2f} ms, slowest {grouped_figures['slowest_ms']:7.2f}"
              f" ms, {grouped_figures['transactions_per_burst']:.1f} transactions | {figures['ratio_slowest']}x",
              flush=True)
    written = {"per request": _count(per_request), "group commit": _count(grouped)}
    per_request.close()
    grouped.close()
    return {"results": results, "rows_written": written}


def _count(ledger: Ledger) -> int:
    return sum(row["requests"] for row in ledger.usage(group_by=("route",)))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(report["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in zip(axes, ("p50_ms", "slowest_ms"), ("p50 request", "slowest request")):
        width = 0.38
        for i, (method, color) in enumerate(zip(METHODS, ("#fc8d62", "#66c2a5"))):
            values = [report["results"][s][method][metric] for s in sizes]
            bars = ax.bar([x + (i - 0.5) * width for x in range(len(sizes))], values, width, label=method,
                          color=color)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(sizes)), [f"{s} at once" for s in sizes])
        ax.set_ylabel("ms until the row is durable")
        ax.set_title(f"Settling a burst: {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, nargs="+", default=[1, 8, 32, 128],
                        help="requests that settle at once")
    parser.add_argument("--rounds", type=int, default=20, help="bursts per size and method (alternating)")
    parser.add_argument("--dir", default=None,
                        help="folder for the two ledger files (default: a temporary folder in the data "
                             "directory, on the disk the server's ledger lives on)")
    parser.add_argument("--smoke", action="store_true", help="bursts of 1 and 8, 4 rounds (tests)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.bursts, args.rounds = [1, 8], 4

    from ray_app.paths import default_data_dir

    parent = Path(args.dir) if args.dir else default_data_dir()
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ledger-bench-", dir=parent) as folder:
        measured = asyncio.run(measure(Path(folder), args.bursts, args.rounds))
    report = {
        "benchmark": "ledger_bench",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": {"bursts": args.bursts, "rounds": args.rounds, "smoke": args.smoke,
                     "synchronous": "FULL", "journal_mode": "WAL"},
        **measured,
    }
    write_results("ledger_bench_smoke" if args.smoke else "ledger_bench", report, Path(args.out), plot)
    return report


if __name__ == "__main__":
    main()
