"""Ingestion throughput: the Ray Data pipeline against a single-process sequential baseline and
against the embed-only limit, in the same run, on a generated mixed corpus (~200 files: text PDFs,
DOCX, HTML, Markdown, text, scanned PDFs and PNG scans).

- pipeline: ``run_ingest`` (the code behind ``ray-app ingest``) with configs/ingest.yaml's stages, on a
  running local Ray (start-up reported apart), into a fresh Qdrant Edge collection;
- sequential: the same classes in one process, one file after another (``KnowledgeBase.ingest_file``,
  the upload path: parse -> OCR -> chunk -> embed -> write), loading its models inside the clock as
  the pipeline's actors do;
- embed-only: the embedder encoding exactly the chunks of the text documents with nothing else
  running, all cores to itself: the ceiling for text documents, whose cost is mostly embedding.

Figures: files/s, pages/s, chunks/s; ratios pipeline/sequential (mixed corpus; target >= 1.7x on 2
cores) and pipeline/embed-only in chunks/s (text documents only; target >= 0.7x).

    python benchmarks/ingest_bench.py
    python benchmarks/ingest_bench.py --files 60
    python benchmarks/ingest_bench.py --smoke          # 12 files, seconds (tests; on a running cluster if any)

Writes benchmarks/results/ingest_bench.json and ingest_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402

SCANNED = {"scan", "png"}


def rates(files: int, pages: int, chunks: int, seconds: float) -> dict:
    return {"files": files, "pages": pages, "chunks": chunks, "seconds": round(seconds, 2),
            "files_per_s": round(files / seconds, 3), "pages_per_s": round(pages / seconds, 3),
            "chunks_per_s": round(chunks / seconds, 2)}


def sequential(corpus: Path, data: Path, embedder_path: str, config) -> tuple[dict, dict[str, list[str]]]:
    """One process, one file after another, model loading included (as the pipeline's actors load
    theirs); returns its figures and each file's chunk texts."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ray_app.documents.knowledge import KnowledgeBase, LocalStore, UploadSettings
    from ray_app.documents.ocr import TesseractOCR
    from ray_app.documents.processing import ocr_elements
    from ray_app.documents.store import EdgeVectorStore
    from ray_app.documents.embedder import SentenceEmbedder

    started = time.perf_counter()
    embedder = SentenceEmbedder(embedder_path, batch_size=config.embed.batch_size)
    tokenizer = AutoTokenizer.from_pretrained(embedder_path)
    max_tokens, overlap = config.chunking.resolve(embedder.max_tokens, tokenizer.num_special_tokens_to_add())
    ocr = TesseractOCR(config.ocr)
    store = EdgeVectorStore(data / "sequential")
    store.create_collection("bench", embedder.dimensions, config.embedder)
    chunk_texts: dict[str, list[str]] = {}

    async def embed(texts):
        return embedder.embed(texts)

    async def run_ocr(parsed, raw):
        return ocr_elements(parsed, raw, ocr)

    kb = KnowledgeBase(LocalStore(store), embed, tokenizer, ocr=run_ocr, upload=UploadSettings(
        config.embedder, max_tokens, overlap, config.ocr, config.max_file_bytes, "internal"))
    original_chunk = kb.chunker.chunk

    def recording_chunk(elements):
        chunks = original_chunk(elements)
        chunk_texts[current] = [c.text for c in chunks]
        return chunks

    kb.chunker.chunk = recording_chunk
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    pages = chunks = 0
    for path in tqdm(files, desc="sequential", unit="file", file=sys.stderr):
        current = path.name
        outcome = asyncio.run(kb.ingest_file("bench", path.name, path.read_bytes()))
        pages += outcome.pages or 1
        chunks += outcome.chunks
    seconds = time.perf_counter() - started
    store.close()
    return rates(len(files), pages, chunks, seconds), chunk_texts


def embed_only(embedder_path: str, texts: list[str], batch_size: int) -> dict:
    from ray_app.documents.embedder import SentenceEmbedder

    embedder = SentenceEmbedder(embedder_path, batch_size=batch_size)
    embedder.encode(texts[:batch_size])  # warm-up
    started = time.perf_counter()
    embedder.encode(texts)
    seconds = time.perf_counter() - started
    return {"chunks": len(texts), "seconds": round(seconds, 2), "chunks_per_s": round(len(texts) / seconds, 2),
            "torch_threads": __import__("torch").get_num_threads()}


