"""LoRA adapters served without a restart: names resolved by the gateway, weights loaded by replicas.

A client asks for ``model="<base>:<adapter>"`` where ``<adapter>`` is a registered adapter line
(``name``: its ``champion``; ``name@3``: version 3; ``name@challenger``: an alias) or a local adapter
named in the config. The gateway resolves the reference against the MLflow registry (cached for
``refresh_s``, so an alias move takes effect within that time), answers 404 for an unknown adapter
and 400 for one trained on another base, and forwards the request under the pinned id
``<base>:<name>@<version>``. That id is Ray Serve's multiplexed model id: requests for an adapter go
to a replica that has it loaded, and each replica keeps at most ``max_per_replica`` adapters (LRU).
The replica's ``AdapterLoader`` turns the pinned id into a local folder (downloading registry
artifacts once) for ``ray.serve.llm``'s LoRA path, which otherwise only reads cloud buckets.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from ray_app.serve.config import AdapterServeSettings


class AdapterNotFoundError(LookupError):
    pass


class AdapterBaseMismatchError(ValueError):
    pass


@dataclass(frozen=True)
class ResolvedAdapter:
    base: str
    pinned: str  # name@version (registry) or name (local): stable for one set of weights

    @property
    def model_id(self) -> str:
        return f"{self.base}:{self.pinned}"


class AdapterCatalog:
    """What adapters exist for one served base model, and where their weights are."""

    def __init__(self, base: str, settings: AdapterServeSettings, registry_uri: str, cache_dir: Path):
        self.base = base
        self.settings = settings
        self.registry_uri = registry_uri
        self.cache_dir = cache_dir
        self._registry = None
        self._cache: dict[str, tuple[float, ResolvedAdapter | Exception]] = {}

    @property
    def registry(self):
        if self._registry is None:
            from ray_app.training.registry import AdapterRegistry

            self._registry = AdapterRegistry(self.registry_uri)
        return self._registry

    def _resolve_now(self, ref: str) -> ResolvedAdapter:
        from ray_app.training.registry import AdapterNotFound

        if ref in self.settings.local:
            return ResolvedAdapter(self.base, ref)
        try:
            version = self.registry.resolve(ref)
        except AdapterNotFound as e:
            raise AdapterNotFoundError(str(e)) from None
        if version.base_model != self.base:
            raise AdapterBaseMismatchError(
                f"adapter {version.ref} was trained on {version.base_model!r}, not {self.base!r}; "
                f"ask for {version.base_model}:{ref}")
        return ResolvedAdapter(self.base, version.ref)

    def resolve(self, ref: str) -> ResolvedAdapter:
        now = time.monotonic()
        cached = self._cache.get(ref)
        if cached is None or now - cached[0] > self.settings.refresh_s:
            try:
                cached = (now, self._resolve_now(ref))
            except (AdapterNotFoundError, AdapterBaseMismatchError) as e:
                cached = (now, e)
            self._cache[ref] = cached
        if isinstance(cached[1], Exception):
            raise cached[1]
        return cached[1]

    async def aresolve(self, ref: str) -> ResolvedAdapter:
        cached = self._cache.get(ref)
        if cached is not None and time.monotonic() - cached[0] <= self.settings.refresh_s:
            return self.resolve(ref)
        return await asyncio.to_thread(self.resolve, ref)  # the registry is a database

    def model_ids(self) -> list[str]:
        """``<base>:<name>`` for every local adapter and every registered line with a champion for this base."""
        names = set(self.settings.local)
        try:
            names |= {v.name for v in self.registry.champions() if v.base_model == self.base}
        except Exception:  # an unreachable registry must not break /v1/models
            pass
        return sorted(f"{self.base}:{name}" for name in names)

    def local_path(self, pinned: str) -> Path:
        """The adapter folder for a pinned id (registry artifacts are downloaded once, then reused)."""
        if pinned in self.settings.local:
            return Path(self.settings.local[pinned]).expanduser().resolve()
        name, _, version = pinned.partition("@")
        folder = self.cache_dir / name / version
        marker = folder / ".complete"
        if not marker.is_file():
            adapter = self.registry.get(name, version)
            downloaded = self.registry.download(adapter, folder / "download")
            target = downloaded if (downloaded / "adapter_config.json").is_file() else next(downloaded.rglob("adapter_config.json")).parent
            (folder / "path").write_text(str(target))
            marker.touch()
        return Path((folder / "path").read_text())


def catalog_for(base: str, settings: AdapterServeSettings, data_dir: str | None) -> AdapterCatalog:
    from ray_app.paths import DataDir

    paths = DataDir.from_path(data_dir)
    return AdapterCatalog(base, settings, settings.registry_uri or paths.mlflow_uri, paths.root / "adapter_cache")


def adapter_loader_class(catalog: AdapterCatalog):
    """A ``LoraModelLoader`` for ``ray.serve.llm`` that reads our catalog instead of a cloud bucket."""
    from ray_app.serve.internals import DiskMultiplexConfig, LoraModelLoader, global_id_manager

    class AdapterLoader(LoraModelLoader):
        async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
            if lora_model_id in self.disk_cache:
                return self.disk_cache[lora_model_id]
            base, _, pinned = lora_model_id.partition(":")
            path = await asyncio.to_thread(catalog.local_path, pinned)
            config = DiskMultiplexConfig.model_validate({
                "model_id": lora_model_id, "max_total_tokens": None, "local_path": str(path),
                "lora_assigned_int_id": global_id_manager.next()})
            self.disk_cache[lora_model_id] = config
            return config

    return AdapterLoader
