"""Client-facing face of pagedserve: config, public API, CLI."""
from scheduler.sampling_params import InvalidRequestError, SamplingParams

__all__ = ["LLM", "SamplingParams", "InvalidRequestError"]


def __getattr__(name: str):
    # LLM pulls in torch and the models: import it only when asked for, so `pagedserve --help`
    # and the policy modules stay light.
    if name == "LLM":
        from cluster.llm import LLM

        return LLM
    raise AttributeError(name)
