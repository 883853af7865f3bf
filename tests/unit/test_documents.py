"""The document classes on real engines, without Ray: parsing every format, Tesseract OCR, token
chunking, both vector stores (Qdrant Edge and qdrant-client's local mode), and the knowledge base
(uploads, retrieval, RAG prompts)."""

from __future__ import annotations

import pytest

from ray_app.documents.chunk import TokenChunker
from ray_app.documents.config import ChunkingConfig, DocumentLimits, IngestConfig, OCRConfig
from ray_app.documents.knowledge import KnowledgeBase, LocalStore, UploadSettings
from ray_app.documents.ocr import TesseractOCR
from ray_app.documents.parse import DocumentParser, Element, RefusedFile, table_rows
from ray_app.documents.pipeline import DocumentAssembler, EmbedStage, OCRStage, ParseStage, _rows
from ray_app.documents.processing import DocMeta, DocumentSettings, build_records, ocr_elements
from ray_app.documents.retrieval import RetrievalFilter, RetrievalOptions, rag_messages
from ray_app.documents.sources import list_files, sensitivity_for
from ray_app.documents.store import (
    CollectionNotFound,
    EdgeVectorStore,
    PointRecord,
    QdrantClientVectorStore,
    SearchFilter,
    StoreError,
    point_id,
)
from tests.corpus import FACTS, broken_files, good_files, make_corpus, text_image, text_pdf


@pytest.fixture(scope="module")
def embedder(data_dir):
    from ray_app.documents.embedder import SentenceEmbedder

    return SentenceEmbedder(str(data_dir.model("all-minilm-l6-v2")), num_threads=1)


@pytest.fixture(scope="module")
def ocr():
    return TesseractOCR(OCRConfig())


def parse_all(name: str, data: bytes, ocr: TesseractOCR) -> list[Element]:
    parsed = DocumentParser().parse(name, data)
    return ocr_elements(parsed, data, ocr)


@pytest.mark.parametrize("fact", FACTS, ids=lambda f: f.file)
def test_every_format_yields_its_text(fact, ocr):
    elements = parse_all(fact.file, good_files()[fact.file], ocr)
    matching = [e for e in elements if fact.answer in " ".join(e.text.split())]
    assert matching, [e.text for e in elements]
    if fact.page is not None:
        assert matching[0].page == fact.page


def test_element_types_pages_and_tables(ocr):
    pdf = DocumentParser().parse("handbook.pdf", good_files()["handbook.pdf"])
    assert (pdf.format, pdf.page_count, pdf.title, pdf.ocr_pages) == ("pdf", 2, "Employee handbook", [])
    assert {e.page for e in pdf.elements} == {1, 2}
    scanned = DocumentParser().parse("scanned_memo.pdf", good_files()["scanned_memo.pdf"])
    assert scanned.ocr_pages == [1] and scanned.elements == []  # no text layer: OCR's job
    docx = DocumentParser().parse("offices.docx", good_files()["offices.docx"])
    [table] = [e for e in docx.elements if e.type == "Table"]
    assert table.text.splitlines() == ["Name | Office", "Dana | Lisbon", "Omar | Nairobi", "Li | Toronto"]
    assert docx.title == "Office directory"
    md = DocumentParser().parse("onboarding.md", good_files()["onboarding.md"])
    assert [e.type for e in md.elements][:3] == ["Title", "UncategorizedText", "Title"]
    assert "ListItem" in {e.type for e in md.elements}
    html = DocumentParser().parse("refunds.html", good_files()["refunds.html"])
    assert html.title == "Refund policy"


def test_table_rows_keep_every_cell():
    html = "<table><tr><th>A</th><th>B</th></tr><tr><td>1</td><td> two  words </td></tr></table>"
    assert table_rows(html) == "A | B\n1 | two words"


@pytest.mark.parametrize("name", sorted(broken_files()))
def test_broken_files_are_refused_with_their_reason(name, ocr):
    data, code = broken_files()[name]
    with pytest.raises(RefusedFile) as exc:
        parse_all(name, data, ocr)
    assert exc.value.code == code
    assert exc.value.message


