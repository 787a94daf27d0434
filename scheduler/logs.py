"""The daemon's log tails for `pagedserve logs`: the scheduler's own, then each worker's."""
from __future__ import annotations

import asyncio

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from scheduler.sampling_params import InvalidRequestError
from worker.log_tail import own_log_tail

MAX_LOG_LINES = 10_000


def check_log_request(count, worker_ids, known: set[str]) -> None:
    if type(count) is not int or not 1 <= count <= MAX_LOG_LINES:
        raise InvalidRequestError(
            f"lines must be an integer in [1, {MAX_LOG_LINES}], got {count!r}")
    unknown = [w for w in worker_ids or () if w not in known]
    if unknown:
        raise InvalidRequestError(f"no worker {unknown[0]!r}; `pagedserve status` lists them")


async def log_tails(workers: list, count: int, timeout: float) -> list[dict]:
    """``[{"source", "node_id", "pid", "file", "lines"}]``: the scheduler's tail, then each
    worker's (slots with ``worker_id``, ``node_id``, ``actor``), asked at once; a worker that
    does not answer within ``timeout`` has an ``error`` instead of lines."""
    scheduler = {"source": "scheduler", "node_id": ray.get_runtime_context().get_node_id(),
                 **own_log_tail(count)}
    tails = await asyncio.gather(*(_worker_tail(slot, count, timeout) for slot in workers))
    return [scheduler] + [{"source": slot.worker_id, "node_id": slot.node_id, **tail}
                          for slot, tail in zip(workers, tails)]


async def _worker_tail(slot, count: int, timeout: float) -> dict:
    if slot.info is None:  # an actor answers no call before its constructor returns
        return {"error": "still loading its model: it answers once it is ready "
                         "(`pagedserve status`)", "lines": []}
    try:
        call = asyncio.wrap_future(slot.actor.log_tail.remote(count).future())
        return await asyncio.wait_for(call, timeout)
    except asyncio.TimeoutError:
        return {"error": f"did not answer within {timeout:g} s", "lines": []}
    except (RayActorError, ActorUnavailableError, RayTaskError) as exc:
        return {"error": f"unreachable: {type(exc).__name__}", "lines": []}
