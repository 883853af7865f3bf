"""Shared fixtures: the prepared offline models (the tests never reach a model hub)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ray_app.models.prepare import ModelPreparer  # noqa: E402
from ray_app.paths import DataDir  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> DataDir:
    """The project's data directory with the default models prepared (idempotent: a no-op when done)."""
    paths = DataDir.from_path(None)
    ModelPreparer(paths).prepare()
    return paths