def test_ocr_lines_have_boxes_and_confidence(ocr):
    page = ocr.image(text_image(["The refund window is 45 days.", "Call 555 0100 for help."], size=(1400, 500)))
    assert [line.text for line in page.lines] == ["The refund window is 45 days.", "Call 555 0100 for help."]
    first, second = page.lines
    assert first.box[1] < second.box[1] and first.box[0] < first.box[2] <= page.width
    assert all(line.confidence > 80 for line in page.lines)


def test_chunks_fit_the_embedder_and_overlap(embedder):
    size, overlap = ChunkingConfig().resolve(embedder.max_tokens, embedder.tokenizer.num_special_tokens_to_add())
    assert (size, overlap) == (254, 63)  # all-MiniLM-L6-v2 reads 256 tokens: 2 are [CLS]/[SEP]
    elements = [Element(f"Paragraph {p}: " + "the quick brown fox jumps over the lazy dog " * 30, "PageText", p)
                for p in range(1, 5)]
    chunks = TokenChunker(embedder.tokenizer, size, overlap).chunk(elements)
    assert len(chunks) > 4
    text = "\n\n".join(e.text for e in elements)
    for a, b in zip(chunks, chunks[1:]):
        if a.page == b.page:
            assert a.char_end - b.char_start > 100  # neighbours on a page overlap by ~a quarter
    for chunk in chunks:
        assert text[chunk.char_start:chunk.char_end] == chunk.text
        assert embedder.count_tokens([chunk.text])[0] <= embedder.max_tokens  # nothing truncated by the model
        assert chunk.page == chunk.page_end  # never across a page break: a citation names one page
        assert chunk.text.startswith(f"Paragraph {chunk.page}") or not chunk.text.startswith("Paragraph")
    assert [c.page for c in chunks] == sorted(c.page for c in chunks)
    assert {c.page for c in chunks} == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="exceeds what the embedder reads"):
        ChunkingConfig(max_tokens=512).resolve(256, 2)


def test_sensitivity_rules_and_listing(tmp_path):
    config = IngestConfig.load("configs/ingest.yaml")
    assert sensitivity_for("hr/salaries.pdf", config, None) == "confidential"
    assert sensitivity_for("public/faq.md", config, "internal") == "public"  # a folder rule beats the label
    assert sensitivity_for("misc/notes.txt", config, "confidential") == "confidential"
    assert sensitivity_for("misc/notes.txt", config, None) == "internal"
    (tmp_path / "hr").mkdir()
    (tmp_path / "hr" / "pay.txt").write_text("x")
    (tmp_path / ".hidden").write_text("x")
    tasks = list_files(str(tmp_path), config)
    assert [(t.rel_path, t.sensitivity) for t in tasks] == [("hr/pay.txt", "confidential")]
    assert tasks[0].uri.startswith("file:///") and len(tasks[0].doc_id) == 36


def _records(embedder, doc: str, texts: list[str], sensitivity="internal"):
    from ray_app.documents.sparse import SparseEncoder

    sparse = SparseEncoder()
    vectors = embedder.encode(texts)
    return [PointRecord(point_id(doc, i, t), v.tolist(), *sparse.document(t),
                        {"doc_id": doc, "chunk_index": i, "chunk_count": len(texts), "doc_hash": f"h-{doc}",
                         "source": f"file:///{doc}.txt", "sensitivity": sensitivity, "text": t})
            for i, (t, v) in enumerate(zip(texts, vectors))]


@pytest.fixture(params=["edge", "qdrant-local"])
def store(request, tmp_path):
    if request.param == "edge":
        s = EdgeVectorStore(tmp_path / "collections")
    else:
        s = QdrantClientVectorStore(path=str(tmp_path / "qdrant"))
    yield s
    s.close()


