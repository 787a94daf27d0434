"""How messages to the user put a count of things ("1 job", "2 jobs") and a time span."""
from __future__ import annotations


def counted(n: float, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, made plural (``plural``, else with an s) unless ``n`` is 1."""
    number = f"{n:g}" if isinstance(n, float) else str(n)
    return f"{number} {noun if n == 1 else plural or noun + 's'}"


def span(seconds: float) -> str:
    """A time span rounded to its largest unit: "40 s", "3 min", "2 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"
