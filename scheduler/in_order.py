"""Puts numbered messages back in the order they were sent (Ray does not keep the order of calls
to an async actor)."""
from __future__ import annotations

import time
from typing import Generic, TypeVar

T = TypeVar("T")


class InOrder(Generic[T]):
    """Numbered 0, 1, 2, ...: ``push`` returns the items now deliverable, in number order, and
    holds any that arrived before a lower number."""

    def __init__(self) -> None:
        self.next_number = 0
        self._early: dict[int, T] = {}
        # since when (time.monotonic()) later messages have waited for next_number; None when
        # none waits. A message lost on the way holds every later one: this tells how long.
        self.missing_since: float | None = None

    def push(self, number: int, item: T) -> list[T]:
        if number < self.next_number or number in self._early:
            raise ValueError(f"message {number} was already received")
        self._early[number] = item
        ready = []
        while self.next_number in self._early:
            ready.append(self._early.pop(self.next_number))
            self.next_number += 1
        if not self._early:
            self.missing_since = None
        elif ready or self.missing_since is None:  # a new number is missing from now on
            self.missing_since = time.monotonic()
        return ready

    @property
    def held(self) -> int:
        """Messages waiting for a lower number."""
        return len(self._early)
