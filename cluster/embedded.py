"""The daemon on an embedded local Ray cluster, owned by one Python process (demo and serve
with no cluster running, LLM(workers=N))."""
from __future__ import annotations

import logging
import tempfile

import ray

from cluster import bringup
from cluster.batch_submit import sent_by
from cluster.client import Client
from cluster.config import PagedServeConfig, with_overrides
from scheduler.wording import counted
from worker.output import JobOutput

log = logging.getLogger("pagedserve.embedded")


class EmbeddedDaemon:
    """Starts Ray with the config's simulated NPUs (unless this process already joined a
    cluster), brings the daemon up on it, and takes it all down on ``close()``. The cluster
    dies with the process, so its journal lives in a temporary directory."""

    def __init__(self, cfg: PagedServeConfig) -> None:
        self._owns_ray = not ray.is_initialized()
        min_workers = max(1, cfg.cluster.simulated_npus)
        if not self._owns_ray:
            _check_joined_cluster(min_workers)
        self._scratch = tempfile.TemporaryDirectory(prefix="pagedserve-")
        self.config = with_overrides(
            cfg, scheduler={"journal_path": f"{self._scratch.name}/journal.msgpack"})
        try:
            if self._owns_ray:
                bringup.start_embedded(self.config)
            # at least one: with none detected (simulated_npus 0), `up` fails saying so
            self.status = bringup.up(self.config, min_workers=min_workers)
            self.client = Client()
        except BaseException:  # a failed or interrupted start leaves nothing running
            try:
                self._take_down()
            except Exception as cleanup:  # the cause the caller must see is the first one
                log.warning("could not take the embedded daemon down: %s", cleanup)
            raise

    def generate(self, prompts, params_list, priorities, progress: bool = False
                 ) -> list[JobOutput]:
        """Submit and wait; an interrupt (Ctrl-C in a notebook) aborts the jobs, so they do
        not hold the workers while the next call's jobs wait."""
        paced = None
        try:
            paced = self.client.submit_paced(prompts, params_list, priorities=priorities)
            jobs = self.client.results(paced, progress=progress)
        except BaseException as exc:
            try:
                self.client.withdraw(*sent_by(exc if paced is None else paced))
            except Exception as unreachable:  # the cause the caller must see is ``exc``
                log.warning("could not abort the jobs of an interrupted generate: %s",
                            unreachable)
            raise
        for job, prompt in zip(jobs, prompts):  # the scheduler keeps only the token ids
            job.prompt = prompt if isinstance(prompt, str) else None
        return jobs

    def close(self) -> None:
        self._take_down()

    def _take_down(self) -> None:
        try:
            if ray.is_initialized():
                bringup.down()
        except bringup.SchedulerUnanswered as exc:
            log.warning("%s", exc)
        finally:
            if self._owns_ray:
                bringup.shutdown_ray()
            self._scratch.cleanup()


def _check_joined_cluster(workers: int) -> None:
    """A cluster this process joined must have no daemon yet, and NPUs for ``workers``: `up`
    would wait the whole of its timeout for workers that cannot start."""
    if bringup.find_scheduler() is not None:
        # its config would not apply, and close() would take down a daemon not ours
        raise ValueError("pagedserve is already up in the Ray cluster this process joined "
                         "(by `pagedserve up`, or an LLM(workers=N) not yet closed): submit "
                         "to it with cluster.Client, or take it down (`pagedserve down`, "
                         "or that LLM's close()) first")
    npus = ray.cluster_resources().get("NPU", 0)
    if 0 < npus < workers:  # with none, `up` fails at once, saying how to give nodes NPUs
        raise ValueError(f"the Ray cluster this process joined has {counted(npus, 'NPU')}, "
                         f"fewer than workers={workers}: ask for at most that many, or add "
                         "nodes with NPUs first")
