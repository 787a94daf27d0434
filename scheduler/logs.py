"""The daemon's log tails for `pagedserve logs`: the scheduler's own, then each worker's, then
those of the workers gone most recently."""
from __future__ import annotations

import asyncio

import ray
from ray.exceptions import (ActorUnavailableError, RayActorError, RayError, RayTaskError,
                            TaskUnschedulableError)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scheduler.gone_workers import GONE_WORKERS_KEPT, GoneWorker
from scheduler.sampling_params import InvalidRequestError
from worker.log_tail import own_log_tail, tail_lines

MAX_LOG_LINES = 10_000


def check_log_request(count, worker_ids, known: set[str]) -> None:
    if type(count) is not int or not 1 <= count <= MAX_LOG_LINES:
        raise InvalidRequestError(
            f"lines must be an integer in [1, {MAX_LOG_LINES}], got {count!r}")
    unknown = [w for w in worker_ids or () if w not in known]
    if unknown:
        raise InvalidRequestError(
            f"no worker {unknown[0]!r} running or among the {GONE_WORKERS_KEPT} gone most "
            "recently; `pagedserve status` lists those running")


async def log_tails(workers: list, gone: list[GoneWorker], count: int,
                    timeout: float) -> list[dict]:
    """``[{"source", "node_id", "pid", "file", "lines"}]``: the scheduler's tail, then each
    worker's (slots with ``worker_id``, ``node_id``, ``actor``), then each gone worker's (with
    ``gone``: why, and ``gone_for_s``), read at once; one not read within ``timeout`` has an
    ``error`` instead of lines."""
    scheduler = {"source": "scheduler", "node_id": ray.get_runtime_context().get_node_id(),
                 **own_log_tail(count)}
    tails = await asyncio.gather(*(_worker_tail(slot, count, timeout) for slot in workers),
                                 *(_gone_tail(worker, count, timeout) for worker in gone))
    sources = [(slot.worker_id, slot.node_id, {}) for slot in workers]
    sources += [(g.worker_id, g.node_id, {"gone": g.why, "gone_for_s": g.gone_for_s()})
                for g in gone]
    return [scheduler] + [{"source": source, "node_id": node_id, **extra, **tail}
                          for (source, node_id, extra), tail in zip(sources, tails)]


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


async def _gone_tail(worker: GoneWorker, count: int, timeout: float) -> dict:
    """A gone worker's log file, read by a task on its node (the file stays after the process)."""
    tail = {"pid": worker.pid, "file": worker.log_file, "lines": []}
    if worker.log_file is None:
        return tail
    read = _read_tail.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(worker.node_id, soft=False))
    try:
        call = asyncio.wrap_future(read.remote(worker.log_file, count).future())
        return tail | {"lines": await asyncio.wait_for(call, timeout)}
    except asyncio.TimeoutError:
        return tail | {"error": f"not read within {timeout:g} s"}
    except TaskUnschedulableError:
        return tail | {"error": "its node has left the cluster"}
    except RayTaskError as exc:  # the file was removed, say
        return tail | {"error": f"not readable: {exc.cause}"}
    except RayError as exc:
        return tail | {"error": f"not readable: {type(exc).__name__}"}


@ray.remote(num_cpus=0, max_retries=0)
def _read_tail(path: str, count: int) -> list[str]:
    return tail_lines(path, count)
