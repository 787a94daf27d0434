"""Bringing the daemon up and down on a Ray cluster, and the embedded local cluster."""
from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable

import ray

from cluster import stop_signals
from cluster.config import PagedServeConfig, daemon_config_dict, engine_config_kwargs
from cluster.journal import Journal
from scheduler.service import (ANSWERING_CALLS, NAMESPACE, RESUMED_CALLS_FACTOR, SCHEDULER_NAME,
                               SchedulerActor, ServiceOptions, head_node_strategy, last_line)


# Given an address whose GCS does not answer, ray.init retries for minutes; a port that does
# not accept a TCP connection in this time is reported at once instead.
GCS_PROBE_TIMEOUT_S = 5.0
log = logging.getLogger("pagedserve.bringup")
WAIT_REPORT_S = 10.0  # how often `up` (and `down --drain`) report on what they wait for
DRAIN_POLL_S = 0.2
SHUTDOWN_TIMEOUT_S = 60.0  # how long `down` waits for the scheduler to stop its workers


class ClusterNotFoundError(ConnectionError):
    """No Ray cluster where the user said one would be."""


class DaemonStartError(RuntimeError):
    """`up` could not bring the daemon up: its config, model or workers failed to load."""


def connect(address: str = "auto", alternative: str | None = None) -> None:
    """Join a running Ray cluster as a driver in the pagedserve namespace. ``alternative``:
    what else the user can do when there is none, for the error message."""
    if ray.is_initialized():
        _check_same_cluster(address)
        return
    unreachable = gcs_unreachable(address)
    if unreachable is None:
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                     logging_level=ray_logging_level())
            stop_signals.rearm()
            return
        except ConnectionError:  # e.g. "auto" with no cluster recorded anywhere
            pass
    reason = f" ({unreachable})" if unreachable else ""
    other = f", or {alternative}" if alternative else ""
    raise ClusterNotFoundError(
        f"no Ray cluster at {address!r}{reason}; start one with "
        f"`ray start --head --resources='{{\"NPU\": 2}}'` first{other}")


def _check_same_cluster(address: str) -> None:
    """A process holds one Ray connection: asking for another cluster's address while joined
    to one must fail, not silently talk to the first. "auto" and ray:// addresses are taken
    as meaning the cluster already joined."""
    if address == "auto" or address.startswith("ray://"):
        return
    from ray._private.services import canonicalize_bootstrap_address

    try:
        wanted = canonicalize_bootstrap_address(address)
    except Exception:
        wanted = address
    current = ray.get_runtime_context().gcs_address
    if wanted is not None and wanted != current:
        raise ClusterNotFoundError(
            f"this process is already connected to the Ray cluster at {current}, not {address!r}; "
            "a process can use one cluster at a time: connect to the other one from another "
            "process, or call ray.shutdown() first")


def gcs_unreachable(address: str) -> str | None:
    """Why the GCS behind ``address`` (host:port, or "auto": RAY_ADDRESS or the last local
    cluster) cannot be reached, or None if it accepts a connection or the address is one Ray
    itself must judge (ray:// clients, nothing recorded for "auto")."""
    if address.startswith("ray://"):
        return None
    from ray._private.services import canonicalize_bootstrap_address  # host:port, or None

    try:
        resolved = canonicalize_bootstrap_address(address)
    except Exception:  # a malformed address: ray.init's own error names it
        return None
    if resolved is None:
        return None
    host, port = resolved.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=GCS_PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        return f"nothing answers at {resolved}: {getattr(e, 'strerror', None) or e}"
    return None


def cluster_is_running() -> bool:
    """Is there a Ray cluster this host can join (RAY_ADDRESS or a local head)?"""
    try:
        connect("auto")
    except ClusterNotFoundError:
        return False
    return True


