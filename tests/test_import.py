"""Replaying public feedback data into the log: OpenAssistant trees (ranks -> A/B choices, emoji
counts -> thumbs) and HH-RLHF pairs, with the shared data's fixed held-out rows marked and kept out
of every training snapshot; imports are idempotent and also run through a live service."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest

from chatloop import importers, prefs
from chatloop.store import Store
from conftest import ADMIN_TOKEN, SHARED_DATA


def _reply(mid, text, rank=None, emojis=None, replies=()):
    return {"message_id": mid, "role": "assistant", "text": text, "rank": rank, "emojis": emojis or {},
            "replies": list(replies)}


def _tree(tid, prompt, replies):
    return {"message_tree_id": tid, "prompt": {"message_id": tid, "role": "prompter", "text": prompt,
                                               "replies": replies}}


def _write_trees(path, n):
    """n trees; tree 1 also has a second turn under its best reply (a multi-turn context)."""
    trees = []
    for i in range(n):
        follow = [{"message_id": f"t{i}-u2", "role": "prompter", "text": "and then?",
                   "replies": [_reply(f"t{i}-a4", "then this", rank=0), _reply(f"t{i}-a5", "nothing", rank=1)]}]
        trees.append(_tree(f"t{i}", f"question {i}", [
            _reply(f"t{i}-a1", f"best answer {i}", rank=0, emojis={"+1": 2}, replies=follow if i == 1 else ()),
            _reply(f"t{i}-a2", f"middle answer {i}", rank=1),
            _reply(f"t{i}-a3", f"worst answer {i}", rank=2, emojis={"-1": 1, "+1": 0}),
        ]))
    path.write_text("\n".join(json.dumps(t) for t in trees) + "\n")
    return path


def test_oasst_ranks_become_ab_choices_emojis_thumbs_and_tree_0_is_held_out(store, tmp_path):
    path = _write_trees(tmp_path / "trees.jsonl", 3)
    report = importers.import_oasst(store, path)
    # 3 trees x 3 replies + 2 second-turn replies; 3 ranked pairs per sibling set, 1 for the follow-up
    assert report.replies == 11 and report.comparisons == 3 * 3 + 1
    assert report.thumbs == 3 * 3 and report.held_out_conversations == 3  # tree 0 (i % 5 == 0)
    pairs = prefs.build_pairs(store).pairs
    assert {p.prompt[-1]["content"] for p in pairs} == {"question 1", "question 2", "and then?"}
    ranked = {(p.chosen, p.rejected) for p in pairs if p.prompt[-1]["content"] == "question 2"}
    assert ranked == {("best answer 2", "middle answer 2"), ("best answer 2", "worst answer 2"),
                      ("middle answer 2", "worst answer 2")}  # the thumbs' pair merged into the A/B one
    multi = next(p for p in pairs if p.prompt[-1]["content"] == "and then?")
    assert [m["role"] for m in multi.prompt] == ["user", "assistant", "user"] and multi.chosen == "then this"
    thumbs, _ = prefs.unpaired_thumbs(store)
    assert {(t.completion, t.label) for t in thumbs} == {
        (f"best answer {i}", True) for i in (1, 2)} | {(f"worst answer {i}", False) for i in (1, 2)}
    assert all("question 0" not in json.dumps(c) for _, c in store.distinct_contexts())
    # the held-out rows are in the log all the same, marked
    held = store.query_readonly("SELECT count(*) FROM conversations WHERE held_out", 10, 5).rows[0][0]
    assert held == 3
    assert store.query_readonly("SELECT DISTINCT adapter_version FROM generations", 10, 5).rows == [("external",)]


def test_imports_are_idempotent(store, tmp_path):
    path = _write_trees(tmp_path / "trees.jsonl", 2)
    importers.import_oasst(store, path)
    before = store.feedback_count()
    again = importers.import_oasst(store, path)
    assert again.replies == 0 and again.comparisons == 0 and again.skipped == 8
    assert store.feedback_count() == before


def test_hh_pairs_import_as_ab_choices_with_held_out_lines(store, tmp_path):
    lines = []
    for i in range(7):
        ctx = f"\n\nHuman: question {i}"
        lines.append(json.dumps({"chosen": ctx + f"\n\nAssistant: kind {i}", "rejected": ctx + f"\n\nAssistant: rude {i}"}))
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    report = importers.import_hh(store, path)
    assert report.comparisons == 7 and report.held_out_conversations == 2 * 2  # lines 0 and 5
    assert store.feedback_count() == 5  # a feedback schedule counts only the votes that can train
    pairs = prefs.build_pairs(store).pairs
    assert sorted(p.prompt[0]["content"] for p in pairs) == [f"question {i}" for i in (1, 2, 3, 4, 6)]
    assert all(p.chosen.startswith("kind") for p in pairs)
    limited = importers.import_hh(Store(tmp_path / "other.duckdb"), path, limit=1)
    assert limited.comparisons == 2  # one training line, one held-out line


@pytest.mark.skipif(not (SHARED_DATA / "oasst_en_100_tree.jsonl").is_file(),
                    reason="../shared/data (the shared OASST trees) is not beside this checkout")
def test_real_oasst_trees_keep_every_fifth_tree_out_of_training(store):
    report = importers.import_oasst(store, SHARED_DATA / "oasst_en_100_tree.jsonl")
    assert report.replies >= 600 and report.comparisons > 300 and report.thumbs > 100
    held_trees = {t["message_tree_id"] for i, t in importers.oasst_trees(SHARED_DATA / "oasst_en_100_tree.jsonl")
                  if i % 5 == 0}
    held_prompts = {t["prompt"]["text"].strip() for i, t in importers.oasst_trees(SHARED_DATA / "oasst_en_100_tree.jsonl")
                    if t["message_tree_id"] in held_trees}
    pairs = prefs.build_pairs(store).pairs
    assert pairs and not {p.prompt[0]["content"] for p in pairs} & held_prompts


def test_import_through_a_running_service_and_bad_files(live_server, tmp_path):
    path = _write_trees(tmp_path / "trees.jsonl", 2)
    done = live_server.cli("import", "oasst", str(path))
    assert done.returncode == 0, done.stderr
    assert "comparisons: 7" in done.stdout  # tree 0 (held out) and tree 1 (with a follow-up turn)
    again = live_server.cli("import", "oasst", str(path))
    assert again.returncode == 0 and "skipped: 8" in again.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    failed = live_server.cli("import", "oasst", str(bad))
    assert failed.returncode != 0 and "cannot import" in failed.stderr
    r = httpx.post(live_server.url + "/admin/import/oasst", content=path.read_bytes())
    assert r.status_code == 401
    r = httpx.post(live_server.url + "/admin/import/nope", content=b"x", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 400
