"""The whole loop against the real service: `chatloop serve` on a loopback port, the official
openai client, thumbs, an A/B choice, `chatloop retrain`, and the new adapter answering."""

from __future__ import annotations

import json
import re
import socket
import time

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
        # a client without the cookie names its user, on the chat and on the votes (issue 19)
        a, b = (client.chat.completions.create(model="m", messages=msgs, max_tokens=8, seed=s, temperature=1.0,
                                               user="e2e") for s in (1, 2))
        assert httpx.post(live_server.url + "/v1/feedback",
                          json={"message_id": a.id, "rating": 1, "reason": "helpful", "user": "e2e"}).status_code == 200
        assert httpx.post(live_server.url + "/v1/feedback",
                          json={"message_id": b.id, "rating": -1, "comment": "rude", "user": "e2e"}).status_code == 200
        c = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, seed=3, temperature=1.0, user="e2e")
        assert httpx.post(live_server.url + "/v1/comparisons",
                          json={"message_a": a.id, "message_b": c.id, "choice": "a", "user": "e2e"}).status_code == 200
        assert httpx.post(live_server.url + "/v1/feedback",  # nobody else may rate it
                          json={"message_id": c.id, "rating": -1}).status_code == 403
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


def _raw_request(url: str, body: dict) -> socket.socket:
    """A chat request on a bare socket (so the test can really hang up)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def _stored(server, user: str) -> list:
    r = httpx.post(server.url + "/admin/sql", headers={"Authorization": f"Bearer {server.token}"}, json={
        "sql": "SELECT g.finish_reason, g.completion_tokens, m.content FROM messages m"
               " JOIN generations g ON g.message_id = m.id JOIN conversations c ON c.id = m.conversation_id"
               f" WHERE c.user_id = 'api:{user}'"})
    return r.json()["rows"]


def _wait_stored(server, user: str, timeout: float = 30) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _stored(server, user)
        if rows:
            return rows
        time.sleep(0.2)
    pytest.fail(f"the hung-up reply of {user} was never stored")


LONG = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 1024,
        "temperature": 1.0, "repetition_penalty": 1.0, "stop": ["\\u0000never"]}


def test_a_client_that_hangs_up_stops_its_generation_and_the_reply_is_kept(live_server):
    """Issue 19: a real disconnect (socket closed mid-stream through the real server) used to
    leave the row decoding to max_tokens and the reply unstored."""
    healthy = httpx.post(live_server.url + "/v1/chat/completions", timeout=120,
                         json={**LONG, "user": "timing", "stream": False}).json()
    full_tokens = healthy["usage"]["completion_tokens"]  # what an uninterrupted reply runs to
    print("uninterrupted reply:", full_tokens, "tokens")  # shown with -s
    sock = _raw_request(live_server.url, {**LONG, "user": "hangup-stream", "stream": True})
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    sock.close()
    finish, tokens, text = _wait_stored(live_server, "hangup-stream")[0]
    print(f"hung up after {received.count(b'data: ')} chunks; generation stopped at {tokens} tokens")
    assert finish == "cancelled" and tokens < full_tokens / 2, (finish, tokens, full_tokens)
    first = json.loads(received.split(b"data: ")[1].split(b"\n\n")[0])
    assert text.startswith(first["choices"][0]["delta"]["content"])

    sock = _raw_request(live_server.url, {**LONG, "user": "hangup-plain", "stream": False})
    time.sleep(0.3)  # generating, nothing sent yet
    sock.close()
    finish, tokens, _ = _wait_stored(live_server, "hangup-plain")[0]
    print(f"non-streaming: hung up after 0.3 s; generation stopped at {tokens} tokens")
    assert finish == "cancelled" and tokens < full_tokens / 2, (finish, tokens, full_tokens)
