"""Chat templates shipped with ray_app, named by file stem with dashes (``smollm2-tools`` is
``smollm2_tools.jinja``). Serving (``llms[].tools.chat_template``) and training (``data.chat_template``)
resolve a name here, so a model is trained with exactly the template it is served with."""

from __future__ import annotations

from pathlib import Path

__all__ = ["FOLDER", "shipped", "template_path"]

FOLDER = Path(__file__).resolve().parent


def shipped() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in FOLDER.glob("*.jinja"))


def template_path(name: str) -> Path:
    """A shipped template by name, else ``name`` as a file path (which may not exist: callers check)."""
    ours = FOLDER / f"{name.replace('-', '_')}.jinja"
    return ours if ours.is_file() else Path(name).expanduser()
