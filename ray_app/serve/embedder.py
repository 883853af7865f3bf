"""The ``Embedder`` deployment: a thin Serve wrapper over ``SentenceEmbedder`` with request batching."""

from __future__ import annotations

import asyncio

from ray import serve

from ray_app.documents.embedder import Embeddings, SentenceEmbedder
from ray_app.serve.config import EmbedderConfigModel


class EmbedderServer:
    """Concurrent requests are gathered by ``@serve.batch`` and encoded together in a worker thread,
    so the replica's event loop keeps accepting requests while a batch runs."""

    def __init__(self, config: EmbedderConfigModel, model_path: str):
        self.config = config
        self.embedder = SentenceEmbedder(
            model_path, device=config.device, num_threads=config.num_threads, batch_size=config.max_batch_size
        )
        self._encode_batch.set_max_batch_size(config.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    def info(self) -> dict:
        return {"max_tokens": self.embedder.max_tokens, "dimensions": self.embedder.dimensions}

    async def embed(self, texts: list[str]) -> Embeddings:
        # Lengths are checked per request, so one over-long input fails its own request only.
        counts = self.embedder.check_lengths(texts)
        return Embeddings(await self._encode_batch(texts), counts)

    @serve.batch
    async def _encode_batch(self, requests: list[list[str]]) -> list:
        flat = [text for texts in requests for text in texts]
        vectors = await asyncio.to_thread(self.embedder.encode, flat)
        out, start = [], 0
        for texts in requests:
            out.append(vectors[start:start + len(texts)])
            start += len(texts)
        return out


def build_embedder_deployment(config: EmbedderConfigModel, model_path: str):
    return (
        serve.deployment(EmbedderServer)
        .options(name=f"Embedder:{config.name}", **config.replicas.serve_options())
        .bind(config, model_path)
    )
