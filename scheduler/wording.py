"""How messages to the user put a count of things: "1 job", "2 jobs"."""
from __future__ import annotations


def counted(n: float, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, made plural (``plural``, else with an s) unless ``n`` is 1."""
    number = f"{n:g}" if isinstance(n, float) else str(n)
    return f"{number} {noun if n == 1 else plural or noun + 's'}"
