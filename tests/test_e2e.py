"""The whole loop against the real service: `chatloop serve` on a loopback port, the official
openai client, thumbs, an A/B choice, `chatloop retrain`, and the new adapter answering."""

from __future__ import annotations

import re

import httpx
import openai
import pytest


def test_chat_rate_compare_retrain_and_hot_swap(live_server):
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused")
    admin = {"Authorization": f"Bearer {live_server.token}"}

    # chat: plain and streamed, through the unmodified official client
    first = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=8, temperature=0.0)
    assert first.id.startswith("msg-") and first.choices[0].message.content
    assert first.model_extra["chatloop_adapter"] == "base"
    stream = client.chat.completions.create(model="anything", stream=True, max_tokens=8,
                                            messages=[{"role": "user", "content": "Stream, please."}])
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices[0].finish_reason in ("stop", "length")

    # feedback: thumbs on two replies to the same context and A/B choices
    for i in range(3):
        msgs = [{"role": "user", "content": f"Tell me something nice #{i}"}]
        a, b = (client.chat.completions.create(model="m", messages=msgs, max_tokens=8, seed=s, temperature=1.0)
                for s in (1, 2))
        assert httpx.post(live_server.url + "/v1/feedback",
                          json={"message_id": a.id, "rating": 1, "reason": "helpful"}).status_code == 200
        assert httpx.post(live_server.url + "/v1/feedback",
                          json={"message_id": b.id, "rating": -1, "comment": "rude"}).status_code == 200
        c = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, seed=3, temperature=1.0)
        assert httpx.post(live_server.url + "/v1/comparisons",
                          json={"message_a": a.id, "message_b": c.id, "choice": "a"}).status_code == 200
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], temperature=7)

    # retrain through the CLI, which talks to the running service
    done = live_server.cli("retrain", "--algo", "dpo")
    assert done.returncode == 0, done.stderr
    assert "promoted v1" in done.stdout
    assert re.search(r"dpo: [^\r\n]*\d+/\d+", done.stderr)  # the progress bar of the DPO phase

    # the next reply comes from the new adapter, with no restart
    after = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
    assert after.model_extra["chatloop_adapter"] == "v1"
    assert httpx.get(live_server.url + "/healthz").json()["active_adapter"] == "v1"
    sql = httpx.post(live_server.url + "/admin/sql", headers=admin, json={
        "sql": f"SELECT adapter_version FROM generations WHERE message_id = '{after.id}'"}).json()
    assert sql["rows"] == [["v1"]]
    runs = httpx.get(live_server.url + "/admin/runs", headers=admin).json()["runs"]
    assert runs[0]["status"] == "promoted" and runs[0]["n_pairs"] >= 3
    listed = live_server.cli("adapters", "list")
    assert "* " in listed.stdout and "v1" in listed.stdout

    # roll back through the CLI: base again, and that is recorded
    back = live_server.cli("adapters", "rollback")
    assert back.returncode == 0 and "active: base" in back.stdout
    again = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert again.model_extra["chatloop_adapter"] == "base"
    out = live_server.cli("sql", "SELECT version, actor FROM adapter_activations ORDER BY id")
    assert out.stdout.splitlines()[1:] == ["v1\tgate", "base\trollback"]


def test_retrain_with_too_little_feedback_is_a_clear_message(live_server):
    r = live_server.cli("retrain")
    assert r.returncode == 2
    assert "not enough feedback" in r.stderr and "Traceback" not in r.stderr


def test_cli_works_on_the_data_dir_when_no_service_runs(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    env_args = ["--data-dir", str(tmp_path / "d"), "--model", str(tiny_model_dir)]
    r = subprocess.run([sys.executable, "-m", "chatloop.cli", "sql", "SELECT count(*) AS n FROM messages",
                        *env_args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines() == ["n", "0"]
    r = subprocess.run([sys.executable, "-m", "chatloop.cli", "retrain", *env_args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not enough feedback" in r.stderr
