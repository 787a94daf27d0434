"""A job's prompt, text or token ids, as validated token ids: the one rule the engine and the
scheduler both apply."""
from __future__ import annotations

from typing import Protocol

from scheduler.sampling_params import InvalidRequestError


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def prompt_token_ids(prompt: object, tokenizer: Encoder, vocab_size: int) -> list[int]:
    """Token ids of a text prompt (encoded) or of a list of ids (checked against the
    vocabulary); InvalidRequestError when it is empty, of another type, or holds other ids."""
    check_not_empty(prompt)
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise InvalidRequestError("prompt encodes to no tokens")
        if bad := outside_vocab(ids, vocab_size):
            raise InvalidRequestError(
                f"prompt encodes to token ids outside the model's vocabulary [0, {vocab_size}): "
                f"{bad[:5]}; the model's tokenizer does not match its weights")
        return ids
    if not isinstance(prompt, (list, tuple)):
        raise InvalidRequestError("prompt must be a string or a list of token ids")
    ids = list(prompt)
    if bad := outside_vocab(ids, vocab_size):
        raise InvalidRequestError(f"prompt_token_ids must be integers in [0, {vocab_size}); "
                                  f"got {bad[:5]}")
    return ids


def check_not_empty(prompt: object) -> None:
    """An empty prompt's error: it needs no tokenizer, so a command line can say it before the
    model loads."""
    if isinstance(prompt, (str, list, tuple)) and not prompt:
        raise InvalidRequestError("prompt is empty" if isinstance(prompt, str)
                                  else "prompt_token_ids is empty")


def outside_vocab(ids: list, vocab_size: int) -> list:
    """The entries of ``ids`` that are not token ids of a vocabulary of ``vocab_size``."""
    return [t for t in ids
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]


def check_token_ids_in_vocab(params, vocab_size: int) -> None:
    """The token ids a job's params name must exist (a logit bias on id 10**6 would index past
    the logits), and leave something to sample before min_tokens."""
    outside = sorted(t for t in (params.logit_bias or {}) if t >= vocab_size)
    if outside:
        raise InvalidRequestError(f"invalid logit_bias={params.logit_bias}: its token ids must "
                                  f"be in [0, {vocab_size}); {outside[:5]} are not")
    stops = {t for t in params.stop_token_ids if t < vocab_size}
    if params.min_tokens and len(stops) == vocab_size:  # nothing would be left to sample
        raise InvalidRequestError(f"invalid min_tokens={params.min_tokens}: stop_token_ids name "
                                  f"every token id of the vocabulary, so no token may come first")


def job_prompt_ids(prompt: object, params, tokenizer: Encoder, vocab_size: int) -> list[int]:
    """A job's validated prompt ids, cut to its last ``params.truncate_prompt_tokens`` tokens
    when that is set, with the token ids its params name checked against the vocabulary."""
    ids = prompt_token_ids(prompt, tokenizer, vocab_size)
    check_token_ids_in_vocab(params, vocab_size)
    keep = params.truncate_prompt_tokens
    return ids[-keep:] if keep else ids
