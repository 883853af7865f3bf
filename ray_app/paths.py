"""The data directory: prepared models, downloaded wheels, indexes and ledgers live under it.

It defaults to ``./data`` (git-ignored) and is set by ``--data-dir`` on the CLI, ``data_dir`` in a
config file, or ``RAY_APP_DATA_DIR``. Prepared models can live apart from it (baked into a container
image while the data directory is a shared volume): ``RAY_APP_MODELS_DIR``. The environment variables
are read here, at the boundary, and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "RAY_APP_DATA_DIR"
MODELS_DIR_ENV = "RAY_APP_MODELS_DIR"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data")).expanduser().resolve()


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def from_path(cls, path: str | os.PathLike | None) -> "DataDir":
        return cls(Path(path).expanduser().resolve() if path else default_data_dir())

    @property
    def models(self) -> Path:
        if os.environ.get(MODELS_DIR_ENV):
            return Path(os.environ[MODELS_DIR_ENV]).expanduser().resolve()
        return self.root / "models"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def mlflow_uri(self) -> str:
        """The default MLflow tracking and registry store: sqlite in the data directory."""
        folder = self.root / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"

    def model(self, name: str) -> Path:
        return self.models / name
