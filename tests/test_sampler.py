"""Tests for worker/sampler.py: greedy, truncation, penalties, seeded determinism and logprobs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from scheduler.sampling_params import SamplingParams
from worker.sampler import Sampler, SamplerOutput, SamplingRow, apply_penalties, row_seed

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_row(prompt=(), output=(), seed=None, position=None, **params) -> SamplingRow:
    position = len(prompt) + len(output) if position is None else position
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), seed, position)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale


# --- reference implementations, written plainly from the definitions -------------------------

def reference_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                           top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The distribution one row should be sampled from, step by step as specified."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = sorted(range(len(probs)), key=lambda token: -probs[token].item())
    allowed = set(order[:top_k] if top_k > 0 else order)
    kept_mass, nucleus = 0.0, set()
    top_k_mass = sum(probs[token].item() for token in allowed)
    for token in order:
        if token in allowed and (not nucleus or kept_mass < top_p * top_k_mass):
            nucleus.add(token)
            kept_mass += probs[token].item()
    best = max(probs[token].item() for token in nucleus)
    final = [t for t in nucleus if probs[t].item() >= min_p * best]
    result = torch.zeros_like(probs)
    result[final] = probs[final]
    return result / result.sum()


def reference_penalties(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    out = logits.clone()
    params = row.params
    for token in set(row.prompt_token_ids) | set(row.output_token_ids):
        value = out[token].item()
        out[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token, count in Counter(row.output_token_ids).items():
        out[token] -= params.frequency_penalty * count + params.presence_penalty
    return out


def sample_frequencies(logits_row: torch.Tensor, draws: int, **params) -> torch.Tensor:
    """Empirical distribution of ``draws`` unseeded samples from one row (one batched call)."""
    rows = [make_row(**params) for _ in range(draws)]
    tokens = Sampler(seed=7)(logits_row.expand(draws, -1).contiguous(), rows).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.numel()).double() / draws


# --- greedy -----------------------------------------------------------------------------------

def test_all_greedy_batch_is_argmax():
    logits = random_logits(64, 500)
    out = Sampler()(logits, [make_row(temperature=0.0, seed=i) for i in range(64)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 64


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = random_logits(40, 300, seed=1)
    rows = [make_row(temperature=0.0) if i % 2 else make_row(temperature=1.5, top_p=0.8, seed=i)
            for i in range(40)]
    tokens = Sampler()(logits, rows).token_ids
    assert tokens[1::2] == logits[1::2].argmax(dim=-1).tolist()


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """1e-45 would turn every logit into inf and the probabilities into NaN (the token drawn
    then fell outside the vocabulary and failed the engine's next step)."""
    logits = random_logits(8, 300, seed=3)
    tokens = Sampler()(logits, [make_row(temperature=t, seed=i)
                                for i, t in enumerate([1e-45, 1e-30, 1e-6, 0.0] * 2)]).token_ids
    assert tokens == logits.argmax(dim=-1).tolist()
    assert not SamplingParams(temperature=1e-5).greedy


def test_nan_logits_still_give_a_token_inside_the_vocabulary():
    logits = random_logits(3, 50, seed=4)
    logits[1] = float("nan")
    tokens = Sampler()(logits, [make_row(seed=i) for i in range(3)]).token_ids
    assert all(0 <= t < 50 for t in tokens)


def test_top_k_one_is_argmax_for_any_seed():
    logits = random_logits(1, 200, seed=2)
    tokens = {Sampler()(logits, [make_row(top_k=1, seed=seed)]).token_ids[0] for seed in range(30)}
    assert tokens == {logits.argmax().item()}


# --- truncation: support and distribution ------------------------------------------------------

TRUNCATION_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.3, top_k=4),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=0.9, min_p=0.25),
    dict(temperature=1.2, top_k=6, top_p=0.8, min_p=0.1),
]


