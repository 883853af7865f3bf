"""The MLflow Model Registry as the adapter catalog.

One registered model per adapter line (``TrainConfig.name``); each training run adds a version tagged
with its base model, dataset hash, chat-template hash, evaluation scores and parity result. Serving
follows aliases: ``champion`` is what ``<base>:<name>`` answers with; ``challenger`` is for trials;
promotion refuses a version whose parity check did not pass, and keeps a history so ``rollback``
can move ``champion`` back. Promotion and rollback read, then write, the alias and its history: they
hold an exclusive lock for it (a file lock beside a sqlite registry, or per machine for a server), so
two concurrent promotions cannot lose one of them from the history.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "ray_app.champion_history"


class AdapterNotFound(LookupError):
    pass


class PromotionRefused(ValueError):
    pass


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    source: str  # artifact URI of the adapter folder
    tags: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    aliases: tuple[str, ...] = ()

    @property
    def base_model(self) -> str | None:
        return self.tags.get("base_serve_name") or self.tags.get("base_model")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<at>[A-Za-z0-9_-]+))?$")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name`` | ``name@<version>`` | ``name@<alias>`` -> (name, version-or-alias or None)."""
    match = _REF.match(ref)
    if not match:
        raise AdapterNotFound(f"{ref!r} is not an adapter reference (name, name@version or name@alias)")
    return match["name"], match["at"]


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path) -> str:
    """The experiment id, creating it once with artifacts under ``artifact_root`` (created here, before
    any trial starts: concurrent creation races on sqlite)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_root.mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(name, artifact_location=(artifact_root / name).resolve().as_uri())
    except Exception:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


class AdapterRegistry:
    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # -- writing ---------------------------------------------------------------------------------

    def register(self, name: str, run_id: str, source: str, tags: dict[str, str], description: str = "") -> AdapterVersion:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, tags={"base_model": tags.get("base_serve_name", "")},
                                                description=description)
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        version = self.client.create_model_version(name, source=source, run_id=run_id,
                                                   tags={k: str(v) for k, v in tags.items()})
        return self.get(name, str(version.version))

    @contextmanager
    def _exclusive(self, name: str) -> Iterator[None]:
        if self.tracking_uri.startswith("sqlite:///"):
            folder = Path(self.tracking_uri.removeprefix("sqlite:///")).parent
        else:
            folder = Path(tempfile.gettempdir())
        key = hashlib.sha256(f"{self.tracking_uri}\0{name}".encode()).hexdigest()[:16]
        with open(folder / f".ray_app-registry-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def promote(self, name: str, version: int, alias: str = CHAMPION, force: bool = False) -> AdapterVersion:
        with self._exclusive(name):
            return self._promote(name, version, alias, force)

    def _promote(self, name: str, version: int, alias: str, force: bool) -> AdapterVersion:
        target = self.get(name, str(version))
        if not force and target.tags.get("parity") != "passed":
            raise PromotionRefused(
                f"{target.ref}: the train->serve parity check is {target.tags.get('parity', 'missing')!r}, not 'passed' "
                f"({target.tags.get('parity_detail', 'no detail')}); fix the chat template or pass --force")
        if alias == CHAMPION:
            history = self._history(name)
            current = self._alias_version(name, CHAMPION)
            if current is not None and current != target.version:
                history.append(current)
                self.client.set_registered_model_tag(name, HISTORY_TAG, ",".join(map(str, history[-20:])))
        self.client.set_registered_model_alias(name, alias, str(target.version))
        return self.get(name, str(target.version))

    def rollback(self, name: str) -> AdapterVersion:
        """Move ``champion`` back to the version it pointed to before the last promotion."""
        with self._exclusive(name):
            return self._rollback(name)

    def _rollback(self, name: str) -> AdapterVersion:
        history = self._history(name)
        if not history:
            raise PromotionRefused(f"{name}: no earlier champion to roll back to")
        previous = history.pop()
        self.client.set_registered_model_tag(name, HISTORY_TAG, ",".join(map(str, history)))
        self.client.set_registered_model_alias(name, CHAMPION, str(previous))
        return self.get(name, str(previous))

    # -- reading ---------------------------------------------------------------------------------

    def _history(self, name: str) -> list[int]:
        tags = self.client.get_registered_model(name).tags
        return [int(v) for v in tags.get(HISTORY_TAG, "").split(",") if v]

    def _alias_version(self, name: str, alias: str) -> int | None:
        aliases = self.client.get_registered_model(name).aliases
        return int(aliases[alias]) if alias in aliases else None

    def _to_version(self, mv) -> AdapterVersion:
        return AdapterVersion(name=mv.name, version=int(mv.version), source=mv.source, tags=dict(mv.tags),
                              aliases=tuple(getattr(mv, "aliases", ()) or ()))

    def get(self, name: str, at: str | None = None) -> AdapterVersion:
        """A version by number or alias; ``at=None`` means the champion."""
        from mlflow.exceptions import MlflowException

        try:
            if at is None or not at.isdigit():
                mv = self.client.get_model_version_by_alias(name, at or CHAMPION)
            else:
                mv = self.client.get_model_version(name, at)
        except MlflowException as e:
            raise AdapterNotFound(f"adapter {name!r}{'@' + at if at else ''} is not in the registry"
                                  f"{'' if at else ' (or has no champion yet)'}") from e
        return self._to_version(mv)

    def resolve(self, ref: str) -> AdapterVersion:
        name, at = parse_ref(ref)
        return self.get(name, at)

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of a line, with its aliases (which the version search does not return)."""
        held: dict[int, list[str]] = {}
        for alias, version in (self.client.get_registered_model(name).aliases or {}).items():
            held.setdefault(int(version), []).append(alias)
        versions = (self._to_version(mv) for mv in self.client.search_model_versions(f"name='{name}'"))
        return sorted((replace(v, aliases=tuple(sorted(held.get(v.version, ())))) for v in versions),
                      key=lambda v: v.version)

    def champions(self) -> list[AdapterVersion]:
        """The champion of every adapter line that has one."""
        out = []
        for model in self.client.search_registered_models():
            if CHAMPION in (model.aliases or {}):
                out.append(self.get(model.name))
        return out

    def lines(self) -> list[str]:
        """Every adapter line's name, champion or not."""
        return sorted(model.name for model in self.client.search_registered_models())

    def download(self, version: AdapterVersion, destination: Path) -> Path:
        import mlflow.artifacts

        destination.mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(destination),
                                                        tracking_uri=self.tracking_uri))
