"""LLM's inputs as a vLLM script gives them: engine options (renamed ones mapped onto the
engine's, ones with nothing to do here dropped at their harmless values, the rest refused in
one line), prompt forms, and vLLM's names for generate's arguments."""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

from cluster.config import EngineSection, int_at_least
from scheduler.sampling_params import InvalidRequestError
from worker.engine import EngineConfig, dtype_name

Prompt = str | list[int]

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
    "task": ("auto", "generate"),
    "quantization": (None,),
    "kv_cache_dtype": ("auto",),  # the model's dtype, as here
    "revision": (None,),
    "tokenizer_revision": (None,),
    "cpu_offload_gb": (0,),
    "swap_space": None,  # a preempted sequence is recomputed: there is nothing to swap
    "disable_custom_all_reduce": None,
    "disable_async_output_proc": None,
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
        if name in NO_EFFECT:  # a vLLM option, at a value that would change something
            raise ValueError(f"{name}={value!r}: not supported by pagedserve, which takes it "
                             f"only as {' or '.join(map(repr, NO_EFFECT[name]))} (no effect)")
        spelled, name = name, RENAMED.get(name, name)
        if name not in fields or name == "model":
            raise ValueError(f"LLM() has no option {name!r}; its engine options are "
                             f"{', '.join(f for f in fields if f != 'model')}, and workers")
        if value is None and fields[name].default is not None:
            continue
        value = dtype_name(value) if name == "dtype" else value  # a daemon's config too
        # held to the daemon config's rule, so that LLM() refuses in one line what
        # LLM(workers=N) refuses: a string block_size or a float max_model_len failed deep in
        # torch, and a gpu_memory_utilization of 1.5 was taken
        out[name] = ENGINE_RULES[name].checked(spelled, value)
    return out


ENGINE_RULES = {f.name: f.metadata["rule"] for f in dataclasses.fields(EngineSection)}
ENGINE_RULES["device_index"] = int_at_least(0)  # the daemon gives each worker its own


def from_vllm_spellings(spellings: dict, **ours) -> tuple:
    """``ours`` (params, progress, priorities) with vLLM's names for them filled in."""
    names = {"sampling_params": "params", "use_tqdm": "progress", "priority": "priorities"}
    for name, value in spellings.items():
        if name not in names:
            raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
        ours[names[name]] = value
    return ours["params"], bool(ours["progress"]), ours["priorities"]


def prompt_list(prompts) -> list[Prompt]:
    """One prompt, or a sequence of them, as a list of texts and token-id lists."""
    prompts = _as_list(prompts)
    if _is_single(prompts):
        return [_prompt(prompts)]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a string, a list of token ids, or a sequence of "
                        f"those, got {type(prompts).__name__}")
    return [_prompt(p) for p in prompts]


def priority_list(priorities, count: int) -> list:
    """One per prompt (0 each by default); numpy integers as plain ints, which the journal and
    the wire carry. Anything else is left for check_priority to refuse."""
    if priorities is None:
        return [0] * count
    return [int(p) if _is_integer(p) else p for p in _as_list(priorities)]


def _as_list(value):
    """A numpy array as a list (of lists); anything else as it is."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, str) else value


def _is_single(prompts) -> bool:
    return isinstance(prompts, (str, dict)) or (
        isinstance(prompts, Sequence) and bool(prompts) and _is_integer(prompts[0]))


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's too


def _prompt(prompt) -> Prompt:
    """Text, or token ids as plain ints; vLLM's prompt dicts unwrapped. Anything else is left
    for the engine to refuse, as it refuses a bad prompt of a job."""
    if isinstance(prompt, dict):
        if set(prompt) == {"prompt"}:
            return prompt["prompt"]
        if set(prompt) == {"prompt_token_ids"}:
            return _prompt(prompt["prompt_token_ids"])
        raise InvalidRequestError('a prompt dict must hold just "prompt" (text) or just '
                                  f'"prompt_token_ids"; got keys {sorted(prompt)}')
    prompt = _as_list(prompt)
    if isinstance(prompt, Sequence) and not isinstance(prompt, str) and prompt \
            and all(_is_integer(t) for t in prompt):
        return [int(t) for t in prompt]
    return prompt
