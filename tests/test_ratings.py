"""Bradley-Terry ratings: exact small answers, agreement with a likelihood maximized another way,
ties as half wins, a prior that keeps unbeaten versions finite, and bootstrap intervals."""

from __future__ import annotations

import math
import random

import torch

from chatloop.ratings import bradley_terry, elo, history, rate


def test_two_versions_have_the_closed_form_answer():
    votes = [("v1", "v2", "a")] * 3 + [("v1", "v2", "b")]
    p = bradley_terry(votes, prior=0)
    assert math.isclose(p["v1"] / p["v2"], 3.0, rel_tol=1e-6)
    assert math.isclose(elo(p["v1"]) - elo(p["v2"]), 400 * math.log10(3), rel_tol=1e-6)
    # sides do not matter, ties and 'both bad' are half a win each
    flipped = [("v2", "v1", "b")] * 3 + [("v2", "v1", "a")]
    assert math.isclose(bradley_terry(flipped, prior=0)["v1"], p["v1"], rel_tol=1e-6)
    tied = [("v1", "v2", "a"), ("v1", "v2", "tie"), ("v2", "v1", "both_bad")]
    q = bradley_terry(tied, prior=0)
    assert math.isclose(q["v1"] / q["v2"], 2.0, rel_tol=1e-6)  # 2 wins vs 1


def test_mm_equals_gradient_ascent_on_the_likelihood():
    rng = random.Random(0)
    true = {"base": 1.0, "v1": 2.0, "v2": 0.5, "v3": 4.0}
    names = list(true)
    votes = []
    for _ in range(300):
        a, b = rng.sample(names, 2)
        votes.append((a, b, "a" if rng.random() < true[a] / (true[a] + true[b]) else "b"))
    mm = bradley_terry(votes, prior=0)
    theta = torch.zeros(len(names), dtype=torch.float64, requires_grad=True)
    idx = {n: i for i, n in enumerate(names)}
    winners = torch.tensor([idx[a] if c == "a" else idx[b] for a, b, c in votes])
    losers = torch.tensor([idx[b] if c == "a" else idx[a] for a, b, c in votes])
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def nll():
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(theta[winners] - theta[losers]).sum()
        loss.backward()
        return loss

    opt.step(nll)
    ref = (theta - theta.mean()).detach()
    ours = torch.tensor([math.log(mm[n]) for n in names], dtype=torch.float64)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert [r.version for r in rate(votes, prior=0, bootstrap=50)] == ["v3", "v1", "base", "v2"]


def test_prior_keeps_an_unbeaten_version_finite_and_intervals_cover_the_estimate():
    votes = [("v2", "v1", "a")] * 5
    p = bradley_terry(votes)
    assert math.isfinite(p["v2"]) and p["v2"] > p["v1"]
    ratings = rate(votes + [("v1", "v2", "tie")], bootstrap=100)
    best = ratings[0]
    assert best.version == "v2" and best.low <= best.rating <= best.high and best.votes == 6
    assert best.wins == 5.5
    assert rate([("v1", "v1", "a")]) == []  # same-version votes say nothing about versions


def test_history_grows_with_the_votes():
    timed = [(i, "v1", "v2", "a" if i % 3 else "b") for i in range(30)]
    h = history(timed, points=5)
    assert len(h) == 5 and h[-1][0] == 29
    assert h[-1][1]["v1"] > h[-1][1]["v2"]
