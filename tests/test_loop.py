"""One retraining cycle: refusal on too little feedback, a promoted cycle with lineage, one cycle
at a time, cancellation, and a failing child that leaves serving untouched."""

from __future__ import annotations

import json
import math
import time

import pytest

from chatloop.adapters import AdapterRegistry
from chatloop.loop import CycleBusy, NotEnoughFeedback, Retrainer, TrainingFailed
from chatloop.store import Store
from conftest import log_reply, make_settings


def seed_pairs(store: Store, n: int) -> None:
    conv = store.new_conversation("u1", "api")
    for i in range(n):
        ctx = [{"role": "user", "content": f"question {i}"}]
        ids = [log_reply(store, conv, ctx, text) for text in (f"A kind, helpful answer {i}.", f"Go away {i}.")]
        store.record_comparison(ids[0], ids[1], "a", "u1")


@pytest.fixture
def parts(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path / "data", tiny_model_dir, min_pairs=4)
    store = Store(settings.db_path)
    registry = AdapterRegistry(settings.adapters_dir)
    activations = []

    def activate(version, actor, reason):
        registry.set_active(version)
        activations.append((version, actor))

    retrainer = Retrainer(settings, store, registry, str(tiny_model_dir), activate, registry.active)
    yield settings, store, registry, retrainer, activations
    store.close()


def test_too_little_feedback_is_refused_and_recorded(parts):
    settings, store, registry, retrainer, activations = parts
    seed_pairs(store, 2)
    with pytest.raises(NotEnoughFeedback, match="need at least 4"):
        retrainer.run_cycle()
    run = store.list_runs()[0]
    assert run["status"] == "refused" and "2 preference pair" in run["error"]
    assert registry.versions() == [] and activations == []


def test_cycle_trains_publishes_and_activates_with_lineage(parts):
    settings, store, registry, retrainer, activations = parts
    seed_pairs(store, 6)
    stages = []
    run = retrainer.run_cycle(on_progress=lambda s: stages.append((s.stage, s.step if s.phase == "dpo" else 0)))
    assert run["status"] == "promoted" and run["candidate_version"] == "v1"
    assert activations == [("v1", "gate")] and registry.active() == "v1"
    assert sorted(run["comparison_ids"]) == list(range(1, 7))
    assert run["metrics"]["history"] and run["metrics"]["final_loss"] < run["metrics"]["first_loss"]
    meta = registry.metadata("v1")
    assert meta["parent"] == "base" and meta["run_id"] == run["id"] and meta["algo"] == "dpo"
    assert {s for s, _ in stages} >= {"snapshot", "training", "gate", "publishing", "done"}
    assert max(step for _, step in stages) == run["metrics"]["steps"]
    # the next cycle starts from v1 and records it as parent
    run2 = retrainer.run_cycle()
    assert run2["parent_version"] == "v1" and registry.metadata(run2["candidate_version"])["parent"] == "v1"