@pytest.mark.parametrize("params", TRUNCATION_CASES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_sampled_distribution_matches_reference(params):
    logits = random_logits(1, 12, seed=3, scale=1.0)[0]
    expected = reference_distribution(logits, **params)
    observed = sample_frequencies(logits, 6000, **params)
    assert set(observed.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert (observed - expected).abs().max().item() < 0.025


@pytest.mark.parametrize("params", [dict(top_k=5), dict(top_p=0.3), dict(min_p=0.5),
                                    dict(top_k=50, top_p=0.5, temperature=2.0)])
def test_large_vocab_samples_stay_inside_the_allowed_set(params):
    logits = random_logits(1, 4000, seed=4, scale=3.0)[0]
    allowed = set(reference_distribution(logits, **params).nonzero().flatten().tolist())
    observed = sample_frequencies(logits, 1500, **params)
    assert set(observed.nonzero().flatten().tolist()) <= allowed


def test_masked_logits_are_never_sampled():
    logits = torch.zeros(1, 50)
    logits[0, ::2] = float("-inf")
    observed = sample_frequencies(logits[0], 2000)
    assert observed[::2].sum().item() == 0
    assert (observed[1::2] > 0).all()


def test_top_p_keeps_the_best_token_even_when_it_alone_exceeds_the_mass():
    logits = torch.tensor([8.0, 0.0, 0.0, 0.0])
    observed = sample_frequencies(logits, 500, top_p=0.05)
    assert observed.tolist() == [1.0, 0.0, 0.0, 0.0]


# --- penalties ---------------------------------------------------------------------------------

def penalty_rows() -> list[SamplingRow]:
    return [
        make_row(prompt=[1, 2, 3, 3], output=[3, 4, 4, 9], repetition_penalty=1.7),
        make_row(prompt=[5, 6], output=[6, 6, 6, 7, 8], frequency_penalty=0.8, presence_penalty=-0.3),
        make_row(prompt=[0, 1], output=[1, 2, 2], repetition_penalty=0.6, frequency_penalty=-1.1,
                 presence_penalty=1.9),
        make_row(prompt=[1, 2], output=[2, 3]),  # asks for nothing: must stay untouched
        make_row(prompt=[], output=[], repetition_penalty=1.3, frequency_penalty=2.0),
        make_row(prompt=list(range(20)), output=[19, 19, 0], repetition_penalty=2.0,
                 presence_penalty=0.5),
    ]


def test_penalties_match_a_per_row_reference():
    rows = penalty_rows()
    logits = random_logits(len(rows), 20, seed=5)
    original = logits.clone()
    penalised = apply_penalties(logits, rows)
    assert torch.equal(logits, original), "the caller's logits must not be modified"
    for i, row in enumerate(rows):
        expected = reference_penalties(original[i], row)
        assert torch.allclose(penalised[i], expected, rtol=1e-6, atol=1e-6), (i, penalised[i], expected)
    assert torch.equal(penalised[3], original[3])


def test_repetition_penalty_steers_greedy_away_from_a_repeated_token():
    logits = torch.tensor([[0.0, 3.0, 2.5, -1.0]])
    plain = Sampler()(logits, [make_row(output=[1], temperature=0.0)]).token_ids
    penalised = Sampler()(logits, [make_row(output=[1], temperature=0.0, repetition_penalty=1.5)]).token_ids
    assert plain == [1] and penalised == [2]


@pytest.mark.parametrize("penalty, greedy", [(1e-39, 2), (1e39, 3)])
def test_extreme_repetition_penalties_keep_logits_finite(penalty, greedy):
    """Valid (finite, > 0) but beyond float32: 1e39 made the penalty inf and a repeated token's
    zero logit NaN (0 x inf), 1e-39 made it 0 and positive logits inf; every token came out as
    the last of the vocabulary. A tiny penalty favours the best repeated token, a huge one
    bans the repeated tokens below 0 and sends the others to 0."""
    logits = torch.tensor([[0.0, 3.0, 5.0, 0.5, -1.0]])
    row = dict(output=[0, 1, 2, 4], repetition_penalty=penalty)
    penalised = apply_penalties(logits.clone(), [make_row(**row)])
    assert torch.isfinite(penalised).all()
    assert Sampler()(logits.clone(), [make_row(**row, temperature=0.0)]).token_ids == [greedy]
    sampled = Sampler()(logits.repeat(8, 1), [make_row(**row, temperature=1.0, seed=s) for s in range(8)])
    assert set(sampled.token_ids) <= ({2} if penalty < 1 else {0, 1, 2, 3})


def test_frequency_penalty_counts_output_tokens_only():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    # Token 0 is all over the prompt but was never generated: no frequency penalty applies.
    rows = [make_row(prompt=[0] * 10, output=[1], temperature=0.0, frequency_penalty=0.5)]
    assert Sampler()(logits, rows).token_ids == [0]


def test_token_id_outside_the_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="token ids must lie in"):
        apply_penalties(torch.zeros(1, 10), [make_row(prompt=[3, 10], repetition_penalty=1.2)])


# --- seeded determinism ------------------------------------------------------------------------

def seeded_targets() -> list[SamplingRow]:
    variants = [dict(), dict(temperature=0.7), dict(top_k=20), dict(top_p=0.85), dict(min_p=0.05),
                dict(top_k=40, top_p=0.9, temperature=1.4, repetition_penalty=1.2)]
    return [make_row(prompt=[1, 2], output=[3], seed=1000 + i, position=3 + i,
                     **variants[i % len(variants)]) for i in range(24)]


def filler_rows(count: int) -> list[SamplingRow]:
    kinds = [dict(temperature=0.0), dict(), dict(top_p=0.5), dict(top_k=3, min_p=0.2),
             dict(frequency_penalty=1.0, presence_penalty=1.0)]
    return [make_row(output=[i % 7], seed=None if i % 2 else 50 + i, **kinds[i % len(kinds)])
            for i in range(count)]


def test_seeded_rows_ignore_batch_composition_and_order():
    targets = seeded_targets()
    vocab = 300
    target_logits = random_logits(len(targets), vocab, seed=6)
    alone = [Sampler(seed=1)(target_logits[i:i + 1], [row]).token_ids[0] for i, row in enumerate(targets)]

    fillers = filler_rows(17)
    filler_logits = random_logits(len(fillers), vocab, seed=7)
    rows = targets + fillers
    logits = torch.cat([target_logits, filler_logits])
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(8)).tolist()
    out = Sampler(seed=2)(logits[order], [rows[i] for i in order]).token_ids
    in_batch = {original: token for original, token in zip(order, out)}
    assert [in_batch[i] for i in range(len(targets))] == alone