def start_embedded(cfg: PagedServeConfig) -> None:
    """A local Ray instance with the preset's simulated NPUs (CPU simulation mode); with
    none (``simulated_npus: 0``), with the NPUs and CPUs Ray detects on this host."""
    if ray.is_initialized():
        return
    # A stray token file must not make our own instance demand auth. Its ports still listen
    # on every interface (see the README's "Securing Ray"): RAY_AUTH_MODE set by the user wins.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Given logical NPUs, Ray probes CANN for the NPU model and logs a traceback when it is
    # absent, which is the normal case in CPU simulation mode.
    logging.getLogger("ray._private.accelerators.npu").setLevel(logging.CRITICAL)
    npus = cfg.cluster.simulated_npus
    # "local": a new cluster of our own even where `ray start` runs one (LLM(workers=N) wants
    # its own; without it ray.init joins that cluster and refuses the num_cpus given here).
    # With no simulated NPUs, no resources at all: an explicit {"NPU": 0} turns Ray's
    # detection of real NPUs off.
    simulated = {"num_cpus": max(1, int(npus * cfg.cluster.worker_num_cpus)),
                 "resources": {"NPU": npus}} if npus else {}
    ray.init(address="local", namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False, logging_level=ray_logging_level(), **simulated)
    stop_signals.rearm()


def ray_logging_level() -> int:
    """Ray's "connecting to ... / started a local instance" lines only where our own INFO logs
    show (`pagedserve -v`): otherwise they are noise around a command's output."""
    return logging.INFO if logging.getLogger().isEnabledFor(logging.INFO) else logging.WARNING


def shutdown_ray() -> None:
    ray.shutdown()


def service_options(cfg: PagedServeConfig) -> tuple[ServiceOptions, functools.partial]:
    engine = engine_config_kwargs(cfg)
    # numba's thread pool sized like torch's: an idle pool per worker process still costs
    # scheduling on a host whose cores are shared by several simulated NPUs.
    env = {"NUMBA_NUM_THREADS": str(cfg.cluster.torch_threads)}
    if engine["device"] == "cpu":
        env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    options = ServiceOptions(
        engine_options=engine, torch_threads=cfg.cluster.torch_threads,
        worker_num_cpus=cfg.cluster.worker_num_cpus,
        resource_poll_interval_s=cfg.cluster.resource_poll_interval_s,
        max_queued_jobs=cfg.scheduler.max_queued_jobs,
        max_waiting_calls=cfg.scheduler.max_waiting_calls,
        max_finished_jobs=cfg.scheduler.max_finished_jobs,
        max_finished_gib=cfg.scheduler.max_finished_gib, router=cfg.scheduler.router,
        worker_stall_timeout_s=cfg.scheduler.worker_stall_timeout_s,
        tied_job_claim_s=cfg.scheduler.tied_job_claim_s,
        worker_env=env, config=daemon_config_dict(cfg))
    journal = functools.partial(Journal, cfg.scheduler.journal_path,
                                cfg.scheduler.journal_fsync_interval_s)
    return options, journal


def find_scheduler():
    """The running scheduler actor, or None."""
    try:
        return ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def up(cfg: PagedServeConfig, *, min_workers: int = 1, timeout: float = 300.0,
       on_wait: Callable[[dict], None] | None = None) -> dict:
    """Create the scheduler if it is not running (a second `up` is harmless), wait until
    ``min_workers`` workers have loaded the model, and return the daemon's status. A daemon
    this call started whose workers cannot load is taken down again, so that the next `up`
    starts afresh from the corrected config; one still waiting for NPUs is left up.
    ``on_wait(status)`` is called every WAIT_REPORT_S while the workers load. A daemon already
    up keeps its config: the status lists what differs from ``cfg`` as "config_not_applied"."""
    scheduler = find_scheduler()
    created = scheduler is None
    if created:
        scheduler, created = _create_scheduler(cfg)
    try:
        status = _wait_ready(scheduler, min_workers, timeout, on_wait)
        if not created:
            status["config_not_applied"] = config_differences(status.get("config", {}), cfg)
            if status["draining"]:  # a `down --drain` that never went down: serve again
                ray.get(scheduler.set_draining.remote(False))
                status["draining"], status["drain_cancelled"] = False, True
        return status
    except ray.exceptions.ActorDiedError as exc:
        if not exc.actor_init_failed:  # it was up, and stopped meanwhile
            raise DaemonStartError("the daemon was taken down while `up` waited for its "
                                   "workers (by `pagedserve down`, or its scheduler was "
                                   "killed); `pagedserve up` starts it again") from None
        # its constructor raised: config or model
        raise DaemonStartError(f"the scheduler could not start: {last_line(exc.error_msg)}"
                               ) from None
    except ray.exceptions.RayTaskError as exc:  # workers failed to load, or too few in time
        if isinstance(exc.cause, TimeoutError):
            raise DaemonStartError(f"{exc.cause}; the daemon stays up and starts a worker for "
                                   "each NPU that joins (see `pagedserve status`)") from None
        if created:
            down()
            raise DaemonStartError(f"{exc.cause}; the daemon was taken down") from None
        raise DaemonStartError(f"{exc.cause}; this daemon was already up: `pagedserve down`, "
                               "then `up` again to change its config") from None


