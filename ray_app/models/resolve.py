"""Turn a configured model ``source`` into something an engine can load.

A source is one of: a model prepared by ``ray-app models prepare`` (by catalog name), a local
folder, or a Hugging Face id (downloaded the normal way where a hub is reachable, read from the
local Hugging Face cache when offline).
"""

from __future__ import annotations

from pathlib import Path

from ray_app.models.catalog import CATALOG
from ray_app.models.prepare import MANIFEST_NAME
from ray_app.paths import DataDir


class ModelSourceError(ValueError):
    """A model source cannot be resolved; the message says what to do about it."""


def _looks_like_hf_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def resolve_source(source: str, paths: DataDir) -> str:
    """A local folder (absolute path) or a Hugging Face id for ``source``."""
    if source in CATALOG:
        folder = paths.model(source)
        if not (folder / MANIFEST_NAME).is_file():
            raise ModelSourceError(
                f"{source!r} is not prepared under {paths.models}: run `ray-app models prepare {source}`"
            )
        return str(folder)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path.resolve()} has no config.json: not a model folder")
        return str(path.resolve())
    if _looks_like_hf_id(source):
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise ModelSourceError(
                f"{source!r} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1); "
                f"prepared models: {sorted(CATALOG)}"
            )
        return source
    raise ModelSourceError(
        f"{source!r} is neither a prepared model {sorted(CATALOG)}, an existing folder, nor a Hugging Face id (org/name)"
    )