def test_store_replace_search_filter_delete(store, embedder):
    from ray_app.documents.sparse import SparseEncoder

    store.ensure_collection("kb", embedder.dimensions, "all-minilm-l6-v2")
    store.replace_document("kb", "vac", _records(embedder, "vac", ["Employees receive 27 days of paid vacation.",
                                                                   "Unused vacation days carry over."]))
    store.replace_document("kb", "park", _records(embedder, "park", ["The garage access code is 4417."],
                                                  sensitivity="confidential"))
    info = store.collection("kb")
    assert (info.points, info.documents, info.dimensions) == (3, 2, 384)
    docs = store.documents("kb")
    assert set(docs) == {"vac", "park"} and docs["vac"]["chunk_count"] == 2 and "text" not in docs["vac"]

    query = "how many vacation days"
    dense, sparse = embedder.encode([query])[0].tolist(), SparseEncoder().query(query)
    for mode in ("hybrid", "dense", "sparse"):
        hits = store.search("kb", dense=dense, sparse=sparse, mode=mode, limit=3, prefetch_limit=10)
        assert hits[0].payload["doc_id"] == "vac", mode
    only_confidential = store.search("kb", dense=dense, sparse=sparse, mode="hybrid", limit=3, prefetch_limit=10,
                                     filter=SearchFilter(sensitivities=["confidential"]))
    assert {h.payload["doc_id"] for h in only_confidential} == {"park"}

    # replacing a document drops its old chunks
    store.replace_document("kb", "vac", _records(embedder, "vac", ["Vacation is now 30 days."]))
    assert store.collection("kb").points == 2
    assert store.documents("kb")["vac"]["chunk_count"] == 1
    assert store.delete_document("kb", "vac") == 1 and store.delete_document("kb", "vac") == 0
    with pytest.raises(StoreError, match="cannot add"):
        store.ensure_collection("kb", 8, "other")
    with pytest.raises(CollectionNotFound, match="kb"):
        store.collection("missing")


def test_an_edge_collection_has_one_writer(tmp_path, embedder):
    first = EdgeVectorStore(tmp_path)
    first.ensure_collection("kb", embedder.dimensions, "e")
    second = EdgeVectorStore(tmp_path)
    with pytest.raises(StoreError, match="open in another process"):
        second.collection("kb")
    first.close()
    assert second.collection("kb").points == 0  # free once the first closed it
    second.close()


@pytest.fixture
async def knowledge(tmp_path, embedder, ocr):
    store = EdgeVectorStore(tmp_path / "collections")
    store.ensure_collection("kb", embedder.dimensions, "all-minilm-l6-v2")

    async def embed(texts):
        return embedder.embed(texts)

    async def ocr_fn(parsed, data):
        return ocr_elements(parsed, data, ocr)

    size, overlap = ChunkingConfig().resolve(embedder.max_tokens, 2)
    kb = KnowledgeBase(LocalStore(store), embed, embedder.tokenizer, ocr=ocr_fn,
                       upload=UploadSettings("all-minilm-l6-v2", size, overlap, OCRConfig(), 10_000_000, "internal"))
    yield kb
    store.close()


async def test_uploads_index_once_and_answer_known_questions(knowledge, tmp_path):
    make_corpus(tmp_path / "corpus", with_broken=False)
    for fact in FACTS:
        outcome = await knowledge.ingest_file("kb", fact.file, (tmp_path / "corpus" / fact.file).read_bytes())
        assert outcome.status == "indexed" and outcome.chunks >= 1, outcome
    again = await knowledge.ingest_file("kb", "handbook.pdf", (tmp_path / "corpus" / "handbook.pdf").read_bytes())
    assert again.status == "unchanged"
    for fact in FACTS:
        passages = await knowledge.retrieve(fact.question, RetrievalOptions(collection="kb", top_k=3))
        assert passages[0].path == fact.file, (fact.question, [p.path for p in passages])
        assert fact.answer in " ".join(passages[0].text.split())
        if fact.page:
            assert passages[0].page == fact.page
    with pytest.raises(RefusedFile) as exc:
        await knowledge.ingest_file("kb", "locked.pdf", broken_files()["locked.pdf"][0])
    assert exc.value.code == "encrypted"


