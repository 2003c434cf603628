"""Adapter registry (atomic publish, validation, active pointer, rollback) and preference pairs
(A/B and thumbs pairing, latest vote, leak-free split, per-user cap)."""

from __future__ import annotations

import json

import pytest

from chatloop import prefs
from chatloop.adapters import AdapterError, AdapterRegistry
from conftest import log_reply as _reply


def fake_adapter(path):
    from safetensors.torch import save_file
    import torch

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file({"w": torch.zeros(2)}, str(path / "adapter_model.safetensors"))
    return path


def test_publish_numbers_versions_and_ignores_temporaries(tmp_path):
    reg = AdapterRegistry(tmp_path / "adapters")
    (tmp_path / "adapters" / ".tmp-crashed").mkdir()  # a crash mid-publish leaves only this
    assert reg.versions() == []
    assert reg.publish(fake_adapter(tmp_path / "a"), {"parent": "base"}) == "v1"
    assert reg.publish(fake_adapter(tmp_path / "b"), {"parent": "v1"}) == "v2"
    assert reg.versions() == ["v1", "v2"]
    assert reg.metadata("v2")["parent"] == "v1"
    with pytest.raises(AdapterError):
        reg.publish(tmp_path / "missing", {})
    broken = fake_adapter(tmp_path / "c")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError):
        reg.publish(broken, {})
    dora = fake_adapter(tmp_path / "d")
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        reg.publish(dora, {})
    assert reg.versions() == ["v1", "v2"]


def test_active_pointer_and_rollback(tmp_path):
    reg = AdapterRegistry(tmp_path / "adapters")
    for name in "ab":
        reg.publish(fake_adapter(tmp_path / name), {})
    assert reg.active() == "base"
    with pytest.raises(AdapterError):
        reg.rollback_target()
    assert reg.set_active("v1") == "base"
    assert reg.set_active("v2") == "v1"
    with pytest.raises(AdapterError):
        reg.set_active("v7")
    with pytest.raises(AdapterError):
        reg.set_active("../etc")
    assert AdapterRegistry(tmp_path / "adapters").active() == "v2"  # persisted
    assert reg.pop_active() == ("v2", "v1")
    assert reg.pop_active() == ("v1", "base")
    assert reg.active() == "base"


# ---- preference pairs ----------------------------------------------------------------------------
def test_pairs_from_ab_and_thumbs(store):
    ctx1 = [{"role": "user", "content": "one"}]
    ctx2 = [{"role": "user", "content": "two"}]
    conv = store.new_conversation("u1", "api")
    a, b, c = (_reply(store, conv, ctx1, t) for t in ("good", "bad", "meh"))
    d, e = (_reply(store, conv, ctx2, t) for t in ("fine", "awful"))
    store.record_comparison(a, b, "a", "u1")
    store.record_comparison(a, c, "tie", "u1")  # ties never pair
    store.record_comparison(b, c, "both_bad", "u1")
    store.record_feedback(d, "u1", 1)
    store.record_feedback(e, "u1", 1)
    store.record_feedback(e, "u1", -1)  # changed vote: the latest counts
    store.record_feedback(a, "u1", 1)  # a thumb alone in ctx1 with no down: a+b already paired by A/B
    store.record_feedback(b, "u1", -1)  # the same preference as the A/B choice: merged
    got = {(p.prompt[0]["content"], p.chosen, p.rejected, p.source) for p in prefs.build_pairs(store).pairs}
    assert got == {("one", "good", "bad", "ab"), ("two", "fine", "awful", "thumbs")}
    merged = [p for p in prefs.build_pairs(store).pairs if p.chosen == "good"][0]
    assert merged.comparison_ids and len(merged.feedback_ids) == 2


def test_net_votes_across_users(store):
    ctx = [{"role": "user", "content": "q"}]
    conv = store.new_conversation("u1", "api")
    x, y = _reply(store, conv, ctx, "x"), _reply(store, conv, ctx, "y")
    store.record_feedback(x, "u1", 1)
    store.record_feedback(x, "u2", -1)  # net zero: x is unused
    store.record_feedback(y, "u1", -1)
    assert prefs.build_pairs(store).pairs == []
    store.record_feedback(x, "u3", 1)
    assert [(p.chosen, p.rejected) for p in prefs.build_pairs(store).pairs] == [("x", "y")]


def _pair(ctx: str, user: str = "u") -> prefs.Pair:
    return prefs.Pair(prompt=[{"role": "user", "content": ctx}], chosen="c", rejected="r", source="ab",
                      context_hash=ctx, user_id=user)


def test_split_is_by_context_stable_and_never_leaks():
    pairs = [_pair(f"ctx{i % 40}") for i in range(200)]
    train, held = prefs.split_pairs(pairs, 0.2, 4)
    assert held and train and len(train) + len(held) == 200
    assert not {p.context_hash for p in train} & {p.context_hash for p in held}
    again_train, again_held = prefs.split_pairs(list(reversed(pairs)), 0.2, 4)
    assert {p.context_hash for p in again_held} == {p.context_hash for p in held}
    assert prefs.split_pairs(pairs[:10], 0.2, 4) == (pairs[:10], [])  # too few: all train


def test_per_user_cap_keeps_the_newest():
    pairs = [_pair(f"c{i}", "spammer") for i in range(10)] + [_pair("z", "other")]
    kept, capped = prefs.cap_per_user(pairs, 3)
    assert capped == 7
    assert [p.context_hash for p in kept] == ["c7", "c8", "c9", "z"]
    assert prefs.cap_per_user(pairs, 0) == (pairs, 0)