def pipeline(corpus: Path, collection: str, config) -> dict:
    from ray_app.documents.pipeline import run_ingest

    report = run_ingest(str(corpus), collection, config, progress=False)
    if report.count("indexed") != len(report.files):
        raise SystemExit(f"pipeline refused files: {[(f.path, f.reason) for f in report.files if f.status != 'indexed']}")
    pages = sum(f.pages or 1 for f in report.files)
    out = rates(len(report.files), pages, report.chunks, report.seconds)
    out["first_result_s"] = round(report.first_result_s, 2)  # actors started, first file through every stage
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mixed = report["mixed"]
    bars = axes[0].bar(["sequential", "pipeline"], [mixed["sequential"]["files_per_s"], mixed["pipeline"]["files_per_s"]],
                       color=["#8da0cb", "#66c2a5"])
    axes[0].bar_label(bars, fmt="%.2f")
    axes[0].set_ylabel("files/s")
    axes[0].set_title(f"mixed corpus ({mixed['pipeline']['files']} files, {mixed['scanned_files']} scanned): "
                      f"{report['ratios']['pipeline_vs_sequential']}x")
    text = report["text"]
    bars = axes[1].bar(["sequential", "pipeline", "embed-only limit"],
                       [text["sequential"]["chunks_per_s"], text["pipeline"]["chunks_per_s"], text["embed_only"]["chunks_per_s"]],
                       color=["#8da0cb", "#66c2a5", "#fc8d62"])
    axes[1].bar_label(bars, fmt="%.1f")
    axes[1].set_ylabel("chunks/s")
    axes[1].set_title(f"text documents ({text['pipeline']['files']} files): pipeline = "
                      f"{report['ratios']['pipeline_vs_embed_only_text']}x the limit")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="12 files: seconds (the test suite)")
    parser.add_argument("--files", type=int, default=None, help="files in the generated corpus (default 200)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "ingest.yaml"))
    parser.add_argument("--data-dir", default=None, help="ray_app data directory holding the prepared models")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    files = args.files or (12 if args.smoke else 200)

    import ray

    from ray_app.cluster import init_ray
    from ray_app.documents.config import IngestConfig
    from ray_app.models.resolve import resolve_source
    from ray_app.paths import DataDir
    from tests.corpus import scaled_corpus

    models = DataDir.from_path(args.data_dir).models
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        tmp = Path(tmp)
        mixed, text = tmp / "mixed", tmp / "text"
        counts = scaled_corpus(mixed, files)
        text.mkdir()
        scanned = 0
        for path in sorted(mixed.iterdir()):
            kind = "scan" if path.suffix == ".png" or _is_scan(path) else "text"
            if kind == "text":
                shutil.copy(path, text / path.name)
            else:
                scanned += 1
        data = tmp / "data"
        data.mkdir()
        (data / "models").symlink_to(models)
        config = IngestConfig.load(args.config, {"data_dir": str(data)})
        embedder_path = resolve_source(config.embedder, config.paths)
        print(f"corpus: {counts} ({scanned} scanned)", file=sys.stderr)

        seq_mixed, chunk_texts = sequential(mixed, data, embedder_path, config)
        print("sequential (mixed):", json.dumps(seq_mixed), file=sys.stderr)
        text_names = {p.name for p in text.iterdir()}
        text_chunks = [t for name, texts in chunk_texts.items() if name in text_names for t in texts]
        limit = embed_only(embedder_path, text_chunks, config.embed.batch_size)
        print("embed-only (text chunks):", json.dumps(limit), file=sys.stderr)
        seq_text, _ = sequential(text, data / "text-seq", embedder_path, config)

        started = time.perf_counter()
        own_ray = not ray.is_initialized() and init_ray(None) == "started"
        ray_start = time.perf_counter() - started
        pipe_mixed = pipeline(mixed, "mixed", config)
        print("pipeline (mixed):", json.dumps(pipe_mixed), file=sys.stderr)
        pipe_text = pipeline(text, "text", config)
        print("pipeline (text):", json.dumps(pipe_text), file=sys.stderr)
        # the run's store actor is detached and its folder goes with this temp dir: stop it
        from ray_app.documents.store_actor import NAMESPACE, store_actor_name

        ray.kill(ray.get_actor(store_actor_name(config.store, config.paths), namespace=NAMESPACE))
        if own_ray:
            ray.shutdown()

    report = {
        "benchmark": "ingest_bench", "smoke": args.smoke, "corpus": counts, "config": Path(args.config).name,
        "stages": {name: getattr(config, name).model_dump() for name in ("parse", "ocr_stage", "embed")},
        "embedder_threads": config.embedder_threads, "ray_start_s": round(ray_start, 2),
        "mixed": {"scanned_files": scanned, "sequential": seq_mixed, "pipeline": pipe_mixed},
        "text": {"sequential": seq_text, "pipeline": pipe_text, "embed_only": limit},
        "ratios": {
            "pipeline_vs_sequential": round(pipe_mixed["files_per_s"] / seq_mixed["files_per_s"], 2),
            "pipeline_vs_sequential_text": round(pipe_text["files_per_s"] / seq_text["files_per_s"], 2),
            "pipeline_vs_embed_only_text": round(pipe_text["chunks_per_s"] / limit["chunks_per_s"], 2),
        },
        "targets": {"pipeline_vs_sequential": 1.7, "pipeline_vs_embed_only_text": 0.7},
        "machine": machine(),
    }
    write_results("ingest_bench" + ("_smoke" if args.smoke else ""), report, Path(args.out), plot)
    print(f"{'':24} {'files/s':>8} {'pages/s':>8} {'chunks/s':>9}")
    for label, r in (("sequential, mixed", seq_mixed), ("pipeline, mixed", pipe_mixed),
                     ("sequential, text", seq_text), ("pipeline, text", pipe_text)):
        print(f"{label:24} {r['files_per_s']:8.2f} {r['pages_per_s']:8.2f} {r['chunks_per_s']:9.1f}")
    print(f"{'embed-only, text chunks':24} {'':8} {'':8} {limit['chunks_per_s']:9.1f}")
    print(json.dumps(report["ratios"]))
    return report


def _is_scan(path: Path) -> bool:
    """A generated PDF without a text layer."""
    if path.suffix != ".pdf":
        return False
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(str(path))
    try:
        return not pdf[0].get_textpage().get_text_range().strip()
    finally:
        pdf.close()


if __name__ == "__main__":
    main()
