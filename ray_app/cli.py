"""``ray-app``: the command line of ray_app (models, config checks; later ingest, adapters, usage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="ray_app: a self-hosted AI platform on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="Prepare and list the offline models.", no_args_is_help=True)
config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
collection_app = typer.Typer(help="Inspect and edit document collections.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(collection_app, name="collection")
adapters_app = typer.Typer(help="Trained adapters in the MLflow Model Registry: list, promote, roll back.",
                           no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

console = Console(stderr=True)

DataDirOption = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="Data directory (default ./data or $RAY_APP_DATA_DIR)."),
]


@models_app.command("prepare")
def models_prepare(
    names: Annotated[Optional[list[str]], typer.Argument(help="Models to prepare (default: all).")] = None,
    data_dir: DataDirOption = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when up to date.")] = False,
) -> None:
    """Build the offline models (idempotent, checksummed): SmolLM2-135M-Instruct, all-MiniLM-L6-v2, tiny-llama."""
    from ray_app.models.catalog import DEFAULT_MODELS
    from ray_app.models.prepare import ModelPreparer, PrepareError
    from ray_app.paths import DataDir

    paths = DataDir.from_path(data_dir)
    try:
        ModelPreparer(paths, console).prepare(names or DEFAULT_MODELS, force=force)
    except PrepareError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1)


@models_app.command("list")
def models_list(data_dir: DataDirOption = None) -> None:
    """The models `prepare` can build, and whether each is prepared."""
    from ray_app.models.catalog import CATALOG
    from ray_app.models.prepare import read_manifest
    from ray_app.paths import DataDir

    paths = DataDir.from_path(data_dir)
    table = Table("name", "kind", "prepared", "licence", "description")
    for model in CATALOG.values():
        prepared = read_manifest(paths.model(model.name)) is not None
        table.add_row(model.name, model.kind, "yes" if prepared else "no", model.licence, model.description)
    Console().print(table)


@config_app.command("validate")
def config_validate(
    path: Annotated[Path, typer.Argument(help="A Serve config file.")] = Path("serve_config.yaml"),
    check_models: Annotated[bool, typer.Option(help="Also resolve model sources and check engine arguments.")] = True,
) -> None:
    """Validate a Serve config against ray_app's schema, reporting every problem at once."""
    from ray_app.serve.config import ConfigError, load_serve_config

    try:
        apps = load_serve_config(path)
        if check_models:
            from ray_app.serve.app import resolve_sources

            for _, config in apps:
                resolve_sources(config)
    except ConfigError as e:
        console.print(f"[red]invalid:[/] {e}")
        raise typer.Exit(1)
    for name, config in apps:
        console.print(f"[green]valid:[/] {path} application {name!r}: "
                      f"{len(config.llms)} LLM(s), {len(config.embedders)} embedder(s)")


IngestConfigOption = Annotated[
    Optional[Path], typer.Option("--config", help="Ingest config (default: configs/ingest.yaml if present).")]
AddressOption = Annotated[
    Optional[str], typer.Option("--address", help="A running Ray cluster (e.g. `auto` while `serve run` is up), "
                                                  "so the collection is written where it is served.")]


def _ingest_config(path: Path | None, data_dir: Path | None):
    from ray_app.documents.config import IngestConfig

    default = Path("configs/ingest.yaml")
    path = path or (default if default.is_file() else None)
    return IngestConfig.load(path, {"data_dir": str(data_dir)} if data_dir else None)


