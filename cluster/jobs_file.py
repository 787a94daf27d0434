"""Reading jobs from the command line or a JSONL file into (prompt, SamplingParams) pairs."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

from scheduler.sampling_params import InvalidRequestError, SamplingParams, is_int64

T = TypeVar("T")
SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


@dataclass(slots=True)
class Job:
    prompt: str | list[int]
    params: SamplingParams
    priority: int = 0
    line: int | None = None  # of the file it came from


def located(exc: InvalidRequestError, jobs: list[Job], path: str | None) -> InvalidRequestError:
    """``exc`` (about job N of a batch, or the only job) as ``path:line: reason`` when the job
    came from a file."""
    index, reason = exc.job_index, exc.reason
    if index is None and len(jobs) == 1:
        index, reason = 0, str(exc)
    if index is None or path is None or jobs[index].line is None:
        return exc
    return InvalidRequestError(f"{source_name(path)}:{jobs[index].line}: {reason}")


def read_jobs_file(path: str | Path, defaults: dict) -> list[Job]:
    """One job per line: ``{"prompt": ...}`` or ``{"prompt_token_ids": [...]}``, plus optional
    sampling fields and ``priority``; errors name the file and line."""
    jobs = read_jsonl(path, lambda line, number: _parse_line(line, number, defaults),
                      "prompts file")
    if not jobs:
        raise InvalidRequestError(f"{source_name(path)} holds no jobs")
    return jobs


def read_jsonl(path: str | Path, parse: Callable[[str, int], T], what: str) -> list[T]:
    """``parse(line, line_number)`` applied to every non-blank line of the file, or of stdin
    when path is ``-``; its ValueError comes back prefixed with ``path:line``, as the same
    error class."""
    records = []
    for number, line in enumerate(read_lines(path, what), start=1):
        if line.strip():
            try:
                records.append(parse(line, number))
            except ValueError as exc:
                raise type(exc)(f"{source_name(path)}:{number}: {exc}") from None
    return records


def read_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a file, or of stdin for ``-``, as text; a line that is not UTF-8 is an
    InvalidRequestError naming it."""
    lines = []
    for number, raw in enumerate(_raw_lines(path, what), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(
                f"{source_name(path)}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x} at "
                f"column {exc.start + 1})") from None
    return lines


def _raw_lines(path: str | Path, what: str) -> list[bytes]:
    """The source's lines as bytes: split on newlines only (str.splitlines would also split a
    JSON string at a raw U+2028), without a leading byte order mark."""
    if str(path) == "-":
        stdin = getattr(sys.stdin, "buffer", None)  # absent when stdin is replaced by text
        data = stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8")
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidRequestError(f"cannot read {what} {path}: {exc.strerror}") from None
    return data.removeprefix(b"\xef\xbb\xbf").splitlines()


def source_name(path: str | Path) -> str:
    """How errors name a jobs source: its path, or "stdin" for ``-``."""
    return "stdin" if str(path) == "-" else str(path)


def _parse_line(line: str, number: int, defaults: dict) -> Job:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InvalidRequestError("JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise InvalidRequestError("each line must be a JSON object")
    has_text, has_ids = "prompt" in record, "prompt_token_ids" in record
    if has_text == has_ids:
        raise InvalidRequestError('give exactly one of "prompt" or "prompt_token_ids"')
    prompt = record.pop("prompt") if has_text else record.pop("prompt_token_ids")
    if has_text and not isinstance(prompt, str):
        raise InvalidRequestError('"prompt" must be a string')
    if has_ids and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        raise InvalidRequestError('"prompt_token_ids" must be a list of integers')
    priority = record.pop("priority", 0)
    if not is_int64(priority):
        raise InvalidRequestError('"priority" must be an integer in [-2**63, 2**63)')
    unknown = sorted(set(record) - SAMPLING_FIELDS)
    if unknown:
        raise InvalidRequestError(
            f"unknown field(s) {', '.join(unknown)}; a line holds \"prompt\" or "
            f"\"prompt_token_ids\", optionally \"priority\", and sampling fields: "
            f"{', '.join(sorted(SAMPLING_FIELDS))}")
    return Job(prompt, SamplingParams.from_dict({**defaults, **record}), priority, number)
