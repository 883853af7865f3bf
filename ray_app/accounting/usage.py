"""Reading the ledger back: a usage query (UTC days, groupings) and its totals, for ``GET /v1/usage``
and ``ray-app usage`` alike."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

from ray_app.accounting.ledger import GroupBy, Ledger

__all__ = ["MEASURES", "UsageError", "UsageQuery"]

MEASURES = ("requests", "prompt_tokens", "completion_tokens", "cost_usd")
_DAY_S = 86400


class UsageError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _day_start(value: str, param: str) -> float:
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise UsageError(f"{param} {value!r}: expected a UTC day as YYYY-MM-DD", param) from None


@dataclass(frozen=True)
class UsageQuery:
    group_by: tuple[GroupBy, ...]
    key: str | None = None
    since: float | None = None  # the first second included
    until: float | None = None  # the first second excluded (the day after ``until``, which is inclusive)

    @classmethod
    def parse(cls, since: str | None, until: str | None, group_by: str, key: str | None = None) -> UsageQuery:
        groups = tuple(dict.fromkeys(g.strip() for g in group_by.split(",") if g.strip()))
        unknown = [g for g in groups if g not in get_args(GroupBy)]
        if unknown:
            raise UsageError(f"group_by: unknown {', '.join(unknown)}; choose from {', '.join(get_args(GroupBy))}",
                             "group_by")
        start = _day_start(since, "since") if since else None
        end = _day_start(until, "until") + _DAY_S if until else None  # inclusive: the whole last day
        if start is not None and end is not None and start >= end:
            raise UsageError(f"since {since} is after until {until}", "since")
        return cls(groups, key, start, end)

    def run(self, ledger: Ledger) -> dict[str, Any]:
        rows = ledger.usage(self.key, self.since, self.until, self.group_by)
        total = {m: sum(row[m] for row in rows) for m in MEASURES}
        return {"object": "list", "group_by": list(self.group_by), "data": rows, "total": total}
