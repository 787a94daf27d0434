"""The sampler: one step's logits to next tokens (penalties, temperature, truncation, seeded draws) and logprobs."""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from scheduler.sampling_params import SamplingParams
from worker.output import TokenLogprobs

_MASK_64 = (1 << 64) - 1


@dataclass(slots=True)
class SamplingRow:
    """Everything the sampler needs about one sequence that samples a token this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]  # repetition penalty (HF semantics: prompt + output)
    output_token_ids: Sequence[int]  # presence/frequency penalties (OpenAI: output only) and repetition
    seed: int | None  # already specific to this sample (the engine derives it for n > 1)
    position: int  # index of the token being generated = len(prompt) + len(output)
    banned: Sequence[int] = ()  # ids it may not pick now (its stop tokens, before min_tokens)


@dataclass(slots=True)
class SamplerOutput:
    """One step's result, row for row."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


def row_seed(seed: int, position: int) -> int:
    """The 63-bit generator seed of a seeded row: a fixed mix of (seed, position), equal in every process."""
    return _splitmix64(_fold_int(seed) ^ (position & _MASK_64)) >> 1


def _fold_int(value: int) -> int:
    """Mixes a Python int of any size and sign into 64 bits (one mix for the common 64-bit case)."""
    if 0 <= value <= _MASK_64:
        return _splitmix64(value)
    mixed = _splitmix64(int(value < 0))  # the sign, then each 64-bit limb of the magnitude
    magnitude = abs(value)
    while magnitude:
        mixed = _splitmix64(mixed ^ (magnitude & _MASK_64))
        magnitude >>= 64
    return mixed


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK_64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return value ^ (value >> 31)


class Sampler:
    """Chooses one token per row. Rows are independent: a seeded row's token depends only on that row."""

    def __init__(self, seed: int | None = None) -> None:
        self._unseeded = torch.Generator()  # shared by rows without a seed
        if seed is None:
            self._unseeded.seed()
        else:
            self._unseeded.manual_seed(seed & _MASK_64)
        self._seeded = torch.Generator()  # re-seeded from (seed, position) for each seeded row
        self._draw = torch.empty(1)  # reused: a fresh tensor per seeded row would cost more than the draw

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        _check_logits(logits, rows)
        if not rows:
            return SamplerOutput([], [])
        raw = logits.float()
        # the bias before the penalties, as vLLM and Hugging Face order them: a repetition
        # penalty scales the biased logit
        scores = _ban(apply_penalties(_bias(raw, rows), rows), rows, raw)
        tokens = self._choose(scores, rows)
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, _logprobs(raw, token_ids, rows))

    def _choose(self, scores: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if len(greedy) == len(rows):
            return scores.argmax(dim=-1)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if not greedy:
            return self._sample(scores, rows)
        tokens = torch.empty(len(rows), dtype=torch.long, device=scores.device)
        greedy_index = _index(greedy, scores.device)
        sampled_index = _index(sampled, scores.device)
        tokens[greedy_index] = scores[greedy_index].argmax(dim=-1)
        tokens[sampled_index] = self._sample(scores[sampled_index], [rows[i] for i in sampled])
        return tokens

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        temperatures = torch.tensor([row.params.temperature for row in rows], device=logits.device)
        logits = logits / temperatures[:, None]
        probs = logits.softmax(dim=-1)
        floor = _keep_floor(logits, rows)
        if floor is not None:
            probs.masked_fill_(logits < floor, 0.0)
        return _inverse_cdf(probs, self._uniforms(rows).to(logits.device))

    def _uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        """One uniform in [0, 1) per row: from the row's own (seed, position) generator when seeded."""
        unseeded = [i for i, row in enumerate(rows) if row.seed is None]
        draws = torch.rand(len(unseeded), generator=self._unseeded).tolist()
        values = [0.0] * len(rows)
        for i, value in zip(unseeded, draws):
            values[i] = value
        for i, row in enumerate(rows):
            if row.seed is not None:
                self._seeded.manual_seed(row_seed(row.seed, row.position))
                values[i] = self._draw.uniform_(generator=self._seeded).item()
        return torch.tensor(values, dtype=torch.float32)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (HF), then frequency/presence (OpenAI) penalties; returns ``logits`` itself if none apply.

    The caller's tensor is never modified. Both penalties read and write only the (row, token)
    pairs that occurred, not every row x vocabulary entry.
    """
    repetition = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    counted = [i for i, row in enumerate(rows)
               if row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0]
    if not repetition and not counted:
        return logits
    logits = logits.clone()
    if repetition:
        _apply_repetition_penalty_(logits, rows, repetition)
    if counted:
        _apply_frequency_presence_(logits, rows, counted)
    return logits


def _bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Each row's logit bias added, on a copy (``logits`` are the raw ones, which logprobs are
    taken from); ``logits`` itself when no row has a bias."""
    biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
    if not biased:
        return logits
    logits = logits.clone()
    for i in biased:  # its ids were checked against the vocabulary at admission
        bias = rows[i].params.logit_bias
        ids = torch.tensor(list(bias), device=logits.device)
        logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype,
                                       device=logits.device)
    return logits


