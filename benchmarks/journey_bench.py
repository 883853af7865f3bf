"""The platform loop on a running server: what a user waits for, and what chatting users feel meanwhile.

Run it beside the README's first command (the server on :8000, on the laptop's own cores). One chat
client chats the whole time, one request after another; the run moves through three phases:

1. idle: nothing else runs (the baseline);
2. dataset build: a collection of the test corpus, uploaded over HTTP, becomes a training set with
   ``ray-app dataset build`` (the served model as teacher): pairs/s and the fraction each filter keeps;
3. training: a fine-tuning job over the OpenAI API (``--examples`` short examples, 1 epoch) from
   ``jobs.create`` until the first streamed token of its ``fine_tuned_model``.

Reported: chat p50/p99 and failed requests per phase, their ratio to idle, and seconds from
``jobs.create`` to the first token with the job's own phases. Goals on 2 cores: 0 failed chats while
a job trains, chat p50 while training <= 2x idle, ``jobs.create`` -> first token <= 180 s.

    python benchmarks/journey_bench.py                        # SmolLM2 base, 32 examples, 30 s idle
    python benchmarks/journey_bench.py --smoke --endpoint http://127.0.0.1:PORT/v1   # tiny model (tests)

Writes benchmarks/results/journey_bench.json and journey_bench.png (``_smoke`` with --smoke).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, percentile, write_results  # noqa: E402
from tests.corpus import FACTS, make_corpus  # noqa: E402

COLLECTION = "journey-bench"
GOALS = {"failed_chats_training": 0, "p50_training_vs_idle": 2.0, "create_to_first_token_s": 180.0}


@dataclass
class Chat:
    phase: str
    at_s: float
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class ChatLoad:
    """One user chatting the whole time; each request is tagged with the phase it started in."""

    url: str
    model: str
    max_tokens: int
    started: float = field(default_factory=time.monotonic)
    phase: str = "idle"
    chats: list[Chat] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                phase, start = self.phase, time.monotonic()
                try:
                    r = client.post(self.url, json={"model": self.model, "max_tokens": self.max_tokens,
                                                    "messages": [{"role": "user", "content": "Say hello politely."}]})
                    ok = r.status_code == 200 and bool(r.json()["choices"][0]["message"]["content"])
                    detail = "" if ok else f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, detail = False, repr(e)
                self.chats.append(Chat(phase, round(start - self.started, 2), time.monotonic() - start, ok, detail))

    def stop(self) -> None:
        self._stop.set()

    def summary(self, phase: str) -> dict:
        chats = [c for c in self.chats if c.phase == phase]
        ok = [c.seconds for c in chats if c.ok]
        return {"requests": len(chats), "failed": len(chats) - len(ok),
                "p50_ms": round(percentile(ok, 50) * 1000, 1), "p99_ms": round(percentile(ok, 99) * 1000, 1),
                "failures": [c.detail for c in chats if not c.ok][:3]}


def training_examples(n: int) -> bytes:
    """``n`` short chat examples from the corpus' facts, reworded so that no two are the same."""
    lines = []
    for i in range(n):
        fact = FACTS[i % len(FACTS)]
        lead = ["", "Quick question: ", "Please tell me: ", "I wonder: ", "Hi! "][i // len(FACTS) % 5]
        lines.append(json.dumps({"messages": [{"role": "user", "content": lead + fact.question},
                                              {"role": "assistant", "content": f"The handbook says: {fact.answer}."}]}))
    return ("\n".join(lines) + "\n").encode()


def build_phase(args, http: httpx.Client, work: Path) -> dict:
    """Upload the corpus to a fresh collection over HTTP (or take ``--collection`` as it is), then
    ``ray-app dataset build`` from it."""
    collection = args.collection or COLLECTION
    if not args.collection:
        http.delete(f"/collections/{COLLECTION}")
        http.post("/collections", json={"name": COLLECTION}).raise_for_status()
        corpus = work / "docs"
        make_corpus(corpus, with_broken=False)
        for path in sorted(corpus.iterdir()):
            http.post(f"/collections/{COLLECTION}/documents", files={"file": (path.name, path.read_bytes())},
                      timeout=300).raise_for_status()
    config = yaml.safe_load((ROOT / "configs" / "dataset.yaml").read_text())
    if args.smoke:  # the tiny model writes random words: keep what the structural filters pass
        config["filters"] |= {"language": None, "min_grounding": 0}
    (work / "dataset.yaml").write_text(yaml.safe_dump(config))
    out = work / "dataset.jsonl"
    command = [str(Path(sys.executable).parent / "ray-app"), "dataset", "build", "--collection", collection,
               "--out", str(out), "--config", str(work / "dataset.yaml"), "--teacher", args.teacher,
               "--endpoint", args.endpoint, "--no-progress"] + (["--data-dir", args.data_dir] if args.data_dir else [])
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode not in (0, 2):
        raise RuntimeError(f"dataset build failed ({done.returncode}):\n{done.stderr[-4000:]}")
    report = json.loads(Path(str(out) + ".report.json").read_text())
    if not args.collection:
        http.delete(f"/collections/{COLLECTION}")
    return {"seconds": round(time.monotonic() - started, 1), "documents": report["documents"],
            "chunks": report["chunks"], "generated": report["generated"], "kept": report["kept"],
            "pairs_per_s": report["pairs_per_s"], "kept_fraction": report["kept_fraction"],
            "removed": report["removed"], "teacher": args.teacher}


def training_phase(args, client: openai.OpenAI) -> dict:
    """``jobs.create`` to the first streamed token of the job's model, with the job's own phases."""
    f = client.files.create(file=("journey.jsonl", training_examples(args.examples)), purpose="fine-tune")
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(model=args.base, training_file=f.id, suffix=f"bench{int(time.time())}",
                                         hyperparameters={"n_epochs": 1}, seed=0)
    phases = {job.status: 0.0}
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
        phases.setdefault(job.status, round(time.monotonic() - started, 1))
    if job.status != "succeeded":
        raise RuntimeError(f"the job ended {job.status}: {job.error}")
    first_token = None
    while first_token is None and time.monotonic() - started < 600:
        try:
            for chunk in client.chat.completions.create(
                    model=job.fine_tuned_model, stream=True, max_tokens=8,
                    messages=[{"role": "user", "content": FACTS[0].question}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    first_token = time.monotonic() - started
                    break
        except openai.APIError:
            time.sleep(0.5)  # the adapter is being loaded; the clock keeps running
    events = [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data)]
    return {"job": job.id, "fine_tuned_model": job.fine_tuned_model, "phases_s": phases,
            "create_to_succeeded_s": phases.get("succeeded"), "trained_tokens": job.trained_tokens,
            "create_to_first_token_s": round(first_token, 1) if first_token else None, "events": events[-6:]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["results"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [2.2, 1.2, 1.4]})
    colors = {"idle": "tab:green", "dataset build": "tab:blue", "training": "tab:orange"}
    for phase, color in colors.items():
        points = [c for c in r["timeline"] if c["phase"] == phase]
        axes[0].scatter([c["at_s"] for c in points], [c["seconds"] * 1000 for c in points], s=10, c=color,
                        label=f"{phase}: p50 {r['chat'][phase]['p50_ms']:.0f} ms, {r['chat'][phase]['failed']} failed")
    failed = [c for c in r["timeline"] if not c["ok"]]
    axes[0].scatter([c["at_s"] for c in failed], [c["seconds"] * 1000 for c in failed], s=30, c="red", marker="x",
                    label=f"failed ({len(failed)})")
    axes[0].set_xlabel("seconds into the run")
    axes[0].set_ylabel("chat latency (ms)")
    axes[0].set_title(f"one user chatting with {report['settings']['chat_model']} the whole time")
    axes[0].legend(fontsize=8)
    training = r["training"]
    marks = sorted(training["phases_s"].items(), key=lambda kv: kv[1]) + [
        ("first token", training["create_to_first_token_s"] or 0)]
    axes[1].barh([m[0] for m in marks], [m[1] for m in marks], color="tab:orange")
    axes[1].axvline(GOALS["create_to_first_token_s"], color="grey", ls="--", label="goal 180 s")
    axes[1].set_xlabel("seconds after jobs.create")
    axes[1].set_title(f"{report['settings']['base']}: {report['settings']['examples']} examples, 1 epoch")
    axes[1].legend(fontsize=8)
    kept = r["dataset"]["kept_fraction"]
    axes[2].bar(list(kept), list(kept.values()), color="tab:blue")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_ylabel("fraction kept")
    axes[2].tick_params(axis="x", rotation=30)
    axes[2].set_title(f"dataset build: {r['dataset']['kept']} of {r['dataset']['generated']} kept, "
                      f"{r['dataset']['pairs_per_s']:.2f} pairs/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default="http://127.0.0.1:8000/v1", help="the running server's /v1 URL")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 4 examples, short phases (tests)")
    parser.add_argument("--base", help="the base model to fine-tune (default smollm2-135m-instruct; smoke tiny-llama)")
    parser.add_argument("--chat-model", default="smollm2-135m-instruct", help="what the chatting user talks to")
    parser.add_argument("--teacher", help="the dataset build's teacher (default: the base model)")
    parser.add_argument("--examples", type=int, help="training examples (default 32; smoke 4)")
    parser.add_argument("--idle-s", type=float, help="seconds of the idle baseline (default 30; smoke 5)")
    parser.add_argument("--collection", help="build from this existing collection (default: upload the test corpus "
                                             "to a fresh one, dropped afterwards)")
    parser.add_argument("--data-dir", help="the server's data directory (where the dataset build finds the store)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.base = args.base or ("tiny-llama" if args.smoke else "smollm2-135m-instruct")
    args.teacher = args.teacher or args.base
    args.examples = args.examples or (4 if args.smoke else 32)
    idle_s = args.idle_s or (5.0 if args.smoke else 30.0)

    client = openai.OpenAI(base_url=args.endpoint, api_key="unused", max_retries=0, timeout=120)
    http = httpx.Client(base_url=args.endpoint, timeout=120)
    load = ChatLoad(args.endpoint + "/chat/completions", args.chat_model, max_tokens=16)
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        print(f"idle baseline: {idle_s:.0f} s of chat", flush=True)
        time.sleep(idle_s)
        load.phase = "dataset build"
        with tempfile.TemporaryDirectory() as tmp:
            print("dataset build: upload the corpus, then ray-app dataset build", flush=True)
            dataset = build_phase(args, http, Path(tmp))
        load.phase = "training"
        print(f"training: fine-tune {args.base} on {args.examples} examples over the OpenAI API", flush=True)
        training = training_phase(args, client)
    finally:
        load.stop()
        thread.join(timeout=180)

    chat = {phase: load.summary(phase) for phase in ("idle", "dataset build", "training")}
    idle_p50 = chat["idle"]["p50_ms"]
    ratios = {phase: round(chat[phase]["p50_ms"] / idle_p50, 2) if idle_p50 else None for phase in chat}
    goals = {"failed_chats_training": chat["training"]["failed"] <= GOALS["failed_chats_training"],
             "p50_training_vs_idle": (ratios["training"] or 99) <= GOALS["p50_training_vs_idle"],
             "create_to_first_token_s": (training["create_to_first_token_s"] or 1e9) <= GOALS["create_to_first_token_s"]}
    report = {
        "benchmark": "journey_bench", "machine": machine(),
        "settings": {"endpoint": args.endpoint, "base": args.base, "chat_model": args.chat_model,
                     "teacher": args.teacher, "examples": args.examples, "idle_s": idle_s, "smoke": args.smoke,
                     "collection": args.collection or COLLECTION},
        "results": {"chat": chat, "p50_vs_idle": ratios, "dataset": dataset, "training": training, "goals": goals,
                    "timeline": [c.__dict__ for c in load.chats]},
    }
    for phase, s in chat.items():
        print(f"chat while {phase:13s}: {s['requests']:4d} requests, {s['failed']} failed, p50 {s['p50_ms']:.0f} ms "
              f"({ratios[phase]}x idle), p99 {s['p99_ms']:.0f} ms")
    print(f"dataset build: {dataset['kept']} of {dataset['generated']} kept in {dataset['seconds']} s, "
          f"{dataset['pairs_per_s']} pairs/s; kept by filter {dataset['kept_fraction']}")
    print(f"jobs.create -> succeeded {training['create_to_succeeded_s']} s, -> first token "
          f"{training['create_to_first_token_s']} s ({training['fine_tuned_model']})")
    print("goals:", goals)
    write_results("journey_bench_smoke" if args.smoke else "journey_bench", report, args.out or
                  (ROOT / "benchmarks" / "results"), plot)
    return report


if __name__ == "__main__":
    main()
