"""Sentence embeddings with sentence-transformers: one class, used by the Serve deployment and by
the ingestion pipeline alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


class InputTooLongError(ValueError):
    def __init__(self, index: int, tokens: int, limit: int):
        self.index, self.tokens, self.limit = index, tokens, limit
        super().__init__(
            f"input[{index}] has {tokens} tokens; this embedder reads at most {limit} tokens per input"
        )

    def __reduce__(self):
        # crosses Ray process boundaries: rebuild from the fields, not from the message
        return type(self), (self.index, self.tokens, self.limit)


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (n, dimensions) float32, L2-normalised where the model normalises
    token_counts: list[int]


class SentenceEmbedder:
    """A sentence-transformers model loaded from a local folder (or a hub id where one is reachable)."""

    def __init__(self, model_path: str, device: str = "cpu", num_threads: int | None = None,
                 batch_size: int = 32):
        import torch
        from sentence_transformers import SentenceTransformer

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model = SentenceTransformer(model_path, device=device)
        self.batch_size = batch_size
        self.tokenizer = self.model.tokenizer
        self.max_tokens: int = int(self.model.max_seq_length)
        self.dimensions: int = int(self.model.get_embedding_dimension())

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees them (special tokens included), before truncation."""
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def check_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts of ``texts``; raises ``InputTooLongError`` for the first one over the limit,
        because a silently truncated input is partly invisible to retrieval."""
        counts = self.count_tokens(texts)
        for i, n in enumerate(counts):
            if n > self.max_tokens:
                raise InputTooLongError(i, n, self.max_tokens)
        return counts

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dimensions) float32 vectors; inputs over ``max_tokens`` are truncated by the model."""
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors.astype(np.float32, copy=False)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        counts = self.check_lengths(texts)
        return Embeddings(self.encode(texts), counts)
