"""``ray-app``: the command line of ray_app (models, config checks, ingest, adapters, router keys and usage)."""

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
keys_app = typer.Typer(help="Smart-router API keys: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

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
        from ray_app.serve.app import load_router_config

        for _, config in apps:
            if config.router is not None:
                load_router_config(config)
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
    Optional[str], typer.Option("--address", help="A Ray cluster; default: the one running on this machine (the "
                                                  "server's, so the collection is written where it is served), "
                                                  "else a local one.")]


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

    from ray_app.schema import ConfigError
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
    """The collections: through the cluster's store actor when a cluster runs, else opened here."""
    from ray_app.cluster import connect_if_running

    cfg = _ingest_config(config, data_dir)
    if connect_if_running(address):
        import ray

        from ray_app.documents.store_actor import get_store

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
    from ray_app.documents.sources import document_id

    store = _store(config, data_dir, address)
    doc_id = document
    if Path(document).exists():
        doc_id = document_id(Path(document).resolve().as_uri())
    elif "://" in document:
        doc_id = document_id(document)
    deleted = store.delete_document(collection, doc_id)
    if not deleted:
        console.print(f"[red]no document {document!r} in {collection!r}[/]")
        raise typer.Exit(1)
    console.print(f"[green]deleted[/] {document} ({deleted} chunks) from {collection}")


@collection_app.command("create")
def collection_create(
    collection: str,
    sensitivity: Annotated[Optional[str], typer.Option(
        "--sensitivity", help="Label of documents added without one: public, internal or confidential.")] = None,
    config: IngestConfigOption = None, address: AddressOption = None, data_dir: DataDirOption = None,
) -> None:
    """Create an empty collection (the ingest config's embedder decides its vectors)."""
    from ray_app.documents.store import StoreError
    from ray_app.documents.embedder import SentenceEmbedder
    from ray_app.models.resolve import resolve_source

    if sensitivity not in (None, "public", "internal", "confidential"):
        raise typer.BadParameter("public, internal or confidential", param_hint="--sensitivity")
    cfg = _ingest_config(config, data_dir)
    dimensions = SentenceEmbedder(resolve_source(cfg.embedder, cfg.paths)).dimensions
    try:
        _store(config, data_dir, address).create_collection(collection, dimensions, cfg.embedder, sensitivity)
    except StoreError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1)
    console.print(f"[green]created[/] {collection} ({dimensions}-d vectors of {cfg.embedder})")


@collection_app.command("drop")
def collection_drop(collection: str, yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
                    config: IngestConfigOption = None, address: AddressOption = None,
                    data_dir: DataDirOption = None) -> None:
    """Delete a whole collection."""
    if not yes:
        typer.confirm(f"Delete collection {collection!r} and all its documents?", abort=True)
    _store(config, data_dir, address).drop_collection(collection)
    console.print(f"[green]dropped[/] {collection}")


dataset_app = typer.Typer(help="Training sets from collections and captured conversations.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("build")
def dataset_build(
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSONL to write; its report goes beside it.")],
    collection: Annotated[Optional[str], typer.Option("--collection", "-c", help="The collection to learn from.")] = None,
    conversations: Annotated[Optional[Path], typer.Option(
        "--conversations", help="A folder of captured conversations (<data_dir>/captures).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Dataset config (default configs/dataset.yaml).")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="The teacher: a served model or a route.")] = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="The server's /v1 URL.")] = None,
    address: AddressOption = None, data_dir: DataDirOption = None,
    progress: Annotated[bool, typer.Option(help="Show Ray Data progress bars.")] = True,
) -> None:
    """Domains, summaries and instruction pairs from a collection (or captured chats), filtered for
    quality, as OpenAI chat fine-tuning JSONL with provenance; exit 0 with records, 2 with none."""
    import json

    from ray_app.datasets.build import build_dataset
    from ray_app.datasets.config import DatasetConfig
    from ray_app.schema import ConfigError

    if collection is None and conversations is None:
        raise typer.BadParameter("give --collection, --conversations or both", param_hint="--collection")
    default = Path("configs/dataset.yaml")
    overrides = {k: v for k, v in {"teacher.model": teacher, "teacher.endpoint": endpoint,
                                   "data_dir": str(data_dir) if data_dir else None}.items() if v is not None}
    try:
        cfg = DatasetConfig.load(config or (default if default.is_file() else None), overrides)
    except ConfigError as e:
        console.print(f"[red]invalid:[/] {e}")
        raise typer.Exit(1)
    report = build_dataset(collection, cfg, out, conversations=conversations, address=address, progress=progress)
    for name, examples in report.examples.items():
        console.print(f"[yellow]{name}[/] removed {report.removed.get(name, 0)}, e.g. {examples[0]}")
    console.print(f"[green]{report.kept}[/] of {report.generated} records kept from {report.documents} documents "
                  f"({', '.join(f'{d} {n}' for d, n in report.domains.items())}) in {report.seconds} s "
                  f"({report.pairs_per_s} pairs/s): {out}")
    print(json.dumps({k: v for k, v in report.to_dict().items() if k != "examples"}))
    raise typer.Exit(0 if report.kept else 2)


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
        from ray_app.training.finetune import GOLDEN_PROMPTS
        from ray_app.training.model import load_tokenizer

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