async def test_rag_messages_cite_what_they_use(knowledge, tmp_path):
    make_corpus(tmp_path / "corpus", with_broken=False)
    await knowledge.ingest_file("kb", "refunds.html", (tmp_path / "corpus" / "refunds.html").read_bytes())
    await knowledge.ingest_file("kb", "cafeteria.txt", (tmp_path / "corpus" / "cafeteria.txt").read_bytes())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How long is the refund window?"}]
    augmented, citations, passages = await knowledge.augment(
        messages, RetrievalOptions(collection="kb", top_k=2, filter=RetrievalFilter(sensitivity=["internal"])))
    assert augmented[0]["role"] == "system" and augmented[0]["content"].startswith("Be brief.")
    assert "[1] Refund policy" in augmented[0]["content"] and augmented[-1] == messages[-1]
    assert citations[0]["index"] == 1 and citations[0]["title"] == "Refund policy"
    assert "refund window is 45 days" in citations[0]["snippet"]
    # a context budget keeps only what fits, and only that is cited
    _, cited = rag_messages(messages, passages, max_context_chars=120)
    assert len(cited) == 1


BOMBS = {  # name -> (maker, the refusal code)
    "20000-pages.pdf": ("many_pages_pdf", "too_many_pages"),
    "poster.pdf": ("huge_page_pdf", "too_large"),
    "bomb.docx": ("zip_bomb_docx", "too_large"),
    "frames.tiff": ("many_frames_tiff", "too_many_pages"),
    "declared.png": ("huge_declared_png", "too_large"),
}


@pytest.mark.parametrize("name", BOMBS)
def test_hostile_files_are_refused_before_they_cost_memory(name, ocr):
    import resource

    from tests import bombs

    maker, code = BOMBS[name]
    data = getattr(bombs, maker)()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RefusedFile) as exc:
        parse_all(name, data, ocr)
    assert exc.value.code == code, exc.value.message
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"{name} raised the peak memory by {grown_mib:.0f} MiB"


def test_ocr_renders_one_page_at_a_time_and_checks_each(ocr):
    from ray_app.documents.config import DocumentLimits
    from ray_app.documents.ocr import TooLarge, iter_pdf_pages
    from tests import bombs
    from tests.corpus import image_pdf

    pages = iter_pdf_pages(image_pdf([["one"], ["two"], ["three"]]), 100, DocumentLimits())
    first = next(pages)  # a generator: nothing after page 1 is rendered yet
    assert first[0] == 1 and first[1].size == (int(612 * 100 / 72), int(792 * 100 / 72))
    assert [n for n, _ in pages] == [2, 3]
    with pytest.raises(TooLarge):
        next(iter_pdf_pages(bombs.huge_page_pdf(), 200, DocumentLimits()))
    with pytest.raises(TooLarge, match="pages"):
        next(iter_pdf_pages(bombs.many_pages_pdf(50), 72, DocumentLimits(max_pages=10)))


async def test_a_new_label_on_the_same_bytes_relabels_every_chunk(knowledge, tmp_path):
    data = b"# Pay\n\nSalaries are reviewed every March. " + b"The review board meets quarterly. " * 60
    first = await knowledge.ingest_file("kb", "pay.md", data)
    assert first.status == "indexed" and first.sensitivity == "internal" and first.chunks > 1
    again = await knowledge.ingest_file("kb", "pay.md", data, "confidential")
    assert again.status == "relabelled" and again.sensitivity == "confidential"
    passages = await knowledge.retrieve("salary review", RetrievalOptions(collection="kb", top_k=10))
    assert passages and {p.sensitivity for p in passages} == {"confidential"}
    assert (await knowledge.ingest_file("kb", "pay.md", data, "confidential")).status == "unchanged"