def test_seeded_rows_repeat_after_unseeded_draws_advance_the_sampler():
    sampler = Sampler(seed=3)
    logits = random_logits(2, 100, seed=9)
    rows = [make_row(seed=42, position=17), make_row()]
    first = sampler(logits, rows).token_ids[0]
    for _ in range(5):
        sampler(logits, rows)
    assert sampler(logits, rows).token_ids[0] == first


def test_different_seeds_and_positions_give_different_tokens():
    logits = torch.zeros(1, 1000)  # uniform: any reuse of the same draw shows as a repeat
    by_seed = {Sampler()(logits, [make_row(seed=seed, position=5)]).token_ids[0] for seed in range(40)}
    by_position = {Sampler()(logits, [make_row(seed=5, position=p)]).token_ids[0] for p in range(40)}
    assert len(by_seed) >= 35 and len(by_position) >= 35


def test_unseeded_rows_differ_between_draws():
    logits = torch.zeros(200, 1000)
    tokens = Sampler(seed=4)(logits, [make_row() for _ in range(200)]).token_ids
    assert len(set(tokens)) > 150


def test_row_seed_is_a_63_bit_mix_of_both_inputs():
    seeds = {row_seed(seed, position) for seed in (-3, 0, 1, 2**64 - 3, 2**70) for position in range(50)}
    assert len(seeds) == 250
    assert all(0 <= value < 2**63 for value in seeds)


SUBPROCESS_SCRIPT = """
import json, torch
from worker.sampler import Sampler, SamplingRow
from scheduler.sampling_params import SamplingParams
logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(11))
rows = [SamplingRow(SamplingParams(top_p=0.9), [1], [2], seed, 9 + seed) for seed in range(8)]
print(json.dumps(Sampler()(logits, rows).token_ids))
"""


def test_seeded_tokens_are_the_same_in_another_process():
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(11))
    rows = [SamplingRow(SamplingParams(top_p=0.9), [1], [2], seed, 9 + seed) for seed in range(8)]
    here = Sampler()(logits, rows).token_ids
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", SUBPROCESS_SCRIPT], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(result.stdout) == here


# --- logprobs ----------------------------------------------------------------------------------

def test_logprobs_come_from_the_raw_logits():
    vocab = 64
    rows = [
        make_row(logprobs=3, temperature=0.5, repetition_penalty=1.5, output=[0, 1, 2]),
        make_row(logprobs=None),
        make_row(logprobs=0, temperature=0.0, frequency_penalty=2.0, output=[5, 5]),
        make_row(logprobs=20, top_k=5, seed=3),
        make_row(logprobs=1, min_p=0.3, seed=4),
    ]
    logits = random_logits(len(rows), vocab, seed=10)
    out = Sampler()(logits, rows)
    expected = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[1] is None
    for i, row in enumerate(rows):
        if row.params.logprobs is None:
            continue
        entry = out.logprobs[i]
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(expected[i, entry.token_id].item(), abs=1e-5)
        assert len(entry.top) == row.params.logprobs
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True)
        best = expected[i].sort(descending=True).values[:row.params.logprobs].tolist()
        assert values == pytest.approx(best, abs=1e-5)
        for token, value in entry.top:
            assert value == pytest.approx(expected[i, token].item(), abs=1e-5)