def _create_scheduler(cfg: PagedServeConfig) -> tuple:
    """The scheduler actor, and whether this call created it: an `up` running at the same
    time may have taken the name first, and then its config stands (and this one is said to
    differ, not taken for applied)."""
    options, journal = service_options(cfg)
    try:
        return SchedulerActor.options(
            name=SCHEDULER_NAME, namespace=NAMESPACE, lifetime="detached",
            scheduling_strategy=head_node_strategy(),
            max_concurrency=options.max_waiting_calls * RESUMED_CALLS_FACTOR + ANSWERING_CALLS,
        ).remote(options, journal), True
    except ValueError:  # "the name ... is already taken"
        scheduler = find_scheduler()
        if scheduler is None:
            raise
        return scheduler, False


class DrainCancelled(KeyboardInterrupt):
    """`down --drain` was interrupted while it waited: the daemon stays up and takes jobs."""


class DrainEnded(RuntimeError):
    """`down --drain` found the drain ended while it waited (`up` ends one, another `down`
    too): it stops nothing more."""


class SchedulerUnanswered(RuntimeError):
    """`down` killed a scheduler that did not answer its shutdown (the daemon is down)."""

    @classmethod
    def after(cls, seconds: float) -> SchedulerUnanswered:
        return cls(f"the scheduler did not answer for {seconds:.0f} s (stopped or stuck) and "
                   "was killed; the journal keeps its unfinished jobs, which the next "
                   "`pagedserve up` resumes")


def _wait_ready(scheduler, min_workers: int, timeout: float,
                on_wait: Callable[[dict], None] | None) -> dict:
    """The scheduler's wait_ready, waited on again if the scheduler restarts meanwhile (Ray
    brings it back; its journal keeps the jobs), for up to ``timeout`` in all."""
    deadline, left = time.monotonic() + timeout, timeout
    while True:
        try:
            ready = scheduler.wait_ready.remote(min_workers, left)
            while on_wait is not None and not ray.wait([ready], timeout=WAIT_REPORT_S)[0]:
                on_wait(ray.get(scheduler.status.remote()))
            return ray.get(ready)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise DaemonStartError(f"the scheduler restarted and was not back within "
                                       f"{timeout:g} s; see `pagedserve status`") from None
            log.warning("the scheduler restarted while `up` waited for it; waiting again")
            time.sleep(1.0)
            left = max(0.0, deadline - time.monotonic())


def _answer(method, *args):
    """``method.remote(*args)``'s answer within SHUTDOWN_TIMEOUT_S, also across a restart
    (the scheduler is unavailable meanwhile); SchedulerUnanswered past it. A stopped process
    times out, or, to a new driver that cannot connect to it, is unavailable."""
    started = time.monotonic()
    while True:
        left = SHUTDOWN_TIMEOUT_S - (time.monotonic() - started)
        try:
            return ray.get(method.remote(*args), timeout=max(left, 0.1))
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.monotonic() - started >= SHUTDOWN_TIMEOUT_S:
                raise SchedulerUnanswered.after(time.monotonic() - started) from None
            time.sleep(DRAIN_POLL_S)