ServeConfigOption = Annotated[
    Path, typer.Option("--config", help="The Serve config whose `auth` says where the key and spend ledger is.")]


def _ledger_path(config: Path, data_dir: Path | None):
    """The ledger file of the (first) ray_app application in a Serve config."""
    from ray_app.schema import ConfigError
    from ray_app.serve.config import load_serve_config

    if not config.is_file():
        console.print(f"[red]error:[/] Serve config {config} not found (see --config)")
        raise typer.Exit(1)
    try:
        _, app_config = load_serve_config(config)[0]
    except ConfigError as e:
        console.print(f"[red]invalid:[/] {e}")
        raise typer.Exit(1)
    if data_dir is not None:
        app_config = app_config.model_copy(update={"data_dir": str(data_dir)})
    return app_config.auth.ledger_file(app_config.paths), app_config.auth


def _utc(ts: float | None, fmt: str = "%Y-%m-%d") -> str | None:
    from datetime import UTC, datetime

    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime(fmt)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who or what the key is for (shown in listings).")],
    budget: Annotated[Optional[float], typer.Option(
        "--budget", min=0, help="USD per budget period (default: the config's default_budget_usd).")] = None,
    rpm: Annotated[Optional[int], typer.Option("--rpm", min=1, help="Requests per minute (default: config).")] = None,
    tpm: Annotated[Optional[int], typer.Option("--tpm", min=1, help="Tokens per minute (default: config).")] = None,
    confidential: Annotated[bool, typer.Option(
        "--confidential", help="Keep every request made with this key on local targets.")] = False,
    admin: Annotated[bool, typer.Option(
        "--admin", help="May delete documents, create and drop collections, read the cluster status and "
                        "everyone's usage.")] = False,
    read: Annotated[Optional[list[str]], typer.Option(
        "--read", help="Collections it may retrieve from (repeat or comma-separate; '*' for all; default all).")] = None,
    write: Annotated[Optional[list[str]], typer.Option(
        "--write", help="Collections it may upload to (repeat or comma-separate; '*' for all; default none).")] = None,
    clearance: Annotated[str, typer.Option(
        "--clearance", help="The most sensitive label it may retrieve: public, internal or confidential.")] = "internal",
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="max_tokens cap per request.")] = None,
    max_n: Annotated[Optional[int], typer.Option("--max-n", min=1, help="Choices (n) cap per request.")] = None,
    max_request_usd: Annotated[Optional[float], typer.Option(
        "--max-request-usd", min=0, help="Refuse (or route cheaper) a request that may cost more.")] = None,
    capture: Annotated[bool, typer.Option(
        "--capture", help="Keep this key's chats as training conversations (opt-in).")] = False,
    fine_tune: Annotated[bool, typer.Option(
        "--fine-tune", help="May upload training files and start fine-tuning jobs.")] = False,
    config: ServeConfigOption = Path("serve_config.yaml"),
    data_dir: DataDirOption = None,
) -> None:
    """Create an API key; its secret is printed once and cannot be shown again."""
    from contextlib import closing

    from ray_app.accounting.keys import KeyStore, Scopes, parse_collections
    from ray_app.sensitivity import LEVELS

    if not name.strip():
        console.print("[red]error:[/] the key name must not be empty")
        raise typer.Exit(1)
    if clearance not in LEVELS:
        raise typer.BadParameter(", ".join(LEVELS), param_hint="--clearance")
    scopes = Scopes(admin=admin, read=parse_collections(read) if read else ("*",),
                    write=parse_collections(write or []), clearance=clearance, fine_tune=fine_tune)
    ledger, _ = _ledger_path(config, data_dir)
    with closing(KeyStore(ledger)) as store:
        new = store.create(name, budget_usd=budget, rpm=rpm, tpm=tpm, confidential=confidential, scopes=scopes,
                           max_tokens=max_tokens, max_n=max_n, max_request_usd=max_request_usd, capture=capture)
    # Plain echo, not rich: the secret must come out byte for byte.
    typer.echo(f"key_id: {new.record.key_id}")
    typer.echo(f"name:   {new.record.name}")
    typer.echo(f"secret: {new.secret}")
    typer.echo("Store the secret now: it will not be shown again (clients send it as `Authorization: Bearer ...`).")


