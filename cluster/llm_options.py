"""LLM()'s engine options as a vLLM script spells them: renamed ones mapped onto the engine's,
ones with nothing to do here dropped at their harmless values, the rest refused in one line."""
from __future__ import annotations

import dataclasses

from worker.engine import EngineConfig, dtype_name

RENAMED = {"gpu_memory_utilization": "memory_utilization", "scheduling_policy": "policy"}
# vLLM options that change nothing here at these values (any value, where None)
NO_EFFECT: dict[str, tuple | None] = {
    "tensor_parallel_size": (1,),
    "pipeline_parallel_size": (1,),
    "trust_remote_code": None,  # only the built-in architectures run: no checkpoint code is
    "enforce_eager": None,  # no graphs are captured
    "disable_log_stats": None,
    "max_seq_len_to_capture": None,
    "tokenizer_mode": ("auto",),
}
REFUSED = {
    "tensor_parallel_size": "pagedserve runs one copy of the model per device; use workers=N "
                            "to serve on N devices",
    "pipeline_parallel_size": "pagedserve runs one copy of the model per device",
    "tokenizer": "the checkpoint directory's own tokenizer is used",
    "tokenizer_mode": "the checkpoint's tokenizer.json is used",
}


def engine_options(model: str, options: dict) -> dict:
    """``options`` as EngineConfig fields: vLLM's names renamed, None for a setting with a
    default taken as that default (as vLLM does), no-effect options dropped; ValueError naming
    an option that cannot be served."""
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    out = {}
    for name, value in options.items():
        if name == "tokenizer" and value in (None, model):
            continue
        if name in NO_EFFECT:
            harmless = NO_EFFECT[name]
            if harmless is None or value in harmless:
                continue
        if name in REFUSED:
            raise ValueError(f"{name}={value!r}: {REFUSED[name]}")
        name = RENAMED.get(name, name)
        if name not in fields or name == "model":
            raise ValueError(f"LLM() has no option {name!r}; its engine options are "
                             f"{', '.join(f for f in fields if f != 'model')}, and workers")
        if value is None and fields[name].default is not None:
            continue
        out[name] = dtype_name(value) if name == "dtype" else value  # a daemon's config too
    return out
