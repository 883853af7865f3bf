"""``ConfigError``: one error that lists every problem found in a configuration."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration is invalid; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")

    @classmethod
    def from_validation_error(cls, source: str, error: ValidationError) -> "ConfigError":
        problems = []
        for e in error.errors():
            loc = ".".join(str(part) for part in e["loc"]) or "(top level)"
            problems.append(f"{loc}: {e['msg']}")
        return cls(source, problems)