def _ban(scores: torch.Tensor, rows: list[SamplingRow], raw: torch.Tensor) -> torch.Tensor:
    """Each row's banned ids at -inf: in place, unless ``scores`` are still the ``raw`` logits."""
    vocab = scores.shape[1]
    banned = [(i, [t for t in row.banned if t < vocab])  # a stop id past it is never drawn
              for i, row in enumerate(rows) if row.banned]
    banned = [(i, ids) for i, ids in banned if ids]
    if banned and scores is raw:
        scores = scores.clone()
    for i, ids in banned:
        scores[i, ids] = float("-inf")
    return scores


# 1e20: a logit of 1e10 scaled stays below PENALISED_LIMIT (order kept); 1e30 after the
# smallest sampling temperature (1e-5) is still far from float32's 3.4e38.
PENALTY_LIMIT = 1e20
PENALISED_LIMIT = 1e30


def _apply_repetition_penalty_(logits: torch.Tensor, rows: list[SamplingRow], chosen: list[int]) -> None:
    """In place: divides positive, multiplies negative logits of every token in prompt + output."""
    row_ids, token_ids = _occurrences(
        [itertools.chain(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in chosen],
        [len(rows[i].prompt_token_ids) + len(rows[i].output_token_ids) for i in chosen],
        chosen, logits)
    # Any finite penalty > 0 is valid, but float32 turns 1e39 into inf (0 x inf is NaN) and
    # 1e-39 into 0: kept within a range where every product and quotient stays finite.
    penalty = _per_row([min(max(rows[i].params.repetition_penalty, 1 / PENALTY_LIMIT),
                            PENALTY_LIMIT) for i in chosen], row_ids, chosen, logits)
    values = logits[row_ids, token_ids]
    # A token seen twice is written twice with the same value, so duplicates are harmless.
    penalised = torch.where(values > 0, values / penalty, values * penalty)
    logits[row_ids, token_ids] = penalised.clamp(-PENALISED_LIMIT, PENALISED_LIMIT)


def _apply_frequency_presence_(logits: torch.Tensor, rows: list[SamplingRow], chosen: list[int]) -> None:
    """In place: subtracts frequency * count + presence * (count > 0) over output tokens."""
    row_ids, token_ids = _occurrences([rows[i].output_token_ids for i in chosen],
                                      [len(rows[i].output_token_ids) for i in chosen], chosen, logits)
    counts = torch.zeros_like(logits)
    counts.index_put_((row_ids, token_ids), torch.ones_like(row_ids, dtype=logits.dtype), accumulate=True)
    frequency = _per_row([rows[i].params.frequency_penalty for i in chosen], row_ids, chosen, logits)
    presence = _per_row([rows[i].params.presence_penalty for i in chosen], row_ids, chosen, logits)
    penalty = frequency * counts[row_ids, token_ids] + presence
    logits[row_ids, token_ids] = logits[row_ids, token_ids] - penalty


def _occurrences(token_iters: list[Iterable[int]], lengths: list[int], chosen: list[int],
                 logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs into ``logits``, one per token occurrence; rows are ``chosen``."""
    # numpy's fromiter is ~10x faster than torch.tensor on a long Python list of ints.
    flat = np.fromiter(itertools.chain.from_iterable(token_iters), dtype=np.int64, count=sum(lengths))
    vocab = logits.shape[-1]
    if flat.size and not 0 <= flat.min() <= flat.max() < vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}) (the logits' vocabulary); "
                         f"got ids from {flat.min()} to {flat.max()}")
    row_ids = torch.repeat_interleave(torch.tensor(chosen), torch.tensor(lengths, dtype=torch.long))
    return row_ids.to(logits.device), torch.from_numpy(flat).to(logits.device)


def _per_row(values: list[float], row_ids: torch.Tensor, chosen: list[int],
             logits: torch.Tensor) -> torch.Tensor:
    """Expands one value per chosen row to one per occurrence of that row in ``row_ids``."""
    by_row = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    by_row[_index(chosen, logits.device)] = torch.tensor(values, dtype=logits.dtype, device=logits.device)
    return by_row[row_ids]


def _keep_floor(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor | None:
    """Per row [N, 1], the lowest (temperature-scaled) logit that top-k, top-p and min-p keep.

    -inf for rows that ask for none of them; None when no row asks. Cutting at a value means a
    token tied with the last kept one is kept too.
    """
    vocab = logits.shape[-1]
    truncated = [i for i, row in enumerate(rows) if 0 < row.params.top_k < vocab or row.params.top_p < 1.0]
    with_min_p = [i for i, row in enumerate(rows) if row.params.min_p > 0.0]
    if not truncated and not with_min_p:
        return None
    device = logits.device
    floor = torch.full((len(rows), 1), float("-inf"), device=device)
    if truncated:
        index = _index(truncated, device)
        floor[index] = _top_k_top_p_floor(_take_rows(logits, truncated), [rows[i].params for i in truncated])
    if with_min_p:
        index = _index(with_min_p, device)
        min_p = torch.tensor([rows[i].params.min_p for i in with_min_p], device=device)
        # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p)
        min_p_floor = _take_rows(logits, with_min_p).amax(dim=-1, keepdim=True) + min_p.log()[:, None]
        floor[index] = torch.maximum(floor[index], min_p_floor)
    return floor


def _top_k_top_p_floor(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[N, 1] lowest logit kept by top-k, then top-p over the top-k renormalised distribution."""
    vocab = logits.shape[-1]
    top_k = torch.tensor([_top_k_or_vocab(p.top_k, vocab) for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    ordered = _sorted_descending(logits)
    if any(p.top_p < 1.0 for p in params):
        top_k = _kept_by_top_p(ordered, top_k, top_p)
    return ordered.gather(1, (top_k - 1)[:, None])


def _kept_by_top_p(ordered: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[N] how many of the descending ``ordered`` logits survive top-k and then top-p."""
    cdf = (ordered - ordered[:, :1]).exp_().cumsum(dim=-1)  # unnormalised, most likely first
    top_k_mass = cdf.gather(1, (top_k - 1)[:, None])
    # Token j survives top-p while the mass before it, cdf[j - 1], is below top_p of the top-k
    # mass; the most likely token always survives.
    by_top_p = torch.searchsorted(cdf, top_p[:, None] * top_k_mass).squeeze(1) + 1
    # top_p == 1 keeps the whole top-k even where rounding would make the mass reach it early.
    return torch.where(top_p < 1.0, torch.minimum(by_top_p, top_k), top_k)


def _sorted_descending(values: torch.Tensor) -> torch.Tensor:
    if values.device.type == "cpu":
        # numpy's vectorised value sort is ~20x faster than torch.sort on CPU (no indices needed);
        # sorting the negation ascending gives the descending order without a reversed copy.
        negated = values.neg().numpy()
        negated.sort(axis=-1)
        return torch.from_numpy(negated).neg_()
    return values.sort(dim=-1, descending=True).values


def _top_k_or_vocab(top_k: int, vocab: int) -> int:
    return top_k if 0 < top_k < vocab else vocab


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose CDF interval holds ``uniform * total``; zero-probability tokens never win."""
    cdf = probs.cumsum(dim=-1)
    # For u <= 1 - 2**-24, float32 rounding keeps u * total strictly below total, so the search
    # cannot step past the last token with probability > 0.
    target = uniforms.clamp(max=1.0 - 2**-24)[:, None] * cdf[:, -1:]
    # NaN probabilities (a model whose float16 activations overflowed) find no interval: a
    # token id past the vocabulary would fail the next step, so clamp it to one that exists.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)


def _logprobs(raw: torch.Tensor, token_ids: list[int],
              rows: list[SamplingRow]) -> list[TokenLogprobs | None]:
    result: list[TokenLogprobs | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    found = token_logprobs(_take_rows(raw, wanted), [token_ids[i] for i in wanted],
                           [rows[i].params.logprobs for i in wanted])
    for i, lp in zip(wanted, found):
        result[i] = lp
    return result


def token_logprobs(logits: torch.Tensor, token_ids: list[int],
                   top_counts: list[int]) -> list[TokenLogprobs]:
    """Per row of raw ``logits``: the logprob of ``token_ids[row]`` and the row's
    ``top_counts[row]`` most likely tokens (for generated tokens, and for prompt tokens)."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    chosen_logprobs = logprobs.gather(1, chosen[:, None])
    # as vLLM ranks it: the tokens at least as likely, the chosen one among them
    ranks = (logprobs >= chosen_logprobs).sum(dim=-1).tolist()
    chosen_logprobs = chosen_logprobs.squeeze(1).tolist()
    width = min(max(top_counts, default=0), logits.shape[-1])
    top_values, top_ids = logprobs.topk(width, dim=-1) if width else (logprobs[:, :0], logprobs[:, :0])
    top_values, top_ids = top_values.tolist(), top_ids.long().tolist()
    return [TokenLogprobs(token, chosen_logprobs[j],
                          list(zip(top_ids[j][:count], top_values[j][:count])), ranks[j])
            for j, (token, count) in enumerate(zip(token_ids, top_counts))]


def _take_rows(tensor: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """``tensor[positions]``, without the copy when that is every row in order."""
    if len(positions) == tensor.shape[0]:  # positions are ascending and distinct: all rows
        return tensor
    return tensor[_index(positions, tensor.device)]


def _index(positions: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.long, device=device)


def _check_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [num_rows, vocab] with one row per SamplingRow; "
                         f"got shape {tuple(logits.shape)} for {len(rows)} rows")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor; got {logits.dtype}")
