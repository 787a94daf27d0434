"""LLM: the Python API — generate a batch of prompts on one in-process engine, or through the
daemon with workers=N."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from cluster.llm_inputs import Prompt, from_vllm_spellings, priority_list, prompt_list
from cluster.llm_inputs import engine_options as engine_kwargs
from scheduler.batching import check_priority
from scheduler.sampling_params import InvalidRequestError, SamplingParams, in_batch
from scheduler.wording import counted
from worker.engine import Engine, EngineConfig
from worker.generation_defaults import generation_defaults
from worker.loader import resolve_model_path
from worker.output import JobOutput, RequestOutput
from worker.tokenizer import Tokenizer, template_message

BATCH_REFUSED = " (no job of the batch was queued)"  # said of a bad job of a batch


class LLM:
    """``LLM(model="tiny").generate(prompts, params)`` returns outputs in input order.

    ``workers=N`` runs the jobs through the daemon instead of one in-process engine: on an
    embedded local Ray cluster with N simulated NPU workers, or, when this process has already
    joined a cluster (``ray.init``), on that one, with a worker per NPU there, N of them ready
    before this returns (a ValueError at once if it has fewer); call ``close()`` when done.
    The engine options are EngineConfig's; vLLM's spellings of them are taken too.
    """

    def __init__(self, model: str = "tiny", *, workers: int | None = None,
                 **engine_options) -> None:
        self._daemon = None
        self._model = model
        engine_options = engine_kwargs(model, engine_options)
        if workers is not None:
            if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
                raise ValueError(f"workers must be an integer >= 1 (or None for one in-process "
                                 f"engine), got {workers!r}")
            from cluster.config import load_config, with_overrides
            from cluster.embedded import EmbeddedDaemon

            cfg = with_overrides(load_config("cpu-sim"), engine=dict(engine_options, model=model),
                                 cluster={"simulated_npus": workers})
            self._daemon = EmbeddedDaemon(cfg)
            return
        self.engine = Engine(EngineConfig(model=model, **engine_options))

    def close(self) -> None:
        """Stop the embedded daemon, or free the in-process engine's model and KV cache."""
        if self._daemon is not None:
            self._daemon.close()
            self._daemon = None
        self.__dict__.pop("engine", None)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _closed(self) -> bool:
        """Neither a daemon nor an engine: close() took it."""
        return self._daemon is None and "engine" not in self.__dict__

    @functools.cached_property
    def tokenizer(self):
        if "engine" in self.__dict__:
            return self.engine.tokenizer
        return Tokenizer.from_dir(resolve_model_path(self._model))

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    @functools.cached_property
    def default_params(self) -> SamplingParams:
        """What a call without SamplingParams runs with: the checkpoint's
        generation_config.json sampling fields over SamplingParams' defaults, as in vLLM."""
        return SamplingParams(**generation_defaults(resolve_model_path(self._model)))

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's name: a copy of ``default_params``, for a script to change and pass in."""
        return self.default_params.checked_copy()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priorities: Sequence[int] | None = None,
        on_output: Callable[[int, RequestOutput], None] | None = None,
        progress: bool = False,
        **vllm_spellings,
    ) -> list[JobOutput]:
        """Run every prompt to completion. Bad input raises before any work is queued.
        A prompt is text, token ids, or vLLM's ``{"prompt": ...}`` / ``{"prompt_token_ids":
        ...}``; without ``params``, ``default_params``. ``on_output(index, delta)`` sees each
        incremental output (for streaming, progress; in-process only: with ``workers=`` use
        ``Client.stream``); ``progress`` shows a bar of finished jobs
        on stderr. vLLM's ``sampling_params``, ``use_tqdm`` and ``priority`` are taken for
        ``params``, ``progress`` and ``priorities``."""
        if self._closed:
            raise RuntimeError("this LLM is closed; create a new one to generate again")
        params, progress, priorities = from_vllm_spellings(
            vllm_spellings, params=params, progress=progress, priorities=priorities)
        prompts = prompt_list(prompts)
        params_list = _per_prompt(self.default_params if params is None else params, len(prompts))
        priorities = priority_list(priorities, len(prompts))
        if len(priorities) != len(prompts):  # zip would drop the prompts past the shorter
            raise ValueError(f"got {counted(len(priorities), 'priority', 'priorities')} for "
                             f"{counted(len(prompts), 'prompt')}")
        if self._daemon is not None:
            if on_output is not None:
                raise ValueError("on_output is not supported with workers=; use Client.stream")
            return self._daemon.generate(prompts, params_list, priorities, progress)
        jobs = self._submit_all(prompts, params_list, priorities)
        index = {job.request_id: i for i, job in enumerate(jobs)}
        try:
            with tqdm(total=len(jobs), desc="jobs", unit="job", disable=not progress) as bar:
                while self.engine.has_unfinished():
                    for delta in self.engine.step():
                        i = index.get(delta.request_id)
                        if i is None:  # an earlier, interrupted call's abort
                            continue
                        jobs[i].add(delta, time.time())
                        if on_output is not None:
                            on_output(i, delta)
                        if delta.finish_reason is not None and jobs[i].finished:
                            bar.update()
        except BaseException:  # Ctrl-C in a notebook too: the next call must start clean
            self._abort_all(jobs)
            raise
        return jobs

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool | None = None, continue_final_message: bool = False,
             chat_template: str | None = None, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None, **options) -> list[JobOutput]:
        """``generate`` for one conversation (a list of ``{"role", "content"}`` messages) or a
        list of them, each rendered with the model's chat template (or ``chat_template``); one
        output per conversation, holding the assistant's reply. ``add_generation_prompt``
        (default: unless ``continue_final_message``), ``continue_final_message`` and ``tools``
        are the template's, as in vLLM; ``chat_template_kwargs`` are the template's own
        variables, and override those."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        for i, conversation in enumerate(conversations):
            if not conversation or not all(isinstance(m, dict) for m in conversation):
                raise InvalidRequestError(
                    f"conversation {i} must be a non-empty list of message dicts "
                    f"({{'role': ..., 'content': ...}})")
        template_options = {"add_generation_prompt": add_generation_prompt,
                            "continue_final_message": continue_final_message,
                            "chat_template": chat_template, "tools": tools,
                            **(chat_template_kwargs or {})}
        if template_options["continue_final_message"]:
            _check_continuable(conversations)
        prompts = [self.tokenizer.encode_chat([template_message(m) for m in conversation],
                                              **template_options)
                   for conversation in conversations]
        return self.generate(prompts, params, **options)

    def _submit_all(self, prompts, params_list, priorities) -> list[JobOutput]:
        jobs: list[JobOutput] = []
        try:
            for prompt, params, priority in zip(prompts, params_list, priorities):
                now = time.time()  # as the daemon's and vLLM's timings
                check_priority(priority, self.engine.config.policy)
                rid = self.engine.add_request(prompt, params, priority=priority)
                jobs.append(JobOutput.start(rid, params.n, now, prompt,
                                            self.engine.prompt_token_ids(rid)))
        except BaseException as exc:  # an interrupt too: leave nothing queued
            self._abort_all(jobs)
            if isinstance(exc, InvalidRequestError) and len(prompts) > 1:
                raise in_batch(exc, len(jobs), BATCH_REFUSED) from None
            raise
        return jobs

    def _abort_all(self, jobs: list[JobOutput]) -> None:
        """Abort these jobs and step until the engine has emitted their aborts."""
        for job in jobs:
            self.engine.abort(job.request_id)
        while self.engine.has_unfinished():
            self.engine.step()


def _per_prompt(params, count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    if not isinstance(params, Sequence) or isinstance(params, str) or \
            not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError(f"params must be a SamplingParams or a sequence of them, got "
                        f"{type(params).__name__}")
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {counted(count, 'prompt')}")
    return params


def _check_continuable(conversations: list[Sequence[dict]]) -> None:
    """continue_final_message carries the last message on: refused, as the HTTP API does, for a
    conversation whose last message is not the assistant's."""
    for i, conversation in enumerate(conversations):
        last = conversation[-1].get("role")
        if last != "assistant":
            raise InvalidRequestError(
                f"continue_final_message needs conversation {i}'s last message to be the "
                f"assistant's to continue, not a {last} message")
