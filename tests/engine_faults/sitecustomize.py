"""Fault injection for tests, not part of pagedserve: a Ray worker process that finds this
directory on PYTHONPATH runs its model runner with one fault. A step whose input holds the
POISON tokens in a row raises, as a device error in a kernel would; the rest of the engine is
untouched. tests/test_daemon_tight.py checks that the scheduler finds such a job and fails it
alone."""
import importlib.abc
import importlib.util
import sys

POISON = (7, 7, 7)


class _PatchRunnerOnImport(importlib.abc.MetaPathFinder):
    """Patches worker.runner when it is first imported, so processes that never load a model
    (the scheduler, idle Ray workers) do not import torch for it."""

    def find_spec(self, name, path, target=None):
        if name != "worker.runner":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def load_and_patch(module):
            load(module)
            _poison(module.ModelRunner)

        spec.loader.exec_module = load_and_patch
        return spec


def _poison(runner_class) -> None:
    execute = runner_class.execute

    def execute_unless_poisoned(self, inputs, *args, **kwargs):
        ids = inputs.input_ids.tolist()
        if any(tuple(ids[i:i + len(POISON)]) == POISON for i in range(len(ids))):
            raise RuntimeError("injected device fault: the step held the poison tokens")
        return execute(self, inputs, *args, **kwargs)

    runner_class.execute = execute_unless_poisoned


sys.meta_path.insert(0, _PatchRunnerOnImport())
