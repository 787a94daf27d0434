"""The sampling defaults a checkpoint's generation_config.json recommends, as SamplingParams
fields: what a job with no SamplingParams of its own runs with, as in vLLM."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from scheduler.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger("pagedserve.generation_defaults")

# generation_config.json key -> SamplingParams field (transformers' names for the same things)
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(directory: Path) -> dict:
    """The fields of ``directory/generation_config.json`` that SamplingParams takes, checked;
    {} when the file is absent, and a warning (then {}) when it cannot be read or holds a
    value SamplingParams refuses. ``do_sample`` is not read, as vLLM does not."""
    path = Path(directory) / "generation_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("not using %s for sampling defaults: %s", path, exc)
        return {}
    if not isinstance(raw, dict):
        return {}
    defaults = {field: raw[key] for key, field in FIELDS.items() if raw.get(key) is not None}
    try:
        SamplingParams(**defaults)
    except (InvalidRequestError, TypeError) as exc:
        log.warning("not using %s for sampling defaults: %s", path, exc)
        return {}
    return defaults
