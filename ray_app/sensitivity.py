"""Sensitivity labels of documents and chunks, in order: public < internal < confidential.

A chunk's label decides where its text may go (a confidential chunk never leaves the machine) and
who may read it (a key's clearance is the most sensitive label it may retrieve).
"""

from __future__ import annotations

from typing import Literal, get_args

Sensitivity = Literal["public", "internal", "confidential"]
LEVELS: tuple[Sensitivity, ...] = get_args(Sensitivity)


def up_to(clearance: Sensitivity) -> list[Sensitivity]:
    """The labels a reader with ``clearance`` may see."""
    return list(LEVELS[: LEVELS.index(clearance) + 1])
