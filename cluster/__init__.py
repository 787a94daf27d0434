"""Client-facing face of pagedserve: config, public API, CLI."""
from scheduler.sampling_params import InvalidRequestError, SamplingParams

__all__ = ["LLM", "Client", "SamplingParams", "InvalidRequestError"]


def __getattr__(name: str):
    # LLM pulls in torch and the models, Client pulls in Ray: import them only when asked for,
    # so `pagedserve --help` and the policy modules stay light.
    if name == "LLM":
        from cluster.llm import LLM

        return LLM
    if name == "Client":  # pulls in Ray
        from cluster.client import Client

        return Client
    raise AttributeError(name)