def _print_table(table: Table) -> None:
    """On a terminal, fit its width (long cells fold); piped, print every row on one line for grep and awk."""
    out = Console()
    if not out.is_terminal:
        natural = out.measure(table, options=out.options.update_width(100_000)).maximum
        out = Console(width=max(out.width, natural))
    out.print(table)


def _limit(own: float | None, default: float | None, fmt: str = "{}") -> str:
    if own is not None:
        return fmt.format(own)
    return "none" if default is None else "default " + fmt.format(default)


def _scopes_text(scopes) -> str:
    parts = ["admin"] if scopes.admin else []
    parts.append("read " + ",".join(scopes.read))
    if scopes.write:
        parts.append("write " + ",".join(scopes.write))
    parts.append(f"clearance {scopes.clearance}")
    if scopes.fine_tune:
        parts.append("fine-tune")
    return "; ".join(parts)


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    config: ServeConfigOption = Path("serve_config.yaml"),
    data_dir: DataDirOption = None,
) -> None:
    """API keys with their scopes, limits and their spend this budget period (never secrets)."""
    import json
    from contextlib import closing
    from dataclasses import asdict

    from ray_app.accounting.keys import KeyStore
    from ray_app.accounting.ledger import Ledger
    from ray_app.accounting.recorder import SpendRecorder

    path, auth = _ledger_path(config, data_dir)
    with closing(KeyStore(path)) as store, Ledger(path) as ledger:
        period_start = SpendRecorder(auth, ledger).period_start()
        keys = [(k, ledger.spend(k.key_id, since=period_start)) for k in store.list()]
    if as_json:
        print(json.dumps([{
            "key_id": k.key_id, "name": k.name, "created_at": _utc(k.created_at, "%Y-%m-%dT%H:%M:%SZ"),
            "status": "revoked" if k.revoked_at is not None else "active",
            "revoked_at": _utc(k.revoked_at, "%Y-%m-%dT%H:%M:%SZ"),
            # Own settings (null: the config default) and what is enforced.
            "budget_usd": k.budget_usd, "rpm": k.rpm, "tpm": k.tpm,
            "effective_budget_usd": k.budget_usd if k.budget_usd is not None else auth.default_budget_usd,
            "effective_rpm": k.rpm if k.rpm is not None else auth.default_rpm,
            "effective_tpm": k.tpm if k.tpm is not None else auth.default_tpm,
            "confidential": k.confidential, "scopes": asdict(k.scopes), "max_tokens": k.max_tokens,
            "max_n": k.max_n, "max_request_usd": k.max_request_usd, "capture": k.capture,
            "budget_period": auth.budget_period, "period_start": _utc(period_start), "spend_usd": spent,
        } for k, spent in keys], indent=2))
        return
    table = Table(title=f"API keys (spend since {_utc(period_start)}, budget period: {auth.budget_period}, "
                        f"auth mode: {auth.mode})")
    table.add_column("key_id", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("created", no_wrap=True)
    for column in ("status", "scopes", "budget", "rpm", "tpm", "confidential"):
        table.add_column(column, overflow="fold")
    table.add_column("spend", justify="right", no_wrap=True)
    for k, spent in keys:
        status = "active" if k.revoked_at is None else f"revoked {_utc(k.revoked_at)}"
        table.add_row(k.key_id, k.name, _utc(k.created_at), status, _scopes_text(k.scopes),
                      _limit(k.budget_usd, auth.default_budget_usd, "${:.2f}"),
                      _limit(k.rpm, auth.default_rpm), _limit(k.tpm, auth.default_tpm),
                      "yes" if k.confidential else "no", f"${spent:.4f}")
    _print_table(table)
    if not keys:
        console.print("no keys yet: `ray-app keys create NAME`")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id, as `ray-app keys list` shows it.")],
    config: ServeConfigOption = Path("serve_config.yaml"),
    data_dir: DataDirOption = None,
) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    from contextlib import closing

    from ray_app.accounting.keys import KeyStore

    path, _ = _ledger_path(config, data_dir)
    with closing(KeyStore(path)) as store:
        record = store.get(key_id)
        if record is None:
            console.print(f"[red]error:[/] no key {key_id!r} in {path} (see `ray-app keys list`)")
            raise typer.Exit(1)
        if record.revoked_at is not None:
            console.print(f"key {key_id} ({record.name}) was already revoked on {_utc(record.revoked_at)}")
            return
        store.revoke(key_id)
    console.print(f"[green]revoked[/] {key_id} ({record.name})")