def test_each_position_reads_as_vllm_s_mapping_of_token_id_to_logprob():
    """Ported vLLM code does ``logprobs[i][token_id].logprob`` and reads ranks."""
    logits = random_logits(3, 64, seed=11)
    rows = [make_row(logprobs=2, seed=s, temperature=1.5) for s in range(3)]
    out = Sampler()(logits, rows)
    expected = torch.log_softmax(logits.double(), dim=-1)
    for i, entry in enumerate(out.logprobs):
        chosen = out.token_ids[i]
        top_ids = [token for token, _ in entry.top]
        assert list(entry) == [chosen] + [t for t in top_ids if t != chosen]  # chosen first
        assert entry[chosen].rank == int((expected[i] >= expected[i, chosen]).sum())
        assert [entry[t].rank for t in top_ids if t != chosen] == \
            [r for r, t in enumerate(top_ids, 1) if t != chosen]
        assert {t: lp.logprob for t, lp in entry.items()} == pytest.approx(
            {t: expected[i, t].item() for t in entry}, abs=1e-5)
    assert sum(out.logprobs[0][t].rank > 2 for t in out.logprobs[0]) <= 1  # only the chosen


def test_logprobs_wider_than_the_vocabulary_list_every_token():
    logits = random_logits(1, 6, seed=12)
    entry = Sampler()(logits, [make_row(logprobs=20, temperature=0.0)]).logprobs[0]
    assert sorted(token for token, _ in entry.top) == list(range(6))


# --- input checks ------------------------------------------------------------------------------

def test_empty_batch_gives_empty_output():
    assert Sampler()(torch.zeros(0, 10), []) == SamplerOutput([], [])


@pytest.mark.parametrize("shape", [(3, 10), (2,), (2, 10, 1)])
def test_logits_must_have_one_row_per_sampling_row(shape):
    with pytest.raises(ValueError, match="one row per SamplingRow"):
        Sampler()(torch.zeros(shape), [make_row(), make_row()])


def test_integer_logits_are_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        Sampler()(torch.zeros(1, 4, dtype=torch.long), [make_row()])


def test_inverse_cdf_never_steps_past_the_last_possible_token():
    from worker.sampler import _inverse_cdf

    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0]])
    # A uniform of (almost) 1 must still land on the last token with probability > 0.
    tokens = _inverse_cdf(probs, torch.tensor([1.0, 1.0 - 2**-24]))
    assert tokens.tolist() == [1, 2]


def test_cpu_value_sort_matches_torch_sort():
    from worker.sampler import _sorted_descending

    values = random_logits(7, 333, seed=13)
    values[2, 5] = float("-inf")
    values[3, :10] = 1.0  # ties
    assert torch.equal(_sorted_descending(values), values.sort(dim=-1, descending=True).values)


def test_logit_bias_is_added_before_the_repetition_penalty_scales_the_logit():
    """vLLM and Hugging Face bias first: (2 + 2) / 2 = 2 < 2.5, not 2 / 2 + 2 = 3."""
    logits = torch.tensor([[2.0, 2.5, 0.0, -1.0]])
    row = make_row(prompt=[0], temperature=0.0, repetition_penalty=2.0, logit_bias={0: 2.0})
    assert Sampler(seed=0)(logits, [row]).token_ids == [1]


def test_logit_bias_and_banned_ids_steer_the_choice_but_not_the_logprobs():
    logits = random_logits(3, 50, seed=7)
    best = logits.argmax(dim=-1).tolist()
    second = logits.topk(2, dim=-1).indices[:, 1].tolist()
    favoured = (best[1] + 1) % 50
    rows = [make_row(temperature=0.0, logit_bias={best[0]: -100}, logprobs=1),
            make_row(temperature=0.0, logit_bias={favoured: 100}),
            make_row(temperature=0.0)]
    rows[2].banned = (best[2], 10 ** 6)  # a stop id past the vocabulary: nothing to mask
    out = Sampler(seed=0)(logits, rows)
    assert out.token_ids == [second[0], favoured, second[2]]
    raw = logits[0].log_softmax(-1)  # the choice is steered, the reported logprob is not
    assert out.logprobs[0].logprob == pytest.approx(raw[second[0]].item(), abs=1e-5)
    assert out.logprobs[0].top[0][0] == best[0]
    # sampled rows: a banned id or a -100 bias never comes out
    hot = make_row(temperature=1.0, logit_bias={best[0]: -100})
    hot.banned = (second[0],)
    drawn = Sampler(seed=1)(logits[:1].expand(200, -1), [hot] * 200).token_ids
    assert best[0] not in drawn and second[0] not in drawn
