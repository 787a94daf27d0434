"""Applies the scheduler's add / abort commands to a worker's engine, in whatever order Ray
delivered them (it does not keep the order of calls to an async actor)."""
from __future__ import annotations

import collections

from scheduler.sampling_params import SamplingParams

MAX_UNMATCHED_ABORTS = 10_000


class EngineCommands:
    """An abort that finds no request is remembered, so that an add delivered after it is
    dropped instead of running to ``max_tokens`` for a job nobody reads any more. The memory is
    bounded: aborts of requests that had already finished are never matched."""

    def __init__(self, engine, max_unmatched_aborts: int = MAX_UNMATCHED_ABORTS) -> None:
        self.engine = engine
        self.max_unmatched_aborts = max_unmatched_aborts
        self._unmatched_aborts: collections.OrderedDict[str, None] = collections.OrderedDict()

    def apply(self, command: tuple) -> tuple[str, str] | None:
        """Run one command; returns (request_id, error) for an add the engine refused."""
        if command[0] == "add":
            return self._add(*command[1:])
        if command[0] == "abort":
            self._abort(command[1])
        return None

    def _add(self, request_id, prompt, params, priority, resumed, queued_at
             ) -> tuple[str, str] | None:
        if request_id in self._unmatched_aborts:  # its abort arrived first
            del self._unmatched_aborts[request_id]
            return None
        try:
            self.engine.add_request(prompt, SamplingParams.from_dict(params),
                                    request_id=request_id, priority=priority,
                                    resumed_token_ids=resumed, queued_at=queued_at)
        except ValueError as exc:
            return request_id, str(exc)
        return None

    def _abort(self, request_id: str) -> None:
        if self.engine.abort(request_id):
            return
        self._unmatched_aborts[request_id] = None
        while len(self._unmatched_aborts) > self.max_unmatched_aborts:
            self._unmatched_aborts.popitem(last=False)
