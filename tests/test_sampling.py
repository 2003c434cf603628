"""Batched sampling equals transformers' logits-processor chain row by row: penalty, greedy
choice, and the top-k/top-p/temperature distribution (kept tokens and their probabilities)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hypothesis import given, settings
from hypothesis import strategies as st

from chatloop.sampling import (
    GREEDY_BELOW,
    RowSampling,
    SamplingError,
    apply_repetition_penalty,
    choose_tokens,
    filtered_distribution,
)

ROWS = [
    RowSampling(0.7, 50, 0.9, 1.15),
    RowSampling(1.0, 0, 0.5, 1.0),
    RowSampling(1.3, 5, 1.0, 1.3),
    RowSampling(0.2, 200, 0.95, 1.0),
    RowSampling(1.0, 0, 1.0, 1.0),
]


def hf_probs(logits: torch.Tensor, seen: torch.Tensor, r: RowSampling) -> torch.Tensor:
    chain = LogitsProcessorList()
    if r.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(r.repetition_penalty))
    chain.append(TemperatureLogitsWarper(r.temperature))
    if r.top_k:
        chain.append(TopKLogitsWarper(r.top_k))
    if r.top_p < 1.0:
        chain.append(TopPLogitsWarper(r.top_p))
    return torch.softmax(chain(seen.unsqueeze(0), logits.unsqueeze(0).clone()), dim=-1)[0]


@pytest.mark.parametrize("seed", range(5))
def test_distribution_equals_transformers_warpers(seed):
    torch.manual_seed(seed)
    vocab = 1000
    logits = torch.randn(len(ROWS), vocab) * 3
    seen = [torch.randint(0, vocab, (30,)) for _ in ROWS]
    want = torch.stack([hf_probs(logits[i], seen[i], r) for i, r in enumerate(ROWS)])
    penalized = logits.clone()
    from chatloop.sampling import apply_repetition_penalty

    for i, r in enumerate(ROWS):
        apply_repetition_penalty(penalized[i], seen[i], r.repetition_penalty)
    probs, index = filtered_distribution(penalized, ROWS)
    got = torch.zeros_like(want).scatter_(1, index, probs)
    assert torch.equal(got > 0, want > 0), "the same tokens are kept"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # the filters really filter: top-k 5 keeps 5 tokens, top-p 0.5 keeps fewer than the vocabulary
    assert int((got[2] > 0).sum()) == 5 and int((got[1] > 0).sum()) < vocab


def test_greedy_rows_take_the_argmax_of_penalized_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    seen = [torch.tensor([int(logits[i].argmax())]) for i in range(3)]  # the favourite was said
    rows = [RowSampling(0.0, 50, 0.9, 1.0), RowSampling(0.0, 50, 0.9, 100.0), RowSampling(0.0, 0, 1.0, 1.5)]
    want = []
    for i, r in enumerate(rows):
        chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(r.repetition_penalty)])
        want.append(int(chain(seen[i].unsqueeze(0), logits[i:i + 1].clone()).argmax()))
    gens = [torch.Generator() for _ in rows]
    assert choose_tokens(logits.clone(), rows, seen, gens) == want
    assert want[1] != int(logits[1].argmax()), "a strong penalty moves the choice"


def test_seeded_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(1)
    logits = torch.randn(4, 500)
    rows = [RowSampling(1.0, 0, 1.0, 1.0)] * 4
    seen = [torch.tensor([], dtype=torch.long)] * 4

    def draw(batch: list[int]) -> list[int]:
        gens = [torch.Generator().manual_seed(7) for _ in batch]
        return choose_tokens(logits[batch].clone(), [rows[i] for i in batch], [seen[i] for i in batch], gens)

    alone = draw([2])[0]
    assert draw([0, 1, 2, 3])[2] == alone
    # and sampling follows the distribution: many draws from one row cover many tokens
    gen = torch.Generator().manual_seed(3)
    picks = {choose_tokens(logits[:1].clone(), rows[:1], seen[:1], [gen])[0] for _ in range(200)}
    assert len(picks) > 50


accepted = st.builds(  # every setting GenerationParams accepts, edges included
    RowSampling,
    temperature=st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=2.0, allow_subnormal=True)),
    top_k=st.integers(min_value=0, max_value=1000),
    top_p=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_subnormal=True),
    repetition_penalty=st.floats(min_value=1.0, max_value=2.0),
)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(accepted, min_size=1, max_size=4), scale=st.sampled_from([1.0, 30.0, 1e4]))
def test_every_accepted_setting_gives_a_token(rows, scale):
    """Issue 19: no accepted setting may make sampling fail (a tiny temperature used to give NaN)."""
    torch.manual_seed(0)
    vocab = 300
    logits = torch.randn(len(rows), vocab) * scale
    seen = [torch.randint(0, vocab, (5,)) for _ in rows]
    tokens = choose_tokens(logits, rows, seen, [torch.Generator().manual_seed(1) for _ in rows])
    assert all(0 <= t < vocab for t in tokens)
    for i, (r, t) in enumerate(zip(rows, tokens)):
        if r.temperature < GREEDY_BELOW:
            penalized = logits[i].clone()
            apply_repetition_penalty(penalized, seen[i], r.repetition_penalty)
            assert t == int(penalized.argmax())


def test_non_finite_logits_name_their_row():
    logits = torch.zeros(3, 10)
    logits[1, 4] = float("nan")
    rows = [RowSampling(0.7, 0, 1.0, 1.0)] * 3
    with pytest.raises(SamplingError) as err:
        choose_tokens(logits, rows, [torch.tensor([], dtype=torch.long)] * 3, [torch.Generator()] * 3)
    assert err.value.row == 1