def _drain(scheduler, timeout: float, on_wait: Callable[[dict], None] | None) -> None:
    _answer(scheduler.set_draining, True)
    try:
        _wait_for_jobs(scheduler, timeout, on_wait)
    except (DrainEnded, ray.exceptions.ActorDiedError, SchedulerUnanswered):
        raise
    except BaseException as exc:  # an interrupted drain is given up: the daemon takes jobs again
        try:
            ray.get(scheduler.set_draining.remote(False), timeout=10)
        except Exception as undo:
            log.warning("could not give the drain up: %s", undo)
            raise exc from None
        if isinstance(exc, KeyboardInterrupt):
            raise DrainCancelled() from None
        raise


def _wait_for_jobs(scheduler, timeout: float, on_wait: Callable[[dict], None] | None) -> None:
    started = time.monotonic()
    reported = started
    draining_pid = None  # the scheduler process that was told to drain
    while True:
        try:
            status = ray.get(scheduler.status.remote(), timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise SchedulerUnanswered.after(SHUTDOWN_TIMEOUT_S) from None
        except ray.exceptions.ActorUnavailableError:  # restarting: its handle finds it again
            if time.monotonic() - started >= timeout:
                return
            time.sleep(DRAIN_POLL_S)
            continue
        now = time.monotonic()
        if not status["draining"]:
            if draining_pid not in (None, status["scheduler_pid"]):  # Ray restarted it
                _answer(scheduler.set_draining, True)
                draining_pid = status["scheduler_pid"]
                continue
            raise DrainEnded("the drain was ended while `down --drain` waited (`pagedserve up` "
                             "ends one); the daemon stays up and takes new jobs")
        draining_pid = status["scheduler_pid"]
        if not status["jobs_unfinished"] or now - started >= timeout:
            return
        if on_wait is not None and now - reported >= WAIT_REPORT_S:
            on_wait(status)
            reported = now
        time.sleep(DRAIN_POLL_S)


def config_differences(running: dict, asked: PagedServeConfig) -> list[str]:
    """``section.key: running X, asked Y`` for every setting of ``asked`` that the running
    daemon does not have (a second `up` does not restart it)."""
    wanted = daemon_config_dict(asked)
    return [f"{section}.{key}: running {running.get(section, {}).get(key)!r}, asked {value!r}"
            for section, values in wanted.items() for key, value in values.items()
            if running.get(section, {}).get(key) != value]


def down(drain_timeout: float | None = None,
         on_wait: Callable[[dict], None] | None = None) -> int | None:
    """Stop the workers and the scheduler. Returns how many unfinished jobs the journal keeps
    for the next `up` to resume (0 also when another `down` stopped the daemon meanwhile: that
    one says what the journal keeps), or None if nothing was running. With ``drain_timeout``,
    first refuse new jobs and wait up to that long for the unfinished ones to finish, calling
    ``on_wait(status)`` every WAIT_REPORT_S meanwhile; an interrupted wait raises
    DrainCancelled, a drain ended elsewhere (`up`) DrainEnded, and neither stops anything.
    A scheduler that does not answer is killed all the same, then SchedulerUnanswered says so."""
    scheduler = find_scheduler()
    if scheduler is None:
        return None
    if drain_timeout is not None:
        try:
            _drain(scheduler, drain_timeout, on_wait)
        except ray.exceptions.ActorDiedError:  # another `down` stopped it meanwhile
            return 0
        except SchedulerUnanswered:
            ray.kill(scheduler, no_restart=True)
            raise
    try:
        return _answer(scheduler.shutdown)
    except ray.exceptions.ActorDiedError:  # another `down` stopped it meanwhile
        return 0
    finally:
        ray.kill(scheduler, no_restart=True)
