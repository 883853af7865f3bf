"""The ``Knowledge`` deployment: retrieval, RAG prompts, uploads and collections over ``KnowledgeBase``.

It reaches the collections through the cluster's one ``VectorStoreActor`` (the store's single writer),
embeds through the ``Embedder`` deployment and OCRs through the ``OCR`` deployment.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_app.documents.config import OCRConfig
from ray_app.documents.knowledge import ActorStore, KnowledgeBase, UploadSettings
from ray_app.documents.retrieval import CrossEncoderReranker
from ray_app.documents.store_actor import get_store
from ray_app.paths import DataDir
from ray_app.serve.config import KnowledgeConfig


class KnowledgeServer(KnowledgeBase):
    async def __init__(self, config: KnowledgeConfig, data_dir: str, embedder_source: str, embedder_path: str,
                       embedder: DeploymentHandle, ocr: DeploymentHandle | None, ocr_config: OCRConfig,
                       reranker_path: str | None):
        from transformers import AutoTokenizer

        info = await embedder.info.remote()
        tokenizer = AutoTokenizer.from_pretrained(embedder_path)
        max_tokens, overlap = config.chunking.resolve(info["max_tokens"], tokenizer.num_special_tokens_to_add())
        store = ActorStore(lambda: get_store(config.store, DataDir.from_path(data_dir)))

        async def embed(texts):
            return await embedder.embed.remote(texts)

        async def ocr_elements(parsed, data):
            return await ocr.elements.remote(parsed, data)

        super().__init__(
            store=store, embed=embed, tokenizer=tokenizer, ocr=ocr_elements if ocr is not None else None,
            upload=UploadSettings(embedder_source=embedder_source, max_tokens=max_tokens, overlap=overlap,
                                  ocr=ocr_config, max_bytes=config.max_upload_bytes,
                                  default_sensitivity=config.default_sensitivity, limits=config.limits,
                                  embed_batch=config.embed_batch, dimensions=info["dimensions"]),
            reranker=CrossEncoderReranker(reranker_path) if reranker_path else None,
            max_context_chars=config.max_context_chars, top_k=config.top_k,
        )


def build_knowledge_deployment(config: KnowledgeConfig, data_dir: str, embedder_source: str, embedder_path: str,
                               embedder, ocr, ocr_config: OCRConfig, reranker_path: str | None):
    return (serve.deployment(KnowledgeServer)
            .options(name="Knowledge", **config.replicas.serve_options())
            .bind(config, data_dir, embedder_source, embedder_path, embedder, ocr, ocr_config, reranker_path))