async def test_a_replaced_document_is_searchable_throughout(knowledge, embedder):
    # the new version is written before the old one is deleted: a crash in between loses neither
    class CrashAfterUpsert(Exception):
        pass

    store = knowledge.store._store
    await knowledge.ingest_file("kb", "memo.md", b"# Memo\n\nThe launch is on Monday.")
    original_delete = store._delete_stale

    def crash(*args, **kwargs):
        raise CrashAfterUpsert

    store._delete_stale = crash
    with pytest.raises(CrashAfterUpsert):
        await knowledge.ingest_file("kb", "memo.md", b"# Memo\n\nThe launch moved to Friday.")
    store._delete_stale = original_delete
    texts = " ".join(p.text for p in await knowledge.retrieve("launch", RetrievalOptions(collection="kb")))
    assert "Friday" in texts and "Monday" in texts  # both versions: nothing was lost
    # two versions' chunk 0s: the document is not complete, so the next ingest rewrites it, cleanly
    redo = await knowledge.ingest_file("kb", "memo.md", b"# Memo\n\nThe launch moved to Friday.")
    assert redo.status == "indexed"
    texts = " ".join(p.text for p in await knowledge.retrieve("launch", RetrievalOptions(collection="kb")))
    assert "Friday" in texts and "Monday" not in texts


async def test_uploads_embed_in_small_batches(knowledge):
    calls = []
    embed = knowledge.embed

    async def counting(texts):
        calls.append(len(texts))
        return await embed(texts)

    knowledge.embed = counting
    knowledge.upload.embed_batch = 4
    data = b"# Long\n\n" + b"Quarterly numbers are reviewed by the finance team every month. " * 400
    outcome = await knowledge.ingest_file("kb", "long.md", data)
    assert outcome.chunks > 8 and max(calls) <= 4 and sum(calls) == outcome.chunks


async def test_collections_are_created_with_a_default_label_and_dropped(knowledge):
    from ray_app.documents.store import CollectionExists

    info = await knowledge.create_collection("hr", "confidential")
    assert info["name"] == "hr" and info["default_sensitivity"] == "confidential" and info["dimensions"] == 384
    with pytest.raises(CollectionExists):
        await knowledge.create_collection("hr")
    outcome = await knowledge.ingest_file("hr", "pay.md", b"# Pay\n\nBands are reviewed yearly.")
    assert outcome.sensitivity == "confidential"  # the collection's default, not the server's
    with pytest.raises(ValueError, match="embeds with"):
        await knowledge.create_collection("x", embedder="other-model")
    await knowledge.drop_collection("hr")
    with pytest.raises(CollectionNotFound, match="POST /v1/collections"):
        await knowledge.ingest_file("hr", "pay.md", b"x")


async def test_documents_are_listed_a_page_at_a_time_with_their_labels(knowledge):
    for i, name in enumerate(["c.md", "a.md", "b.md"]):
        await knowledge.ingest_file("kb", name, f"# Doc {name}\n\nBody {i} about topic {name}.".encode(),
                                    "confidential" if name == "b.md" else None)
    first = await knowledge.documents("kb", limit=2)
    assert [d["source"] for d in first["data"]] == ["upload://kb/a.md", "upload://kb/b.md"] and first["has_more"]
    assert [d["sensitivity"] for d in first["data"]] == ["internal", "confidential"]
    assert all(d["chunks"] >= 1 and d["ingested_at"] for d in first["data"])
    rest = await knowledge.documents("kb", limit=2, after=first["last_id"])
    assert [d["path"] for d in rest["data"]] == ["c.md"] and not rest["has_more"]
    await knowledge.delete_document("kb", rest["data"][0]["doc_id"])
    assert len((await knowledge.documents("kb"))["data"]) == 2
    with pytest.raises(ValueError, match="after"):
        await knowledge.documents("kb", after="no-such-doc")
    with pytest.raises(CollectionNotFound):
        await knowledge.documents("nope")


# Both ingestion paths run the same steps (processing.DocumentSteps): the same file gets the same
# outcome from an upload and from the pipeline's stages, called here on dict batches.

