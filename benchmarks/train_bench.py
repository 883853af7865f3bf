"""Training throughput: the Ray Train loop (``jobs/finetune.py``'s code) against a plain single-process
PEFT loop on the same model, method, batch and sequence length, in the same run.

Rows are packed to exactly ``--seq-len`` tokens, so every step trains on batch x seq-len tokens. The
plain loop is the textbook one (PEFT model, AdamW, forward/backward/step), timed after warm-up
steps; the Ray Train figure is the loop's own tokens/s over the reporting windows after the first
(which holds the data pipeline's start). Both get the same CPU threads; the 2-worker DDP run is
reported alongside.

    python benchmarks/train_bench.py                          # SmolLM2-135M, LoRA, seq 128, batch 4
    python benchmarks/train_bench.py --model tiny-llama --steps 20
    python benchmarks/train_bench.py --smoke            # tiny model, 2 timed steps: seconds (tests)

Writes benchmarks/results/train_bench.json and train_bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402


def plain_loop(model_path: str, rows: list[dict], batch: int, steps: int, warmup: int, threads: int, lr: float) -> dict:
    import torch

    from ray_app.training.config import LoraSettings
    from ray_app.training.data import collate
    from ray_app.training.model import load_for_training

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_for_training(model_path, "lora", LoraSettings())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    tokens, started = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        loss = model(**collate(chunk, 0)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += sum(len(r["input_ids"]) for r in chunk)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "threads": threads}


def ray_train(config_path: Path, overrides: dict) -> dict:
    """The loop's tokens/s per 2-step reporting window, the first (warm-up, data start) left out."""
    from ray_app.training.config import TrainConfig
    from ray_app.training.finetune import run_training

    config = TrainConfig.load(config_path, overrides)
    result = run_training(config, register=False, evaluate_result=False,
                          run_name=f"bench-{config.scaling.num_workers}w-{int(time.time())}")
    windows = [float(row["tokens_per_s"]) for row in result.history][1:]
    return {"workers": config.scaling.num_workers, "threads_per_worker": config.scaling.torch_threads,
            "tokens_per_s": round(statistics.median(windows), 1), "windows": [round(w, 1) for w in windows],
            "final_loss": round(result.metrics["loss"], 4)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["plain PEFT loop\n1 process", "Ray Train\n1 worker", "Ray Train\n2 workers (DDP)"]
    values = [report["plain"]["tokens_per_s"], report["ray_1_worker"]["tokens_per_s"], report["ray_2_workers"]["tokens_per_s"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, values, color=["#8da0cb", "#66c2a5", "#fc8d62"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"{report['model']} LoRA, batch {report['batch']} x {report['seq_len']} tokens, "
                 f"{report['threads']} CPU threads: Ray Train = {report['ratio_ray_1_worker_vs_plain']}x plain")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 timed steps, seq 64 (tests)")
    parser.add_argument("--model", default=None, help="default smollm2-135m-instruct; smoke tiny-llama")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128; smoke 64")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="timed steps after warm-up (default 8; smoke 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    args.model = args.model or ("tiny-llama" if args.smoke else "smollm2-135m-instruct")
    args.seq_len = args.seq_len or (64 if args.smoke else 128)
    args.steps = args.steps or (2 if args.smoke else 8)

    from ray_app.cluster import init_ray
    from ray_app.models.resolve import resolve_source
    from ray_app.paths import DataDir
    from ray_app.training.data import pack, prepare
    from ray_app.training.model import load_tokenizer

    paths = DataDir.from_path(args.data_dir)
    model_path = resolve_source(args.model, paths)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp = Path(tmp)
        lines = (ROOT / "configs/train/data/support.jsonl").read_text().splitlines()
        data_file = tmp / "data.jsonl"
        data_file.write_text("\n".join(lines * 12) + "\n")  # enough packed rows for every step
        tokenizer = load_tokenizer(model_path)
        data = prepare(tokenizer, str(data_file), None, 0.0, args.seq_len, True, 0)
        rows = [r for r in pack(data.train, args.seq_len) if len(r["input_ids"]) == args.seq_len]
        print(f"{len(rows)} packed rows of {args.seq_len} tokens", file=sys.stderr)

        plain = plain_loop(model_path, rows, args.batch, args.steps, 2, args.threads, 2e-4)
        print("plain:", json.dumps(plain), file=sys.stderr)

        data_dir = tmp / "data"
        data_dir.mkdir()
        (data_dir / "models").symlink_to(paths.models)
        base = {"base_model": args.model, "data.train": str(data_file), "data.validation_fraction": 0.0,
                "data.max_seq_len": args.seq_len, "data.packing": True, "optim.batch_size": args.batch,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.05}, "optim.learning_rate": 2e-4,
                "data_dir": str(data_dir), "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                "scaling.nice": 0}  # the plain loop runs at the normal priority too
        init_ray()
        # every 2-step window kept (Train's metrics history holds the retained checkpoints' reports)
        windows = {"optim.max_steps": 2 + args.steps, "checkpoint.every_steps": 2, "checkpoint.keep": 100}
        one = ray_train(ROOT / "configs/train/lora_tiny.yaml", base | windows | {
            "scaling.num_workers": 1, "scaling.torch_threads": args.threads})
        print("ray 1 worker:", json.dumps(one), file=sys.stderr)
        # DDP: each worker takes `batch` rows per step, so a step trains twice the tokens
        two = ray_train(ROOT / "configs/train/lora_tiny.yaml", base | windows | {
            "scaling.num_workers": 2, "scaling.torch_threads": max(1, args.threads // 2),
            "optim.max_steps": 2 + max(2, args.steps // 2)})
        print("ray 2 workers:", json.dumps(two), file=sys.stderr)

    report = {"benchmark": "train_bench", "smoke": args.smoke, "model": args.model, "method": "lora r=8 (q,k,v,o)", "seq_len": args.seq_len,
              "batch": args.batch, "threads": args.threads, "timed_steps": args.steps,
              "plain": plain, "ray_1_worker": one, "ray_2_workers": two,
              "ratio_ray_1_worker_vs_plain": round(one["tokens_per_s"] / plain["tokens_per_s"], 3),
              "ratio_ray_2_workers_vs_plain": round(two["tokens_per_s"] / plain["tokens_per_s"], 3),
              "target": 0.9, "machine": machine()}
    write_results("train_bench" + ("_smoke" if args.smoke else ""), report, Path(args.out), plot)
    print(f"plain {plain['tokens_per_s']} tok/s | Ray Train 1 worker {one['tokens_per_s']} tok/s "
          f"({report['ratio_ray_1_worker_vs_plain']}x) | 2 workers {two['tokens_per_s']} tok/s "
          f"({report['ratio_ray_2_workers_vs_plain']}x)")
    return report


if __name__ == "__main__":
    main()
