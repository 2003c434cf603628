"""Outlier raters (issue 19, item 4): a user whose A/B votes between versions go against everyone
else's consensus far more than chance is left out of training snapshots; honest raters are not."""

from __future__ import annotations

import math
import random

import chatloop.outliers as outliers
from chatloop import prefs
from chatloop.outliers import check_raters, outlier_users
from conftest import generation


def test_the_statistic_matches_a_hand_computed_answer(monkeypatch):
    """With the consensus fixed at v2 four times as strong as v1 (p = 0.8 for v2), a rater who
    picks v1 in all 10 votes sides with it 0 times against 8 expected: z = -8 / sqrt(10 * 0.16)."""
    monkeypatch.setattr(outliers, "bradley_terry", lambda votes: {"v1": 1.0, "v2": 4.0})
    votes = [("contrarian", "v1", "v2", "a")] * 10 + [("half", "v2", "v1", "a")] * 5 + [("half", "v1", "v2", "a")] * 5
    checks = {c.user: c for c in check_raters(votes, min_votes=10)}
    assert checks["contrarian"].with_consensus == 0 and checks["contrarian"].expected == 8.0
    assert math.isclose(checks["contrarian"].z, round(-8 / math.sqrt(1.6), 2))
    assert math.isclose(checks["half"].z, round((5 - 8) / math.sqrt(1.6), 2))  # -2.37: not past -3
    assert outlier_users(votes, z=3.0, min_votes=10) == {"contrarian"}
    assert outlier_users(votes, z=0) == set()  # off


def test_honest_raters_drawn_from_the_consensus_are_rarely_flagged():
    rng = random.Random(0)
    votes = []
    for u in range(60):
        for _ in range(20):  # v2 is better: honest raters pick it 80 % of the time, in either position
            a, b = ("v1", "v2") if rng.random() < 0.5 else ("v2", "v1")
            pick_v2 = rng.random() < 0.8
            votes.append((f"u{u}", a, b, "a" if (a == "v2") == pick_v2 else "b"))
    for _ in range(20):
        votes.append(("troll", "v1", "v2", "a"))
    flagged = outlier_users(votes, z=3.0, min_votes=10)
    assert "troll" in flagged and len(flagged - {"troll"}) <= 1
    few = [v for v in votes if v[0] != "troll"] + [("troll", "v1", "v2", "a")] * 5
    assert "troll" not in outlier_users(few, z=3.0, min_votes=10)  # too few votes to judge
    same = [(u, "v1", "v1", c) for u, _, _, c in votes]  # one version on both sides: no signal
    assert outlier_users(same, z=3.0, min_votes=10) == set()


def test_a_snapshot_leaves_the_outliers_pairs_out(store):
    for user, picks_v2 in [("honest1", 10), ("honest2", 9), ("honest3", 10), ("troll", 0)]:
        conv = store.new_conversation(user, "api")
        for i in range(10):
            ctx = [{"role": "user", "content": f"{user} question {i}"}]
            old = store.record_exchange(conv, generation(ctx, f"old reply {i}", adapter="v1"))
            new = store.record_exchange(conv, generation(ctx, f"new reply {i}", adapter="v2"))
            store.record_comparison(old, new, "b" if i < picks_v2 else "a", user)
    flagged = prefs.outlier_raters(store, 3.0, 10)
    assert flagged == {"troll"}
    kept = prefs.build_pairs(store, 0, flagged).pairs
    assert len(kept) == 30 and all(p.user_id != "troll" for p in kept)
    assert len(prefs.build_pairs(store, 0).pairs) == 40