def through_ray(batch: dict):
    """A batch as Ray Data hands it to the next stage: an Arrow block, in the stages' batch format."""
    from ray.data.block import BlockAccessor, BlockType

    return BlockAccessor.for_block(BlockAccessor.batch_to_block(batch, BlockType.ARROW)).to_batch_format("pyarrow")


@pytest.fixture
def both_paths(tmp_path, data_dir, embedder, ocr):
    """``upload`` and ``pipeline`` (the stages on a dict batch, through Arrow between stages as Ray Data
    passes them) on the same settings, each -> (an outcome, or a refusal as (code, message); the
    payloads written). ``known`` is what the pipeline finds stored: doc_id -> (hash, label)."""
    from dataclasses import asdict
    from types import SimpleNamespace

    import numpy as np

    stores, embed_stages = [], {}

    async def upload(settings: DocumentSettings, name: str, data: bytes):
        store = EdgeVectorStore(tmp_path / f"collections-{len(stores)}")
        stores.append(store)
        store.ensure_collection("kb", embedder.dimensions, settings.embedder)

        async def embed(texts):
            return embedder.embed(texts)

        async def ocr_fn(parsed, raw):
            return ocr_elements(parsed, raw, ocr)

        kb = KnowledgeBase(LocalStore(store), embed, embedder.tokenizer, ocr=ocr_fn, upload=UploadSettings(
            settings.embedder, settings.max_tokens, settings.overlap, settings.ocr, settings.max_bytes, "internal",
            limits=settings.limits))
        try:
            return await kb.ingest_file("kb", name, data), store.chunks("kb", 100)
        except RefusedFile as e:
            return (e.code, e.message), []

    def rows(settings: DocumentSettings, files: dict[str, bytes], known: dict | None = None) -> list[dict]:
        """The rows the driver reads for ``files`` ingested as one batch."""
        items = []
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            items += [{**asdict(task), "doc_id": task.doc_id} for task in list_files(str(tmp_path / name), IngestConfig())]
        batch = {k: np.array([item[k] for item in items], dtype=object) for k in items[0]}
        batch = through_ray(ParseStage(settings, known or {})(through_ray(batch)))
        batch = through_ray(OCRStage(settings)(batch))
        if repr(settings) not in embed_stages:
            model = str(data_dir.model("all-minilm-l6-v2"))
            embed_stages[repr(settings)] = EmbedStage(settings, model, "cpu", 1, 8)
        return _rows(through_ray(embed_stages[repr(settings)](batch)))

    def pipeline(settings: DocumentSettings, name: str, data: bytes, known: dict | None = None):
        assembler = DocumentAssembler()
        for row in rows(settings, {name: data}, known):
            meta = DocMeta(**row["doc"])
            if row["status"] == "refused":
                return (row["code"], row["reason"]), []
            if row["status"] != "chunk":
                return meta.outcome(row["status"]), []
            if complete := assembler.add(row):
                return meta.outcome("indexed", len(complete[0])), [r.payload for r in build_records(meta, *complete)]

    yield SimpleNamespace(upload=upload, pipeline=pipeline, rows=rows)
    for store in stores:
        store.close()


def settings(**changes) -> DocumentSettings:
    values = {"embedder": "all-minilm-l6-v2", "max_tokens": 254, "overlap": 63, "ocr": OCRConfig(),
              "limits": DocumentLimits(), "max_bytes": 10_000_000}
    return DocumentSettings(**values | changes)


LONG = b"# Long\n\n" + b"Quarterly numbers are reviewed by the finance team every month. " * 120
REFUSALS = {  # name -> (bytes, settings, the refusal code)
    # the pipeline indexed a document over limits.max_chunks: only uploads checked it
    "long.md": (LONG, settings(limits=DocumentLimits(max_chunks=3)), "too_large"),
    # a PDF without text that needs no OCR: "no text to index" from uploads, "..., with OCR" from the pipeline
    "blank.pdf": (text_pdf([[]]), settings(ocr=OCRConfig(min_text_chars=0)), "no_text"),
    "big.md": (LONG, settings(max_bytes=1000), "too_large"),
    "blank.png": (broken_files()["blank.png"][0], settings(), "no_text"),
}


