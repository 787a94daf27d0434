"""The daemon on an embedded local Ray cluster, owned by one Python process (the demo,
LLM(workers=N))."""
from __future__ import annotations

import logging
import tempfile

import ray

from cluster import bringup
from cluster.batch_submit import sent_by
from cluster.client import Client
from cluster.config import PagedServeConfig, with_overrides
from worker.output import JobOutput

log = logging.getLogger("pagedserve.embedded")


class EmbeddedDaemon:
    """Starts Ray with the config's simulated NPUs (unless this process already joined a
    cluster), brings the daemon up on it, and takes it all down on ``close()``. The cluster
    dies with the process, so its journal lives in a temporary directory."""

    def __init__(self, cfg: PagedServeConfig) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="pagedserve-")
        self.config = with_overrides(
            cfg, scheduler={"journal_path": f"{self._scratch.name}/journal.msgpack"})
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            bringup.start_embedded(self.config)
        self.status = bringup.up(self.config, min_workers=self.config.cluster.simulated_npus)
        self.client = Client()

    def generate(self, prompts, params_list, priorities, progress: bool = False
                 ) -> list[JobOutput]:
        """Submit and wait; an interrupt (Ctrl-C in a notebook) aborts the jobs, so they do
        not hold the workers while the next call's jobs wait."""
        paced = None
        try:
            paced = self.client.submit_paced(prompts, params_list, priorities=priorities)
            return self.client.results(paced, progress=progress)
        except BaseException as exc:
            try:
                self.client.withdraw(*sent_by(exc if paced is None else paced))
            except Exception as unreachable:  # the cause the caller must see is ``exc``
                log.warning("could not abort the jobs of an interrupted generate: %s",
                            unreachable)
            raise

    def close(self) -> None:
        bringup.down()
        if self._owns_ray:
            bringup.shutdown_ray()
        self._scratch.cleanup()
