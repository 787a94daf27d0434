"""The workers that died or were stopped most recently: who, where, why, and their log file."""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

# How many gone workers are remembered: enough to look into a burst of failures, few enough
# that `pagedserve logs` stays short by default.
GONE_WORKERS_KEPT = 8


@dataclass(frozen=True, slots=True)
class GoneWorker:
    worker_id: str
    node_id: str
    pid: int | None
    log_file: str | None  # None where its stderr was not a file
    why: str
    gone_at: float  # time.time()

    def gone_for_s(self) -> float:
        return round(time.time() - self.gone_at, 1)

    def summary(self) -> dict:
        return {"worker_id": self.worker_id, "node_id": self.node_id, "pid": self.pid,
                "why": self.why, "gone_for_s": self.gone_for_s()}


class GoneWorkers:
    """The last GONE_WORKERS_KEPT gone workers that had started (a worker that never loaded
    its model reports why through the scheduler's start error instead), newest last."""

    def __init__(self) -> None:
        self._gone: collections.deque[GoneWorker] = collections.deque(maxlen=GONE_WORKERS_KEPT)
        self.total = 0  # since the scheduler started, the ones no longer kept too

    def add(self, slot, why: str) -> None:
        """``slot``: the scheduler's WorkerSlot of a worker that had started (its ``info``
        is what the worker said then)."""
        self._gone.append(GoneWorker(slot.worker_id, slot.node_id, slot.info.get("pid"),
                                     slot.info.get("log_file"), why, time.time()))
        self.total += 1

    def __iter__(self):
        return iter(self._gone)

    def ids(self) -> set[str]:
        return {gone.worker_id for gone in self._gone}

    def summaries(self) -> list[dict]:
        return [gone.summary() for gone in self._gone]
