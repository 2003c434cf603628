"""Exports: pairs (as a snapshot builds them, with the held-out flag), every feedback event, and
conversations, as JSON Lines and Parquet, from the store and through the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from chatloop import prefs
from chatloop.export import encode, export_rows
from conftest import log_reply


@pytest.fixture
def store(store):
    """The shared fresh store, with four prompts' pairs and thumbs logged."""
    s = store
    conv = s.new_conversation("alice", "ui")
    for i in range(4):
        ctx = [{"role": "user", "content": f"question {i}"}]
        good, bad = log_reply(s, conv, ctx, f"good {i}"), log_reply(s, conv, ctx, f"bad {i}")
        s.record_comparison(good, bad, "a", "alice")
        s.record_feedback(bad, "bob", -1, "rude", "too short")
    s.record_feedback(good, "bob", 1, None, None)
    return s


def test_rows_of_each_export(store):
    pairs = export_rows(store, "pairs")
    assert len(pairs) == 4 and {p["chosen"] for p in pairs} == {f"good {i}" for i in range(4)}
    assert all(p["held_out"] == prefs.is_held_out(p["context_hash"], 0.2) for p in pairs)
    feedback = export_rows(store, "feedback")
    assert [f["kind"] for f in feedback].count("ab") == 4 and [f["kind"] for f in feedback].count("thumb") == 5
    thumb = next(f for f in feedback if f["kind"] == "thumb")
    assert thumb["rating"] == -1 and thumb["reason"] == "rude" and thumb["adapter_version"] == "base"
    assert thumb["context"] == [{"role": "user", "content": "question 0"}] and thumb["reply"] == "bad 0"
    convs = export_rows(store, "conversations")
    assert len(convs) == 1 and len(convs[0]["messages"]) == 16  # 4 x (user, reply, user, reply)
    with pytest.raises(ValueError, match="unknown export"):
        export_rows(store, "secrets")


@pytest.mark.parametrize("what", ["pairs", "feedback", "conversations"])
def test_jsonl_and_parquet_hold_the_same_rows(store, what):
    rows = export_rows(store, what)
    lines = encode(rows, "jsonl").decode().splitlines()
    from_jsonl = [json.loads(line) for line in lines]
    from_parquet = pq.read_table(io.BytesIO(encode(rows, "parquet"))).to_pylist()
    assert len(from_jsonl) == len(from_parquet) == len(rows)
    key = "context_hash" if what == "pairs" else "id"
    assert [r[key] for r in from_jsonl] == [r[key] for r in from_parquet]
    with pytest.raises(ValueError, match="unknown format"):
        encode(rows, "xlsx")


def test_cli_export_reads_the_file_when_no_service_runs(store, tmp_path):
    data_dir = tmp_path / "data"
    store.close()
    out = tmp_path / "pairs.parquet"
    r = subprocess.run([sys.executable, "-m", "chatloop.cli", "export", "--what", "pairs", "--format", "parquet",
                        "--out", str(out), "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert pq.read_table(out).num_rows == 4
