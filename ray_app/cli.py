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
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
