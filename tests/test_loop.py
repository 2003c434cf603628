"""One retraining cycle: refusal on too little feedback, a promoted cycle with lineage, one cycle
at a time, cancellation, and a failing child that leaves serving untouched."""

from __future__ import annotations

import threading
import time

import pytest

from chatloop.adapters import AdapterRegistry
from chatloop.loop import CycleBusy, NotEnoughFeedback, Retrainer, TrainingFailed
from chatloop.store import GenerationRecord, Store
from conftest import make_settings


def seed_pairs(store: Store, n: int) -> None:
    conv = store.new_conversation("u1", "api")
    for i in range(n):
        ctx = [{"role": "user", "content": f"question {i}"}]
        ids = [store.record_exchange(conv, GenerationRecord(
            context=ctx, reply=text, model="m", adapter_version="base", settings={}, prompt_tokens=1,
            completion_tokens=1, ttft_ms=1, latency_ms=1, finish_reason="stop"))
            for text in (f"A kind, helpful answer {i}.", f"Go away {i}.")]
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
    run = retrainer.run_cycle(on_progress=lambda s: stages.append((s.stage, s.step)))
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
