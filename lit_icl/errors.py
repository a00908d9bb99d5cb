"""How an error is told in one line (command lines and callbacks report errors this way)."""

from __future__ import annotations

__all__ = ["first_line"]


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, or its type's name when it has none."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
