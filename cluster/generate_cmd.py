"""`pagedserve generate`: run prompts on an in-process engine, stream text or print JSON."""
from __future__ import annotations

import argparse
import json
import sys

from cluster.engine_args import add_engine_flags, engine_options
from cluster.jobs_file import Job, located, read_jobs_file
from scheduler.prompts import check_not_empty
from scheduler.sampling_params import InvalidRequestError, SamplingParams, in_batch
from worker.output import CompletionOutput, JobOutput, RequestOutput


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for prompts on this machine")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", metavar="FILE.jsonl",
                     help='one JSON object per line: "prompt" or "prompt_token_ids", plus optional '
                          "sampling fields; '-' reads stdin")
    add_sampling_flags(p, unseeded="draws from the engine's shared generator")
    add_engine_flags(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per input, in input order")
    p.set_defaults(func=run)


def add_sampling_flags(p: argparse.ArgumentParser, unseeded: str) -> None:
    """The sampling flags; ``unseeded`` says how a job given no --seed draws its tokens."""
    g = p.add_argument_group("sampling (defaults for every job)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="tokens before an end-of-sequence or stop may end a job (default: 0)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    g.add_argument("--min-p", type=float, default=0.0, help="in [0, 1]; 0 = off (default)")
    g.add_argument("--seed", type=int, default=None,
                   help="this job's own random stream: its tokens then depend on nothing else, "
                        "not on the jobs batched with it nor on preemption (default: none, "
                        f"{unseeded})")
    g.add_argument("--n", type=int, default=1, help="samples per prompt (default: 1)")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens")
    g.add_argument("--logprobs", type=int, default=None,
                   help="top-k logprobs per token, 0-20, in the --json output (default: none)")
    g.add_argument("--prompt-logprobs", type=int, default=None,
                   help="the same for every prompt token after the first, 0-20, in the --json "
                        "output (default: none)")


def sampling_defaults(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, seed=args.seed, n=args.n, stop=args.stop,
                ignore_eos=args.ignore_eos, logprobs=args.logprobs,
                prompt_logprobs=args.prompt_logprobs)


def load_jobs(args: argparse.Namespace) -> list[Job]:
    defaults = sampling_defaults(args)
    if args.prompts:
        return read_jobs_file(args.prompts, defaults)
    return [Job(text, SamplingParams(**defaults)) for text in args.prompt]


def _refuse_empty_prompts(jobs: list[Job], path: str | None) -> None:
    """What the engine would say of an empty prompt, said before a checkpoint that may take
    minutes to load."""
    from cluster.llm import BATCH_REFUSED

    for i, job in enumerate(jobs):
        try:
            check_not_empty(job.prompt)
        except InvalidRequestError as exc:
            raise located(in_batch(exc, i, BATCH_REFUSED) if len(jobs) > 1 else exc,
                          jobs, path) from None


def run(args: argparse.Namespace) -> int:
    jobs = load_jobs(args)  # bad input fails here, before the model loads
    _refuse_empty_prompts(jobs, args.prompts)
    from cluster.llm import LLM

    llm = LLM(args.model, **engine_options(args))
    printer = None if args.json else TerminalPrinter([j.params.n for j in jobs])
    try:
        results = llm.generate([j.prompt for j in jobs], [j.params for j in jobs],
                               priorities=[j.priority for j in jobs],
                               on_output=printer.on_output if printer else None)
    except InvalidRequestError as exc:
        raise located(exc, jobs, args.prompts) from None
    except KeyboardInterrupt:
        if printer is not None:  # "pagedserve: interrupted" on a line of its own
            printer.end_line()
        raise
    if args.json:
        for i, job in enumerate(results):
            print(json.dumps(job_record(i, job)), flush=True)
    return 0


def job_record(index: int, job: JobOutput) -> dict:
    """The --json form of one job's result."""
    record = {"index": index, **_sample_record(job.outputs[0]),
              "num_prompt_tokens": job.num_prompt_tokens}
    if job.prompt_logprobs is not None:  # of prompt tokens 1.., as "logprobs" are
        record["prompt_logprobs"] = _logprobs_record(job.prompt_logprobs[1:])
    if len(job.outputs) > 1:
        record["samples"] = [_sample_record(o) for o in job.outputs]
    return record


def _sample_record(out: CompletionOutput) -> dict:
    record = {"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}
    if out.logprobs is not None:
        record["logprobs"] = _logprobs_record(out.logprobs)
    return record


def _logprobs_record(logprobs: list) -> list[dict]:
    return [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [[t, v] for t, v in lp.top]}
            for lp in logprobs]


class TerminalPrinter:
    """Streams every sample of every job, in input order: the head one live, later ones as
    they catch up. Headers name the job, and the sample where a job has several: [2] or [2.1]."""

    def __init__(self, samples_per_job: list[int]) -> None:
        slots = [(job, i) for job, n in enumerate(samples_per_job) for i in range(n)]
        self.slot_of = {slot: k for k, slot in enumerate(slots)}
        self.labels = [f"[{job}]" if samples_per_job[job] == 1 else f"[{job}.{i}]"
                       for job, i in slots]
        self.pending: list[list[str]] = [[] for _ in slots]
        self.done = [False] * len(slots)
        self.head = 0
        self.multi = len(slots) > 1
        self._header_shown = False
        self._mid_line = False

    def on_output(self, index: int, delta: RequestOutput) -> None:
        slot = self.slot_of[(index, delta.index)]
        self.pending[slot].append(delta.text)
        self.done[slot] = delta.finished
        while self.head < len(self.done):
            if self.multi and not self._header_shown:
                self._write(f"--- {self.labels[self.head]} ")
                self._header_shown = True
            self._write("".join(self.pending[self.head]))
            self.pending[self.head].clear()
            if not self.done[self.head]:
                break
            self._write("\n")
            self.head += 1
            self._header_shown = False
        sys.stdout.flush()

    def end_line(self) -> None:
        """Ends a line left open (the run was interrupted), so what follows starts afresh."""
        if self._mid_line:
            self._write("\n")
            sys.stdout.flush()

    def _write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            self._mid_line = not text.endswith("\n")
