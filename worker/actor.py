"""The worker actor: one engine on one (real or simulated) NPU, stepping continuously on its own
thread while the actor keeps answering add / abort / stats."""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading

import ray

from worker.commands import EngineCommands
from worker.device import device_index_from_ray_ids
from worker.log_tail import own_log_tail, stderr_file
from worker.report_sender import ReportSender

log = logging.getLogger("pagedserve.worker")

IDLE_POLL_S = 0.5  # how long an idle worker waits for commands before it looks at its load


@ray.remote(max_restarts=0, max_task_retries=0, enable_task_events=False)  # see SchedulerActor
class WorkerActor:
    """Asks Ray for ``{"NPU": 1}`` (set by the scheduler at creation)."""

    def __init__(self, worker_id: str, engine_options: dict, torch_threads: int,
                 scheduler) -> None:
        import torch

        from worker.engine import Engine, EngineConfig

        logging.basicConfig(level=logging.INFO)  # its KV sizing; `pagedserve logs` shows it
        torch.set_num_threads(torch_threads)
        npu_ids = ray.get_runtime_context().get_accelerator_ids().get("NPU", [])
        index = device_index_from_ray_ids(npu_ids) if engine_options.get("device") == "npu" else 0
        self.worker_id = worker_id
        self.start_error: ValueError | None = None
        try:
            self.engine = Engine(EngineConfig(**engine_options, device_index=index))
        except ValueError as exc:  # a config or model error: info() raises it, see there
            self.start_error = exc
            return
        self.npu_ids = list(npu_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._commands = EngineCommands(self.engine)
        self._reports = ReportSender(scheduler, worker_id)

    def info(self) -> dict:
        """What the scheduler needs to route to this worker. Raises the engine's config or
        model error if it could not start: a constructor that raised would reach the scheduler
        as a bare "actor died", which it must take for a passing fault and retry."""
        if self.start_error is not None:
            raise self.start_error
        kv = self.engine.kv
        return {
            "worker_id": self.worker_id, "pid": os.getpid(), "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": f"{self.engine.config.device}:{self.engine.config.device_index}",
            "npu_ids": self.npu_ids, "num_blocks": kv.num_blocks, "block_size": kv.block_size,
            "max_tokens_fit": (kv.num_blocks - kv.watermark_blocks) * kv.block_size,
            "max_model_len": self.engine.max_model_len, "log_file": stderr_file(),
        }

    async def run(self) -> None:
        """The step loop; returns when stopped and raises if the engine fails. The scheduler
        holds this call's reference: when it ends, the worker is gone."""
        await asyncio.get_running_loop().run_in_executor(None, self._loop)

    async def add(self, request_id: str, prompt_token_ids: list[int], params: dict,
                  priority: int, resumed_token_ids: list[int], queued_at: float) -> None:
        self._inbox.put(("add", request_id, prompt_token_ids, params, priority, resumed_token_ids,
                         queued_at))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake",))

    async def stats(self) -> dict:
        return self.load()

    async def log_tail(self, count: int) -> dict:
        return own_log_tail(count)

    def load(self) -> dict:
        s = self.engine.stats()
        return {
            "worker_id": self.worker_id, "running": s.num_running, "waiting": s.num_waiting,
            "kv_used": s.kv_blocks_used, "kv_total": s.kv_blocks_total,
            "free_blocks": s.kv_blocks_total - s.kv_blocks_used, "tokens_per_s": s.tokens_per_s,
            "generated_tokens": s.generated_tokens, "preemptions": s.num_preemptions,
            "prefix_hit_rate": s.prefix_hit_rate, "prefix_hit_tokens": s.prefix_hit_tokens,
            "prefix_query_tokens": s.prefix_query_tokens, "pid": os.getpid(),
        }

    # -- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        report_waits = False
        try:
            while not self._stopping.is_set():
                # an idle worker waits for commands, looking often whether a report must go
                idle_wait_s = self._reports.poll_s(IDLE_POLL_S) if report_waits else IDLE_POLL_S
                rejected = self._drain_inbox(0 if self.engine.has_unfinished() else idle_wait_s)
                outputs = self.engine.step() if self.engine.has_unfinished() else []
                self._reports.add(outputs, rejected, self.load())
                report_waits = self._reports.send()
        except Exception:  # the scheduler keeps one line; the traceback stays in this log
            log.exception("worker %s: its engine failed", self.worker_id)
            raise
        finally:  # stopped, or the engine failed: the tokens it made so far are not lost
            self._send_last_report()

    def _send_last_report(self) -> None:
        try:
            self._reports.send(even_in_flight=True)
        except Exception:  # logged, not raised: the engine's own error must reach the scheduler
            log.exception("worker %s: its last report could not be sent", self.worker_id)

    def _drain_inbox(self, wait_s: float) -> list[tuple[str, str]]:
        """Apply queued commands, waiting up to ``wait_s`` for the first; returns (request_id,
        error) for adds the engine refused."""
        rejected = []
        try:
            command = self._inbox.get(timeout=wait_s) if wait_s else self._inbox.get_nowait()
            while True:
                error = self._commands.apply(command)
                if error is not None:
                    rejected.append(error)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return rejected
