"""The client processes whose calls wait on the scheduler, each known by a token it owns (which
the scheduler watches to see it die): their open waiting calls, to end when one dies."""
from __future__ import annotations

import collections


class Callers:
    """Per caller key, its token and the asyncio tasks of its open waiting calls. A caller is
    forgotten once it has no open call."""

    def __init__(self) -> None:
        self._tokens: dict[str, object] = {}
        self._calls: collections.defaultdict[str, set] = collections.defaultdict(set)

    def watched(self) -> list[tuple[str, object]]:
        """(key, token) of every caller known now, to look at whether it still lives."""
        return list(self._tokens.items())

    def open_call(self, key: str, token: object, task: object) -> None:
        self._tokens.setdefault(key, token)
        self._calls[key].add(task)

    def close_call(self, key: str, task: object) -> None:
        calls = self._calls.get(key)
        if calls is not None:
            calls.discard(task)
            if not calls:
                self.forget(key)

    def forget(self, key: str) -> set:
        """Forget a caller (its process is gone); returns the tasks of its open calls."""
        self._tokens.pop(key, None)
        return self._calls.pop(key, set())
