"""Retrieval quality on BEIR SciFact: nDCG@10 and recall@100 for sparse-only (BM25), dense-only
(all-MiniLM-L6-v2) and hybrid (both prefetched, fused with RRF by Qdrant) over the 300 test queries.

The corpus is indexed the way ingestion indexes documents: title and abstract chunked by the
embedder's tokenizer (254/63 tokens for MiniLM), embedded, BM25-encoded, written into a Qdrant Edge
shard; queries go through the same ``Retriever`` the Serve graph uses. A document's score is its best
chunk's. Published anchors on SciFact: BM25 0.665 nDCG@10 (BEIR paper), all-MiniLM-L6-v2 0.645 (MTEB).

The data is read in place from ../shared/data/beir-scifact (never copied into the repo).

    python benchmarks/retrieval_bench.py
    python benchmarks/retrieval_bench.py --data /path/to/beir-scifact --queries 50
    python benchmarks/retrieval_bench.py --smoke       # 10 queries over 300 documents: seconds (tests)

Writes benchmarks/results/retrieval_bench.json and retrieval_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402

ANCHORS = {"sparse": ("BM25, BEIR paper", 0.665), "dense": ("all-MiniLM-L6-v2, MTEB", 0.645)}
MODES = ("sparse", "dense", "hybrid")


def load_beir(folder: Path) -> tuple[dict[str, dict], dict[str, str], dict[str, set[str]]]:
    corpus = {}
    with open(folder / "corpus.jsonl") as f:
        for line in f:
            doc = json.loads(line)
            corpus[doc["_id"]] = doc
    queries = {}
    with open(folder / "queries.jsonl") as f:
        for line in f:
            q = json.loads(line)
            queries[q["_id"]] = q["text"]
    qrels: dict[str, set[str]] = defaultdict(set)
    with open(folder / "qrels" / "test.tsv") as f:
        next(f)
        for line in f:
            qid, did, score = line.rstrip("\r\n").split("\t")
            if int(score) > 0:
                qrels[qid].add(did)
    return corpus, queries, dict(qrels)


def ndcg_at(ranked: list[str], relevant: set[str], k: int) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal


def recall_at(ranked: list[str], relevant: set[str], k: int) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant)


def index(corpus: dict[str, dict], store, embedder, chunker, sparse, batch: int = 256) -> dict:
    from tqdm import tqdm

    from ray_app.documents.parse import Element
    from ray_app.documents.processing import DocMeta, build_records

    store.create_collection("scifact", embedder.dimensions, "all-minilm-l6-v2")
    started = time.perf_counter()
    chunks_total, pending = 0, []

    def flush() -> None:
        texts = [c.text for _, chunks in pending for c in chunks]
        vectors = embedder.encode(texts)
        offset = 0
        for meta, chunks in pending:
            part = vectors[offset: offset + len(chunks)]
            offset += len(chunks)
            records = build_records(meta, chunks, part, [sparse.document(c.text) for c in chunks])
            store.replace_document("scifact", meta.doc_id, records)
        pending.clear()

    for doc_id, doc in tqdm(corpus.items(), desc="index SciFact", unit="doc", file=sys.stderr):
        elements = ([Element(doc["title"], "Title", 1)] if doc["title"] else []) + [Element(doc["text"], "NarrativeText", 1)]
        chunks = chunker.chunk(elements)
        chunks_total += len(chunks)
        meta = DocMeta(doc_id=doc_id, source=f"beir://scifact/{doc_id}", path=doc_id, sensitivity="public",
                       doc_hash="", format="text", title=doc["title"])
        pending.append((meta, chunks))
        if sum(len(c) for _, c in pending) >= batch:
            flush()
    flush()
    store.optimize("scifact")
    return {"documents": len(corpus), "chunks": chunks_total, "seconds": round(time.perf_counter() - started, 1)}


async def evaluate(retriever, queries: dict[str, str], qrels: dict[str, set[str]], mode: str,
                   chunk_limit: int) -> dict:
    from ray_app.documents.retrieval import RetrievalOptions

    # past the API's top_k limit (100): recall@100 needs 100 distinct documents, i.e. more chunks
    options = RetrievalOptions.model_construct(collection="scifact", top_k=chunk_limit, mode=mode, filter=None)
    ndcgs, recalls, latencies = [], [], []
    for qid, relevant in qrels.items():
        started = time.perf_counter()
        passages = await retriever.retrieve(queries[qid], options)
        latencies.append((time.perf_counter() - started) * 1000)
        ranked: list[str] = []
        for p in passages:  # passages come best first: a document's first chunk is its best one
            if p.doc_id not in ranked:
                ranked.append(p.doc_id)
        ndcgs.append(ndcg_at(ranked, relevant, 10))
        recalls.append(recall_at(ranked, relevant, 100))
    latencies.sort()
    return {"ndcg@10": round(statistics.fmean(ndcgs), 4), "recall@100": round(statistics.fmean(recalls), 4),
            "queries": len(ndcgs), "latency_p50_ms": round(latencies[len(latencies) // 2], 2),
            "latency_p99_ms": round(latencies[int(len(latencies) * 0.99)], 2)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("ndcg@10", "recall@100")):
        values = [report["results"][m][metric] for m in MODES]
        bars = ax.bar(MODES, values, color=["#8da0cb", "#66c2a5", "#fc8d62"])
        ax.bar_label(bars, fmt="%.3f")
        if metric == "ndcg@10":
            for mode, (label, value) in ANCHORS.items():
                ax.axhline(value, ls=":", color="grey")
                ax.text(2.45, value, f"{label} {value}", fontsize=7, va="bottom", ha="right")
            ax.axhline(report["target_hybrid_ndcg@10"], ls="--", color="red", lw=0.8)
        ax.set_ylim(0, 1)
        ax.set_title(f"SciFact test ({report['results']['hybrid']['queries']} queries): {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="10 queries over 300 documents, no cache (tests)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "beir-scifact"),
                        help="BEIR SciFact folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--data-dir", default=None, help="ray_app data directory (prepared models)")
    parser.add_argument("--queries", type=int, default=None, help="evaluate only the first N test queries")
    parser.add_argument("--docs", type=int, default=None,
                        help="index only the relevant documents of the evaluated queries plus the first N others")
    parser.add_argument("--chunk-limit", type=int, default=200,
                        help="chunks retrieved per query (enough distinct documents for recall@100)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.queries, args.docs = args.queries or 10, args.docs or 300

    from transformers import AutoTokenizer

    from ray_app.documents.chunk import TokenChunker
    from ray_app.documents.config import ChunkingConfig
    from ray_app.documents.retrieval import Retriever
    from ray_app.documents.sparse import SparseEncoder
    from ray_app.documents.store import EdgeVectorStore
    from ray_app.documents.embedder import SentenceEmbedder
    from ray_app.models.resolve import resolve_source
    from ray_app.paths import DataDir

    corpus, queries, qrels = load_beir(Path(args.data))
    if args.queries:
        qrels = dict(list(qrels.items())[: args.queries])
    if args.docs:
        keep = {d for relevant in qrels.values() for d in relevant} | set(list(corpus)[: args.docs])
        corpus = {d: doc for d, doc in corpus.items() if d in keep}
    embedder_path = resolve_source("all-minilm-l6-v2", DataDir.from_path(args.data_dir))
    embedder = SentenceEmbedder(embedder_path, batch_size=64)
    max_tokens, overlap = ChunkingConfig().resolve(embedder.max_tokens, embedder.tokenizer.num_special_tokens_to_add())
    chunker = TokenChunker(AutoTokenizer.from_pretrained(embedder_path), max_tokens, overlap)
    sparse = SparseEncoder()

    # the index is kept (under the data directory) and reused while the chunking and the embedder are the same
    cache = DataDir.from_path(args.data_dir).root / "bench" / f"scifact-{max_tokens}-{overlap}"
    with tempfile.TemporaryDirectory(prefix="scifact-") as tmp:
        if args.docs:  # a subset: indexed afresh, never cached
            store = EdgeVectorStore(tmp)
            indexed = index(corpus, store, embedder, chunker, sparse)
        elif (cache / "scifact" / "collection.json").is_file() and (cache / "index.json").is_file():
            store = EdgeVectorStore(cache)
            indexed = json.loads((cache / "index.json").read_text())
        else:
            shutil.rmtree(cache, ignore_errors=True)
            store = EdgeVectorStore(tmp)
            indexed = index(corpus, store, embedder, chunker, sparse)
            store.close()
            shutil.copytree(tmp, cache)
            (cache / "index.json").write_text(json.dumps(indexed))
            store = EdgeVectorStore(cache)
        print(f"indexed {indexed['documents']} documents as {indexed['chunks']} chunks in {indexed['seconds']} s",
              file=sys.stderr)

        async def search(name, **kwargs):
            return store.search(name, **kwargs)

        async def embed_query(text):
            return embedder.encode([text])[0].tolist()

        retriever = Retriever(search, embed_query, sparse)
        results = {mode: asyncio.run(evaluate(retriever, queries, qrels, mode, args.chunk_limit)) for mode in MODES}
        store.close()

    report = {
        "benchmark": "retrieval_bench", "dataset": "BEIR SciFact test", "smoke": args.smoke,
        "queries": len(qrels), "documents": len(corpus), "embedder": "all-minilm-l6-v2",
        "chunking": {"max_tokens": max_tokens, "overlap_tokens": overlap}, "index": indexed,
        "store": "qdrant-edge (HNSW dense, BM25 sparse with IDF modifier, RRF k=60)",
        "doc_score": "best chunk", "chunk_limit": args.chunk_limit,
        "anchors_ndcg@10": {m: v for m, (_, v) in ANCHORS.items()}, "target_hybrid_ndcg@10": 0.70,
        "results": results, "machine": machine(),
    }
    write_results("retrieval_bench" + ("_smoke" if args.smoke else ""), report, Path(args.out), plot)
    print(f"{'mode':8} {'nDCG@10':>8} {'R@100':>7} {'p50 ms':>7}")
    for mode in MODES:
        r = results[mode]
        print(f"{mode:8} {r['ndcg@10']:8.4f} {r['recall@100']:7.4f} {r['latency_p50_ms']:7.1f}")
    print(f"hybrid vs target 0.70: {results['hybrid']['ndcg@10'] / 0.70:.3f}x; "
          f"vs BM25 anchor: {results['hybrid']['ndcg@10'] / 0.665:.3f}x")
    return report


if __name__ == "__main__":
    main()
