"""SamplingParams: how one job's tokens are chosen and when it stops, validated at construction."""
from __future__ import annotations

import math
import numbers
import reprlib
from dataclasses import asdict, dataclass, field, fields, replace


class InvalidRequestError(ValueError):
    """A request the user must fix; the message names the field and the allowed values."""

    job_index: int | None = None  # in a batch of jobs: which one it is about
    reason: str | None = None  # the message without the "job N: " that names it


def in_batch(exc: InvalidRequestError, index: int, note: str = "") -> InvalidRequestError:
    """``exc``, about job ``index`` of a batch: the message says which, and the index and the
    bare reason stay readable for callers that name the job another way (a file's line)."""
    err = InvalidRequestError(f"job {index}: {exc}{note}")
    err.job_index, err.reason = index, str(exc)
    return err


# Samples per job: each is routed and run as a request of its own, so one job of n = 200,000
# held the scheduler for minutes (every other client waited). OpenAI's API allows 128.
MAX_N = 256
# Temperatures this small sample as greedy, as vLLM's do: dividing logits by them would
# overflow float32 (1e-45 turns every logit into inf, the probabilities into NaN).
GREEDY_BELOW_TEMPERATURE = 1e-5
# Every new token of a sample is searched for each stop string, and text that may begin one is
# held back from the stream: one job with 10,000 stop strings of 1,000 characters cost the 15
# jobs beside it 15% of their speed (tiny model). OpenAI's API allows 4.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1000
# Each step looks a sample's last token up in its stop token ids, bans them all while it is
# short of min_tokens, and adds its whole logit_bias to its logits: one job of n = 64 with
# 150,000 stop token ids (1 MiB of JSON) made every step of its worker 135x slower (tiny
# model), and 95,000 biases 1.6 s a step (a 152K vocabulary). 1,024 of either cost ~30%.
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024


@dataclass(slots=True)
class SamplingParams:
    """Sampling controls. ``temperature == 0`` (or below GREEDY_BELOW_TEMPERATURE) means greedy;
    ``top_k`` 0 or -1 disables top-k."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0  # no EOS, stop token or stop string ends a sample before this many
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # per prompt token; its prompt takes no prefix-cache hits
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's)
    skip_special_tokens: bool = True  # leave special tokens (EOS, ...) out of the text
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last this many tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in NUMBER_FIELDS:
            setattr(self, name, _plain_number(getattr(self, name)))
        self.stop = _as_list(self.stop, "stop", "a list of strings")
        self.stop_token_ids = [_plain_number(t) for t in _as_list(
            self.stop_token_ids, "stop_token_ids", "a list of token ids >= 0")]
        self.logit_bias = _token_keyed(self.logit_bias)
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def _validate(self) -> None:
        _check(is_int64(self.n) and 1 <= self.n <= MAX_N, "n", self.n,
               f"an integer in [1, {MAX_N}]")
        _check(is_int64(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "an integer >= 1")
        _check(is_int64(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", self.min_tokens, f"an integer in [0, max_tokens={self.max_tokens}]")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a finite number >= 0 (0 = greedy)")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(is_int64(self.top_k) and self.top_k >= -1, "top_k", self.top_k,
               "an integer >= 1, or 0 / -1 for all tokens")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, value, "in [-2, 2]")
        _check(self.seed is None or is_int64(self.seed), "seed", self.seed,
               "an integer in [-2**63, 2**63) or null")
        _check(len(self.stop) <= MAX_STOP_STRINGS
               and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
               "stop", self.stop, f"a list of at most {MAX_STOP_STRINGS} non-empty strings of up "
               f"to {MAX_STOP_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
               and all(is_int64(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, f"a list of at most {MAX_STOP_TOKEN_IDS} token ids >= 0")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name),
                   "true or false")
        _check(self.logit_bias is None or (
            isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS and all(
                is_int64(t) and t >= 0 and _is_num(b) and -100 <= b <= 100
                for t, b in self.logit_bias.items())),
            "logit_bias", self.logit_bias, f"a map of at most {MAX_LOGIT_BIAS} token ids to "
            "biases in [-100, 100]")
        _check(self.truncate_prompt_tokens is None or (
            is_int64(self.truncate_prompt_tokens) and self.truncate_prompt_tokens >= 1),
            "truncate_prompt_tokens", self.truncate_prompt_tokens, "an integer >= 1 or null")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (is_int64(value) and 0 <= value <= 20), name, value,
                   "an integer in [0, 20] or null")

    def checked_copy(self) -> "SamplingParams":
        """A validated copy: a field changed after construction is checked again, and later
        changes to this object do not reach the job that took the copy."""
        return replace(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        """Build from user input (JSON, msgpack); an unknown field is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
            )
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a list where a number belongs
            raise InvalidRequestError(str(exc)) from None


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample ``index`` of an n > 1 job: each sample draws from its own stream, and
    sample 0 uses the job's seed as is (so n = 1 and sample 0 of n agree)."""
    if seed is None or index == 0:
        return seed
    return (seed * 0x9E3779B1 + index) % (1 << 63)


def params_for_sample(params: SamplingParams, index: int) -> SamplingParams:
    """Sample ``index`` of a job as its own n = 1 request, with the tokens an in-engine fork
    would make: its own seed, and only sample 0 scores the prompt. Another sample doing so (a
    fork that recomputes its prompt, or a sample sent to a worker alone) would repeat that work
    on a [prompt, vocab] logits matrix, could not use the prefix cache, and send the scores
    again."""
    return replace(params, n=1, seed=sample_seed(params.seed, index),
                   prompt_logprobs=params.prompt_logprobs if index == 0 else None)


INT64 = (-(1 << 63), 1 << 63)  # the journal and the wire (msgpack) carry 64-bit integers


NUMBER_FIELDS = ("n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
                 "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "logprobs",
                 "prompt_logprobs", "truncate_prompt_tokens")


def _plain_number(value: object) -> object:
    """A numpy (or other numbers-registered) scalar as the Python int or float it holds, as
    vLLM takes it (a sweep over np.arange was refused); anything else as it is. The journal
    and the wire carry plain numbers."""
    if type(value) in (int, float) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value  # a bool is left for validation to refuse
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _as_list(value: object, name: str, allowed: str) -> list:
    """A list or tuple (or numpy array) as a new list; null as an empty one (as OpenAI's API
    reads it)."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    _check(isinstance(value, (list, tuple)), name, value, allowed)
    return list(value)


def _token_keyed(bias: object) -> object:
    """JSON maps have string keys ("42"): those that spell a token id become ints; anything
    else is left as it is for validation to refuse."""
    if not isinstance(bias, dict):
        return bias
    return {int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else _plain_number(k):
            _plain_number(v) for k, v in bias.items()}


def is_int64(value: object) -> bool:
    """An int (not a bool) that a 64-bit msgpack integer holds."""
    return isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value < INT64[1]


def _is_num(value: object) -> bool:
    """A finite int or float: an infinite temperature or penalty would turn logits into NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 40


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:  # a short repr: the value may be 10,000 stop strings
        raise InvalidRequestError(f"invalid {name}={_SHORT.repr(value)}: must be {allowed}")