def test_one_cycle_at_a_time_and_cancel(parts, tmp_path):
    settings, store, registry, retrainer, activations = parts
    seed_pairs(store, 6)
    retrainer.settings = settings.replace(training=settings.training.__class__(
        **{**settings.training.__dict__, "epochs": 500}))
    run_id = retrainer.start_cycle(trigger="api")
    with pytest.raises(CycleBusy, match=f"run {run_id}"):
        retrainer.run_cycle()
    deadline = time.monotonic() + 60
    while (retrainer.current is None or retrainer.current.step < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert retrainer.cancel()
    while retrainer.current is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    run = store.get_run(run_id)
    assert run["status"] == "failed" and "cancelled" in run["error"]
    assert registry.versions() == [] and registry.active() == "base"
    assert len(store.list_runs()) == 1  # the refused second trigger did not start a run


def test_failing_child_leaves_serving_untouched(parts, tmp_path):
    settings, store, registry, retrainer, activations = parts
    seed_pairs(store, 6)
    retrainer.model_path = str(tmp_path / "no-such-model")
    with pytest.raises(TrainingFailed, match="training process failed"):
        retrainer.run_cycle()
    run = store.list_runs()[0]
    assert run["status"] == "failed" and run["error"]
    assert registry.versions() == [] and activations == [] and registry.active() == "base"


def seed_thumbs(store: Store, n: int) -> None:
    conv = store.new_conversation("u2", "api")
    for i in range(n):
        ctx = [{"role": "user", "content": f"thumbs question {i}"}]
        mid = log_reply(store, conv, ctx, f"Happy to help with {i}!" if i % 2 == 0 else f"No. {i}")
        store.record_feedback(mid, "u2", 1 if i % 2 == 0 else -1)


@pytest.mark.parametrize("register_margin", [0.0, 0.01])
def test_kto_cycle_from_unpaired_thumbs(parts, register_margin):
    """With ``kto_register_margin`` the liked replies far more assistant-like than the disliked
    ones are measured and left out before KTO trains (the rest is the same cycle)."""
    settings, store, registry, retrainer, activations = parts
    retrainer.settings = settings.replace(training=settings.training.__class__(
        **{**settings.training.__dict__, "min_thumbs": 4, "kto_register_margin": register_margin}))
    seed_thumbs(store, 3)
    with pytest.raises(NotEnoughFeedback, match="KTO"):
        retrainer.run_cycle("kto")
    seed_thumbs(store, 8)  # the same contexts again plus more: latest votes, both kinds
    run = retrainer.run_cycle("kto")
    assert run["status"] in ("promoted", "rejected") and run["candidate_version"]
    assert run["metrics"]["algo"] == "kto" and run["metrics"]["desirable"] and run["metrics"]["undesirable"]
    assert run["feedback_ids"] and not run["comparison_ids"]
    assert registry.metadata(run["candidate_version"])["algo"] == "kto"
    kept = run["metrics"]["thumb_filter"]
    if register_margin == 0:
        assert kept == {"off": True}
    else:  # every disliked thumb stays; the liked ones KTO trained on are those the filter kept
        assert kept["thumbs"] >= run["metrics"]["desirable"] + run["metrics"]["undesirable"]
        assert run["metrics"]["desirable"] == kept["liked_kept"] <= kept["liked"]
        assert kept["threshold"] == pytest.approx(kept["disliked_median"] + register_margin)


def test_ppo_cycle_trains_a_reward_model_then_the_policy(parts):
    settings, store, registry, retrainer, activations = parts
    retrainer.settings = settings.replace(training=settings.training.__class__(**{
        **settings.training.__dict__, "ppo_rollouts": 2, "ppo_rollout_batch_size": 4, "ppo_minibatch_size": 2,
        "ppo_epochs": 1, "ppo_max_new_tokens": 6, "gate_prompts": 4, "gate_max_new_tokens": 8,
        "reward_epochs": 1, "min_eval_pairs": 1, "eval_fraction": 0.3}))
    seed_pairs(store, 10)
    seed_thumbs(store, 4)
    seen: list[tuple[str, int, int]] = []
    run = retrainer.run_cycle("ppo", on_progress=lambda s: seen.append((s.phase, s.step, s.total)))
    m = run["metrics"]
    assert m["algo"] == "ppo" and len(m["history"]) == 2
    # the default reward terms are on: each rollout logs the register, relevance and degenerate share it paid for
    assert all({"mean_register", "register_floor", "mean_relevance", "degenerate_share"} <= set(h) for h in m["history"])
    # progress shows the pairs' relevance filter, the reward head's warm start, the reward model's steps,
    # then PPO's, each phase counting its own
    phases = [p for i, (p, _, _) in enumerate(seen) if p and (i == 0 or seen[i - 1][0] != p)]
    assert phases == ["relevance filter", "reward probe", "reward model", "ppo"]
    assert [st for p, st, _ in seen if p == "ppo"][-1] == m["steps"]
    kept = m["reward_model"]["pair_filter"]  # the reward model learns from the pairs the filter kept
    assert kept["pairs"] == run["n_pairs"] and m["reward_model"]["train_pairs"] == kept["kept"]
    assert m["reward_model"]["held_out"]["pairs"]
    assert 0 < m["judge"]["prompts"] <= 4 and "win_rate" in m["judge"]["reward"]
    assert "reward model prefers the candidate" in run["verdict"]
    assert (settings.runs_dir / f"run-{run['id']}" / "reward" / "head.safetensors").is_file()
    assert run["status"] in ("promoted", "rejected")


def test_rloo_cycle_trains_a_reward_model_then_the_policy_on_k_replies_per_prompt(parts):
    settings, store, registry, retrainer, activations = parts
    with_training(retrainer, settings, rloo_steps=2, rloo_prompts_per_step=2, rloo_k=3, rloo_minibatch_size=3,
                  rloo_max_new_tokens=6, gate_prompts=3, gate_max_new_tokens=8, reward_epochs=1, min_eval_pairs=1,
                  eval_fraction=0.3)
    seed_pairs(store, 10)
    seen: list[tuple[str, int, int]] = []
    run = retrainer.run_cycle("rloo", on_progress=lambda s: seen.append((s.phase, s.step, s.total)))
    m = run["metrics"]
    assert m["algo"] == "rloo" and m["steps"] == 2 and m["replies_seen"] == 2 * 2 * 3
    # the default reward terms are on: each step logs the register, relevance and degenerate share it paid for
    assert all({"mean_register", "register_floor", "mean_relevance", "degenerate_share"} <= set(h) for h in m["history"])
    assert m["history"][0]["register_floor"] == m["history"][1]["register_floor"]
    phases = [p for p, _, _ in seen if p]
    assert phases[0] == "relevance filter" and phases[-1] == "rloo" and "reward model" in phases
    assert m["reward_model"]["train_pairs"] == m["reward_model"]["pair_filter"]["kept"]
    assert "reward model held-out pair accuracy" in run["verdict"]  # RLOO's accuracy check is its reward model's
    assert 0 < m["judge"]["prompts"] <= 3 and "win_rate" in m["judge"]["reward"]
    assert registry.metadata(run["candidate_version"])["algo"] == "rloo"
    assert run["status"] in ("promoted", "rejected")


def with_training(retrainer, settings, **changes):
    retrainer.settings = settings.replace(training=settings.training.__class__(
        **{**settings.training.__dict__, **changes}))


@pytest.mark.parametrize("thumbs_weight", [0.0, 1.0])
def test_dpo_cycle_learns_from_lone_thumbs_only_when_weighted(parts, thumbs_weight):
    """The thumbs reach the DPO job through the snapshot (even with no gate reward model to need
    them) and the run records them as used; at weight 0 they are neither written nor counted."""
    settings, store, registry, retrainer, activations = parts
    with_training(retrainer, settings, gate_reward_model=False, dpo_thumbs_weight=thumbs_weight)
    seed_pairs(store, 6)
    seed_thumbs(store, 4)
    run = retrainer.run_cycle("dpo")
    m = run["metrics"]
    thumbs_ids = {t["feedback_id"] for t in store.latest_thumbs()}
    if thumbs_weight:
        assert m["train_thumbs"] == 4 and m["thumbs_up_down"] == [2, 2] and m["thumbs_stratified"]
        assert all("thumbs_loss" in h for h in m["history"])
        assert thumbs_ids <= set(run["feedback_ids"])
    else:
        assert m["train_thumbs"] == 0 and not thumbs_ids & set(run["feedback_ids"] or [])


def test_dpo_gate_judges_held_out_prompts_with_a_reward_model(parts):
    settings, store, registry, retrainer, activations = parts
    with_training(retrainer, settings, min_eval_pairs=1, eval_fraction=0.3, gate_prompts=3,
                  gate_max_new_tokens=8, reward_epochs=1, pair_min_relevance=1.0)
    seed_pairs(store, 10)
    run = retrainer.run_cycle("dpo")
    judged, gate = run["metrics"]["judge"], run["metrics"]["gate"]
    # pairs whose chosen reply's relevance is below the median (share 1.0) are left out of DPO and
    # of the gate's reward model alike, from one measurement of them
    kept = run["metrics"]["pair_filter"]
    cached = json.loads((settings.runs_dir / f"run-{run['id']}" / "pair_relevance.json").read_text())
    assert kept["pairs"] == len(cached["train"]) and 0 < kept["kept"] < kept["pairs"]
    assert run["metrics"]["train_pairs"] == kept["kept"]
    assert kept["kept"] == sum(v >= kept["threshold"] for v in cached["train"])
    assert judged["reward_model"]["pair_filter"] == kept
    assert judged["prompts"] == 3 and judged["reward"] and math.isfinite(judged["kl_to_base"])
    assert set(judged["degenerate"]) == {"candidate", "reference"}
    assert set(gate["checks"]) == {"accuracy", "win_rate", "kl", "degenerate", "relevance", "register", "document"}
    # the register is checked at the defaults; the document likelihood is reported only
    assert all(v is not None for k, v in gate["checks"].items() if k != "document") and gate["checks"]["document"] is None
    rel = judged["relevance"]  # the parent is base: the reference's replies are the base model's
    assert rel["base"] == rel["reference"] and rel["candidate"]["replies"] <= 3
    assert rel["paired_difference"]["replies"] <= 3
    reg = judged["register"]
    assert reg["candidate"]["mean"] is not None and reg["paired_difference"]["replies"] <= 3
    doc = judged["document"]  # the same passes' plain-document likelihood, a log-likelihood per token
    assert doc["candidate"]["mean"] < 0 and doc["paired_difference"]["replies"] == reg["paired_difference"]["replies"]
    assert run["status"] == ("promoted" if all(v is not False for v in gate["checks"].values()) else "rejected")
    assert set(run["metrics"]["timings"]) == {"snapshot_s", "train_and_judge_s", "publish_s"}


def test_gate_rejects_a_deliberately_worse_candidate_and_serving_is_untouched(parts):
    settings, store, registry, retrainer, activations = parts
    seed_pairs(store, 10)
    with_training(retrainer, settings, min_eval_pairs=1, eval_fraction=0.3, gate_prompts=3,
                  gate_max_new_tokens=8, gate_reward_model=False)
    good = retrainer.run_cycle("dpo")
    registry.set_active(good["candidate_version"])  # whatever its verdict, it is what serves now
    assert good["metrics"]["judge"]["kl_to_base"] < 0.3
    # a learning rate 1000x too high drags the model far from base (~0.7-1 nats/token here); held-out
    # selection would hand back the starting weights, so it is off to reach the KL check
    with_training(retrainer, settings, min_eval_pairs=1, eval_fraction=0.3, gate_prompts=3,
                  gate_max_new_tokens=8, gate_reward_model=False, learning_rate=1.0, epochs=3,
                  gate_max_kl=0.3, select_best=False)
    bad = retrainer.run_cycle("dpo")
    assert bad["status"] == "rejected", bad["verdict"]
    checks = bad["metrics"]["gate"]["checks"]
    assert checks.get("kl") is False or checks.get("finite_loss") is False
    rel = (bad["metrics"].get("judge") or {}).get("relevance")
    if rel:  # the parent is v1 now: the base model answered the prompts as well, as the anchor
        assert set(rel) == {"candidate", "reference", "base", "paired_difference"}
    assert registry.active() == good["candidate_version"]
    assert ("v2", "gate") not in activations


def vote(store, cand: str, other: str, winner: str | None, user: str) -> None:
    from conftest import generation

    conv = store.new_conversation(user, "compare")
    ctx = [{"role": "user", "content": f"live {user}"}]
    a = store.record_exchange(conv, generation(ctx, "from the candidate", adapter=cand))
    b = store.record_exchange(conv, generation(ctx, "from the active one", adapter=other))
    store.record_comparison(b, a, "tie" if winner is None else "b" if winner == cand else "a", user)


@pytest.mark.parametrize("candidate_wins", [True, False])
def test_live_votes_decide_a_staged_candidate(parts, candidate_wins):
    settings, store, registry, retrainer, activations = parts
    with_training(retrainer, settings, gate_live_votes=3)
    seed_pairs(store, 6)
    run = retrainer.run_cycle("dpo")
    cand = run["candidate_version"]
    assert run["status"] == "staged" and "waiting for 3 live A/B votes" in run["verdict"]
    assert activations == [] and registry.compare_version() == cand
    vote(store, cand, "base", cand if candidate_wins else "base", "r1")
    vote(store, cand, "base", None, "r2")
    assert retrainer.settle_live_comparisons() == []  # 2 of 3 votes: still waiting
    vote(store, cand, "base", cand if candidate_wins else "base", "r3")
    decided = retrainer.settle_live_comparisons()
    assert [r["id"] for r in decided] == [run["id"]]
    if candidate_wins:
        assert decided[0]["status"] == "promoted" and activations == [(cand, "gate")]
        assert "won 0.83 of 3 votes against base" in decided[0]["verdict"]
    else:
        assert decided[0]["status"] == "rejected" and activations == []
        assert "won 0.17 of 3 votes" in decided[0]["verdict"]
    assert registry.compare_version() is None
    assert retrainer.settle_live_comparisons() == []


def test_a_child_killed_with_sigkill_fails_the_cycle_and_serving_is_untouched(parts):
    import os
    import signal
    import subprocess

    settings, store, registry, retrainer, activations = parts
    registry.set_active("base")
    with_training(retrainer, settings, epochs=50)  # long enough to be killed mid-training
    seed_pairs(store, 6)
    run_id = retrainer.start_cycle("dpo", trigger="test")
    job_dir = settings.runs_dir / f"run-{run_id}"
    deadline = time.monotonic() + 60
    pid = None
    while pid is None and time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", f"chatloop.train.runner {job_dir}"], capture_output=True, text=True)
        pid = int(out.stdout.split()[0]) if out.stdout.strip() else None
        time.sleep(0.1)
    assert pid, "the training child did not start"
    os.kill(pid, signal.SIGKILL)
    while retrainer.current is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    run = store.get_run(run_id)
    assert run["status"] == "failed" and "training process failed" in run["error"], run
    assert registry.versions() == [] and activations == [] and registry.active() == "base"
    assert retrainer.start_cycle("dpo", trigger="test")  # the next cycle may start (and is cancelled)
    retrainer.cancel()
    while retrainer.current is not None and time.monotonic() < deadline + 60:
        time.sleep(0.1)


def test_the_judge_reuses_a_recent_reward_model_until_the_data_grows(parts):
    settings, store, registry, retrainer, activations = parts
    with_training(retrainer, settings, min_eval_pairs=1, eval_fraction=0.3, gate_prompts=2,
                  gate_max_new_tokens=6, reward_epochs=1, gate_reward_refresh=0.5)
    seed_pairs(store, 10)
    first = retrainer.run_cycle("dpo")
    assert isinstance(first["metrics"]["judge"]["reward_model"], dict)  # trained here
    assert (settings.runs_dir / f"run-{first['id']}" / "reward" / "head.safetensors").is_file()
    second = retrainer.run_cycle("dpo")  # the same data: reuse
    reused_from = settings.runs_dir / f"run-{first['id']}" / "reward"
    assert second["metrics"]["judge"]["reward_model"] == f"reused {reused_from}"
    assert "reward" in second["metrics"]["judge"]
    conv = store.new_conversation("u9", "api")
    for i in range(20):  # twice the data: too much the old model never saw
        ctx = [{"role": "user", "content": f"new question {i}"}]
        ids = [log_reply(store, conv, ctx, text) for text in (f"Glad to help {i}.", f"No {i}.")]
        store.record_comparison(ids[0], ids[1], "a", "u9")
    third = retrainer.run_cycle("dpo")
    assert isinstance(third["metrics"]["judge"]["reward_model"], dict)


def test_a_candidate_is_never_promoted_over_a_version_it_was_not_compared_with(parts, tiny_model_dir, tmp_path):
    from test_engine import make_adapter

    settings, store, registry, retrainer, activations = parts
    seed_pairs(store, 6)
    other = registry.publish(make_adapter(tiny_model_dir, tmp_path / "by-hand", 5), {"parent": "base"})

    def operator_activates_meanwhile(progress):
        if progress.stage == "training" and registry.active() != other:
            registry.set_active(other)

    run = retrainer.run_cycle(on_progress=operator_activates_meanwhile)
    assert run["parent_version"] == "base" and run["status"] == "rejected"
    checks = {c["name"]: c for c in run["metrics"]["gate"]["results"]}
    assert checks["replaces"]["passed"] is False and f"{other} became active" in checks["replaces"]["reason"]
    assert registry.active() == other and activations == []  # the operator's choice keeps serving