@pytest.mark.parametrize("name", REFUSALS)
async def test_both_paths_refuse_a_file_alike(name, both_paths):
    data, document_settings, code = REFUSALS[name]
    upload, _ = await both_paths.upload(document_settings, name, data)
    pipeline, _ = both_paths.pipeline(document_settings, name, data)
    assert upload == pipeline and upload[0] == code, (upload, pipeline)


async def test_a_parser_crash_is_a_refusal_on_both_paths(both_paths, monkeypatch):
    # uploads let the exception through (an internal error) where the pipeline refused the file
    def crash(self, name, data):
        raise RuntimeError("boom")

    monkeypatch.setattr(DocumentParser, "parse", crash)
    upload, _ = await both_paths.upload(settings(), "notes.md", b"# Notes\n\nSome text.")
    pipeline, _ = both_paths.pipeline(settings(), "notes.md", b"# Notes\n\nSome text.")
    assert upload == pipeline == ("parse_error", "RuntimeError: boom")


async def test_both_paths_write_the_same_chunks(both_paths):
    data = good_files()["scanned_memo.pdf"]
    upload, stored = await both_paths.upload(settings(), "memo.pdf", data)
    pipeline, written = both_paths.pipeline(settings(), "memo.pdf", data)
    assert (upload.status, upload.chunks, upload.pages, upload.ocr_pages) == ("indexed", 1, 1, 1)
    assert (pipeline.status, pipeline.chunks, pipeline.pages, pipeline.ocr_pages) == ("indexed", 1, 1, 1)
    apart = ("doc_id", "source", "ingested_at")  # an upload's source is upload://<collection>/<name>
    assert [{k: v for k, v in p.items() if k not in apart} for p in written] == \
           [{k: v for k, v in p.items() if k not in apart} for p in stored]
    assert "garage access code is 4417" in written[0]["text"]
    doc_hash = written[0]["doc_hash"]
    again, _ = both_paths.pipeline(settings(), "memo.pdf", data, {pipeline.doc_id: (doc_hash, "internal")})
    relabelled, _ = both_paths.pipeline(settings(), "memo.pdf", data, {pipeline.doc_id: (doc_hash, "public")})
    assert (again.status, relabelled.status) == ("unchanged", "relabelled")


def test_the_pipeline_keeps_ints_ints_in_a_batch_of_mixed_documents(both_paths):
    # Arrow's numpy conversion made an int field that is null in some row of a batch a float: a refusal's
    # empty chunk made every chunk_index a float, which qdrant-client's local mode matched to no chunk 0,
    # so a collection ingested by the pipeline listed no documents
    files = {"notes.md": b"# Notes\n\nSome text.", "memo.pdf": good_files()["handbook.pdf"],
             "blank.png": broken_files()["blank.png"][0]}
    assembler, payloads, statuses = DocumentAssembler(), [], {}
    for row in both_paths.rows(settings(), files):
        statuses[row["doc"]["path"]] = row["status"]
        if row["status"] == "chunk" and (complete := assembler.add(row)):
            payloads += [r.payload for r in build_records(DocMeta(**row["doc"]), *complete)]
    assert statuses == {"notes.md": "chunk", "memo.pdf": "chunk", "blank.png": "refused"}
    assert sorted((p["path"], p["chunk_index"], p["page"]) for p in payloads) == \
           [("memo.pdf", 0, 1), ("memo.pdf", 1, 2), ("notes.md", 0, None)]
    for p in payloads:
        ints = {k: p[k] for k in ("chunk_index", "chunk_count", "char_start", "char_end", "tokens")}
        assert all(type(v) is int for v in ints.values()), p
        assert p["page"] is None or type(p["page"]) is int, p
