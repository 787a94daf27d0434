"""Fault injection for tests, not part of pagedserve: a Ray worker process that finds this
directory on PYTHONPATH runs with two faults.

- A model step whose input holds the POISON tokens in a row raises, as a device error in a
  kernel would; the rest of the engine is untouched.
- The scheduler loses the next worker report that carries outputs once the file named by
  PAGEDSERVE_TEST_LOSE_REPORT exists (and removes the file), as Ray loses calls in flight to an
  actor that has not answered for minutes.

tests/test_daemon_tight.py checks that the scheduler fails the poisoned job alone, and that the
worker whose report was lost is replaced with no job lost."""
import importlib.abc
import importlib.util
import os
import sys

POISON = (7, 7, 7)


def _poison(module) -> None:
    execute = module.ModelRunner.execute

    def execute_unless_poisoned(self, inputs, *args, **kwargs):
        ids = inputs.input_ids.tolist()
        if any(tuple(ids[i:i + len(POISON)]) == POISON for i in range(len(ids))):
            raise RuntimeError("injected device fault: the step held the poison tokens")
        return execute(self, inputs, *args, **kwargs)

    module.ModelRunner.execute = execute_unless_poisoned


def _lose_a_report_on_request(module) -> None:
    report = module.SchedulerService.report
    flag = os.environ.get("PAGEDSERVE_TEST_LOSE_REPORT")

    def report_unless_lost(self, worker_id, number, outputs, *args, **kwargs):
        if flag and outputs and os.path.exists(flag):
            os.remove(flag)
            return None
        return report(self, worker_id, number, outputs, *args, **kwargs)

    module.SchedulerService.report = report_unless_lost


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches each module when it is first imported, so processes that never load a model
    (the scheduler, idle Ray workers) do not import torch for it."""

    PATCHES = {"worker.runner": _poison, "scheduler.service": _lose_a_report_on_request}

    def find_spec(self, name, path, target=None):
        patch = self.PATCHES.get(name)
        if patch is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def load_and_patch(module):
            load(module)
            patch(module)

        spec.loader.exec_module = load_and_patch
        return spec


sys.meta_path.insert(0, _PatchOnImport())
