"""What every typed config of ray_app is built on: the ``Strict`` base, ``ConfigError`` (one error that
lists every problem), and the one converter from pydantic's ``ValidationError`` to it.

A validator that finds several cross-field problems raises ``Problems``; ``parse`` lists each of them
on its own line instead of one joined message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "Problems", "Strict", "load_yaml", "parse", "parse_overrides"]

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    # A typo in a YAML key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A configuration is invalid; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")

    def __reduce__(self):
        return type(self), (self.source, self.problems)

    @classmethod
    def from_validation_error(cls, source: str, error: ValidationError) -> ConfigError:
        problems = []
        for e in error.errors():
            loc = ".".join(str(part) for part in e["loc"]) or "(top level)"
            cause = (e.get("ctx") or {}).get("error")
            if isinstance(cause, Problems):
                problems += [p if loc == "(top level)" else f"{loc}: {p}" for p in cause.problems]
            else:
                problems.append(f"{loc}: {e['msg']}")
        return cls(source, problems)


class Problems(ValueError):
    """Several problems found by one validator, kept apart so ``ConfigError`` lists each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def parse(cls: type[M], document: dict[str, Any], source: str) -> M:
    """``cls`` validated from ``document``; every problem in one ``ConfigError``."""
    try:
        return cls.model_validate(document)
    except ValidationError as e:
        raise ConfigError.from_validation_error(source, e) from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.max_steps=4", "method=dora"]`` (the ``--set`` of the job scripts) -> dotted key -> YAML value."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--set", [f"{pair!r}: expected KEY=VALUE"])
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["no such file"])
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict):
        raise ConfigError(str(path), ["expected a mapping at the top level"])
    return document