@app.command("ingest")
def ingest(
    source: Annotated[str, typer.Argument(help="A folder, a file, or an s3:// prefix.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="The collection (knowledge base).")],
    config: IngestConfigOption = None,
    sensitivity: Annotated[Optional[str], typer.Option(
        help="Label for these files: public, internal or confidential (per-folder rules win).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Where to write the per-file JSONL report.")] = None,
    address: AddressOption = None,
    data_dir: DataDirOption = None,
    progress: Annotated[bool, typer.Option(help="Show Ray Data progress bars.")] = True,
) -> None:
    """Parse, OCR, chunk, embed and index documents; exit status 0 complete, 2 partial, 1 failed."""
    import json
    import time

    from ray_app.config_error import ConfigError
    from ray_app.documents.pipeline import run_ingest

    if sensitivity not in (None, "public", "internal", "confidential"):
        raise typer.BadParameter("public, internal or confidential", param_hint="--sensitivity")
    try:
        cfg = _ingest_config(config, data_dir)
        result = run_ingest(source, collection, cfg, sensitivity=sensitivity, address=address, progress=progress)
    except (ConfigError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1)
    report = report or cfg.paths.root / "reports" / f"{collection}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    result.write_jsonl(report)
    for outcome in result.files:
        if outcome.status == "refused":
            console.print(f"[yellow]refused[/] {outcome.path}: [{outcome.code}] {outcome.reason}")
    summary = result.summary()
    colour = {"complete": "green", "partial": "yellow", "failed": "red"}[summary["status"]]
    console.print(f"[{colour}]{summary['status']}[/]: {summary['indexed']} indexed, {summary['unchanged']} unchanged, "
                  f"{summary['refused']} refused; {summary['chunks']} chunks in {summary['seconds']} s. Report: {report}")
    print(json.dumps(summary))
    raise typer.Exit(result.exit_code)


def _store(config: Path | None, data_dir: Path | None, address: str | None):
    """The collections: through the cluster's store actor with --address, else opened here."""
    cfg = _ingest_config(config, data_dir)
    if address:
        import ray

        from ray_app.documents.store_actor import get_store

        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        actor = get_store(cfg.store, cfg.paths)

        class _Sync:
            def __getattr__(self, name):
                return lambda *a, **k: ray.get(getattr(actor, name).remote(*a, **k))

        return _Sync()
    from ray_app.documents.store import open_store

    return open_store(cfg.store, cfg.paths)


@collection_app.command("list")
def collection_list(config: IngestConfigOption = None, address: AddressOption = None,
                    data_dir: DataDirOption = None) -> None:
    """Collections with their document and chunk counts."""
    store = _store(config, data_dir, address)
    table = Table("collection", "documents", "chunks", "dimensions", "embedder")
    for name in store.collection_names():
        info = store.collection(name)
        table.add_row(name, str(info.documents), str(info.points), str(info.dimensions), info.embedder)
    Console().print(table)


@collection_app.command("docs")
def collection_docs(collection: str, config: IngestConfigOption = None, address: AddressOption = None,
                    data_dir: DataDirOption = None) -> None:
    """The documents of a collection (doc_id, chunks, sensitivity, source)."""
    store = _store(config, data_dir, address)
    table = Table("doc_id", "chunks", "sensitivity", "source")
    for doc_id, payload in sorted(store.documents(collection).items(), key=lambda kv: kv[1]["source"]):
        table.add_row(doc_id, str(payload.get("chunk_count")), payload.get("sensitivity", ""), payload["source"])
    Console().print(table)


@collection_app.command("delete-doc")
def collection_delete_doc(
    collection: str,
    document: Annotated[str, typer.Argument(help="A doc_id, or the document's source path/URI.")],
    config: IngestConfigOption = None, address: AddressOption = None, data_dir: DataDirOption = None,
) -> None:
    """Remove a document (all its chunks) from a collection."""
    import uuid

    from ray_app.documents.sources import DOC_NAMESPACE

    store = _store(config, data_dir, address)
    doc_id = document
    if Path(document).exists():
        doc_id = str(uuid.uuid5(DOC_NAMESPACE, Path(document).resolve().as_uri()))
    elif "://" in document:
        doc_id = str(uuid.uuid5(DOC_NAMESPACE, document))
    deleted = store.delete_document(collection, doc_id)
    if not deleted:
        console.print(f"[red]no document {document!r} in {collection!r}[/]")
        raise typer.Exit(1)
    console.print(f"[green]deleted[/] {document} ({deleted} chunks) from {collection}")


@collection_app.command("drop")
def collection_drop(collection: str, yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
                    config: IngestConfigOption = None, address: AddressOption = None,
                    data_dir: DataDirOption = None) -> None:
    """Delete a whole collection."""
    if not yes:
        typer.confirm(f"Delete collection {collection!r} and all its documents?", abort=True)
    _store(config, data_dir, address).drop_collection(collection)
    console.print(f"[green]dropped[/] {collection}")


RegistryOption = Annotated[
    Optional[str],
    typer.Option("--registry", help="MLflow registry URI (default: sqlite under the data directory)."),
]


def _registry(registry: str | None, data_dir: Path | None):
    from ray_app.paths import DataDir
    from ray_app.training.registry import AdapterRegistry

    return AdapterRegistry(registry or DataDir.from_path(data_dir).mlflow_uri)


@adapters_app.command("list")
def adapters_list(name: Annotated[Optional[str], typer.Argument(help="An adapter line: show its versions.")] = None,
                  registry: RegistryOption = None, data_dir: DataDirOption = None) -> None:
    """Adapter lines with their champion, or one line's versions with tags and aliases."""
    reg = _registry(registry, data_dir)
    if name is None:
        table = Table("adapter", "base", "champion", "parity", "request as")
        for v in reg.champions():
            table.add_row(v.name, v.base_model or "", str(v.version), v.tags.get("parity", ""), f"{v.base_model}:{v.name}")
    else:
        table = Table("version", "aliases", "parity", "adapter task score", "base task score", "dataset")
        for v in reg.versions(name):
            table.add_row(str(v.version), ",".join(v.aliases), v.tags.get("parity", ""),
                          v.tags.get("adapter_task_score", ""), v.tags.get("base_task_score", ""),
                          v.tags.get("dataset_sha256", "")[:12])
    Console().print(table)


@adapters_app.command("promote")
def adapters_promote(
    name: str, version: int,
    alias: Annotated[str, typer.Option("--alias", help="champion (what clients get) or challenger.")] = "champion",
    endpoint: Annotated[Optional[str], typer.Option(
        "--endpoint", help="Also check parity against a running server, e.g. http://127.0.0.1:8000/v1.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the parity check did not pass.")] = False,
    registry: RegistryOption = None, data_dir: DataDirOption = None,
) -> None:
    """Point an alias (default champion) at a version: served at once, no restart."""
    from ray_app.training.registry import PromotionRefused

    reg = _registry(registry, data_dir)
    target = reg.get(name, str(version))
    if endpoint:
        import json
        import tempfile

        from ray_app.training.config import EvalConfig
        from ray_app.training.evaluate import endpoint_tokens, parity_check
        from ray_app.training.finetune import GOLDEN_PROMPTS, load_tokenizer

        folder = reg.download(target, Path(tempfile.mkdtemp(prefix="adapter-")))
        stored = folder / GOLDEN_PROMPTS
        golden = json.loads(stored.read_text()) if stored.is_file() else EvalConfig().golden_prompts
        result = parity_check(load_tokenizer(str(folder)), endpoint_tokens(endpoint, f"{target.base_model}:{target.ref}"),
                              golden)
        console.print(result.summary())
        if not result.passed and not force:
            raise typer.Exit(1)
    try:
        promoted = reg.promote(name, version, alias=alias, force=force)
    except PromotionRefused as e:
        console.print(f"[red]refused:[/] {e}")
        raise typer.Exit(1)
    console.print(f"[green]{name}@{alias}[/] -> version {promoted.version}: "
                  f"`model=\"{promoted.base_model}:{name}\"` answers with it")


@adapters_app.command("rollback")
def adapters_rollback(name: str, registry: RegistryOption = None, data_dir: DataDirOption = None) -> None:
    """Move champion back to the version it pointed to before the last promotion."""
    from ray_app.training.registry import PromotionRefused

    try:
        version = _registry(registry, data_dir).rollback(name)
    except PromotionRefused as e:
        console.print(f"[red]refused:[/] {e}")
        raise typer.Exit(1)
    console.print(f"[green]{name}@champion[/] -> version {version.version}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
