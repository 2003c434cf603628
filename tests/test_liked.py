"""The liked share of each served version: the Wilson interval against known values, the table
from a real log (latest thumb per user and reply, no imported rows, serving order, the gate's
verdicts next to it), and its plot."""

from __future__ import annotations

import pytest

from chatloop.evaluate import Check, Verdict
from chatloop.liked import liked_by_version, wilson
from conftest import generation


def test_the_wilson_interval_matches_known_values():
    # Wilson (1927) 95 % interval for 8 of 10: 0.490 to 0.943; for 0 of 10: 0 to 0.278
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_liked_share_per_version_from_the_log_with_the_gates_verdicts(store):
    def reply(version, user="ui:u"):
        conv = store.new_conversation(user, "ui")
        return store.record_exchange(conv, generation([{"role": "user", "content": "hi"}], "r", adapter=version))

    for i in range(4):
        store.record_feedback(reply("base"), None, 1 if i == 0 else -1)  # base: 1 of 4 liked
    m = reply("v1")
    store.record_feedback(m, None, -1)
    store.record_feedback(m, None, 1)  # changed mind: the latest counts
    for _ in range(2):
        store.record_feedback(reply("v1"), None, 1)  # v1: 3 of 3 liked
    imported = store.new_conversation("import:hh", "import")
    mid = store.record_exchange(imported, generation([{"role": "user", "content": "x"}], "y", adapter="v1"))
    store.record_feedback(mid, None, -1)  # an imported rating is not a user's: left out
    store.record_activation("v1", "base", "gate")
    rejected = Verdict([Check("accuracy", True, "accuracy fine"), Check("kl", False, "KL 1.4 above 1.0")])
    store.record_activation("base", "v1", "rollback")  # base still counts as serving from the start
    for version, status, verdict in (("v1", "promoted", Verdict()), ("v2", "rejected", rejected)):
        run = store.start_run("dpo", "cli", "base", {})
        store.finish_run(run, status, candidate_version=version, metrics={"gate": verdict.as_dict()},
                         verdict=verdict.line(status))
    store.start_run("dpo", "cli", "v1", {})  # still running: no candidate yet, not listed
    rows = liked_by_version(store.version_thumbs(), store.first_activations(), store.candidate_verdicts())
    assert [(r["version"], r["thumbs"], r["liked_pct"], r["gate"]) for r in rows] == [
        ("base", 4, 25.0, "the base model"), ("v1", 3, 100.0, "promoted"), ("v2", 0, None, "rejected")]
    assert rows[1]["low_pct"] == pytest.approx(100 * wilson(3, 3)[0], abs=0.05) and rows[1]["high_pct"] == 100.0
    assert rows[1]["served_from"] is not None and rows[0]["served_from"] is None
    assert rows[2]["why"] == "KL 1.4 above 1.0" and rows[2]["run_id"] == 2


def test_the_plot_draws_every_version_with_its_interval():
    from ui.plots import liked_plot

    rows = [{"version": "base", "liked_pct": 25.0, "low_pct": 4.6, "high_pct": 69.9, "thumbs": 4, "gate": "the base model"},
            {"version": "v1", "liked_pct": 100.0, "low_pct": 43.9, "high_pct": 100.0, "thumbs": 3, "gate": "promoted"},
            {"version": "v2", "liked_pct": None, "low_pct": None, "high_pct": None, "thumbs": 0, "gate": "rejected"}]
    fig = liked_plot(rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "v1", "v2"]
    assert "rejected" in " ".join(t.get_text() for t in ax.texts)
    assert liked_plot([]).axes[0].get_title().startswith("no thumbs")