@app.command("usage")
def usage(
    key: Annotated[Optional[str], typer.Option("--key", help="Only this key id.")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="First UTC day included, YYYY-MM-DD.")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Last UTC day included, YYYY-MM-DD.")] = None,
    group_by: Annotated[str, typer.Option(
        "--group-by", help="Comma-separated: key, model, day, route, target, status ('' for totals only).")
    ] = "key,model,day",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: the rows and the total.")] = False,
    config: ServeConfigOption = Path("serve_config.yaml"),
    data_dir: DataDirOption = None,
) -> None:
    """Requests, tokens and cost from the spend ledger, grouped, with a total."""
    import json

    from ray_app.accounting.ledger import Ledger
    from ray_app.accounting.usage import MEASURES, UsageError, UsageQuery

    try:
        query = UsageQuery.parse(since, until, group_by, key)
    except UsageError as e:
        console.print(f"[red]error:[/] --{e.param.replace('_', '-')}: {e}")
        raise typer.Exit(1)
    path, _ = _ledger_path(config, data_dir)
    with Ledger(path) as ledger:
        result = query.run(ledger)
    rows, total, groups = result["data"], result["total"], list(query.group_by)
    if as_json:
        print(json.dumps({"group_by": groups, "key": key, "since": since, "until": until,
                          "rows": rows, "total": total}, indent=2))
        return

    def cell(measure: str, value: float) -> str:
        return f"{value:.4f}" if measure == "cost_usd" else str(value)

    if not rows:
        console.print("no usage recorded for these filters")
        return
    # Grouped rows get a total footer; ungrouped, the one row is the total.
    table = Table(show_footer=bool(groups))
    for i, g in enumerate(groups):
        table.add_column(g, footer="total" if i == 0 else "", no_wrap=g == "key", overflow="fold")
    for measure, header in zip(MEASURES, ("requests", "prompt tokens", "completion tokens", "cost (USD)")):
        table.add_column(header, footer=cell(measure, total[measure]), justify="right", overflow="fold")
    for row in rows:
        table.add_row(*("-" if row[g] is None else str(row[g]) for g in groups),
                      *(cell(m, row[m]) for m in MEASURES))
    _print_table(table)


def main() -> None:
    from ray_app.cluster import prepare_driver_env

    prepare_driver_env()  # before anything imports Ray
    app()


if __name__ == "__main__":
    main()
