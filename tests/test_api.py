"""The HTTP API in-process: OpenAI-shaped chat, feedback and comparisons, clear 4xx errors that
write nothing, and operator authentication."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from chatloop.config import Limits
from chatloop.web import create_app
from conftest import ADMIN_TOKEN, api_client

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with api_client(tiny_model_dir, tmp_path_factory.mktemp("api"),
                    limits=Limits(max_message_chars=200, max_messages=4, max_context_tokens=512)) as c:
        yield c


def rows(client, sql):
    return client.post("/admin/sql", json={"sql": sql}, headers=ADMIN).json()["rows"]


def chat(client, **body):
    body.setdefault("messages", HI)
    body.setdefault("max_tokens", 6)
    return client.post("/v1/chat/completions", json=body)


def test_chat_records_reply_with_adapter_and_settings(client):
    r = chat(client, temperature=0.0, seed=1)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("msg-") and body["chatloop_adapter"] == "base"
    assert body["usage"]["completion_tokens"] <= 6
    stored = rows(client, f"SELECT adapter_version, completion_tokens, settings FROM generations "
                          f"WHERE message_id = '{body['id']}'")
    assert stored[0][0] == "base" and stored[0][1] == body["usage"]["completion_tokens"]
    assert json.loads(stored[0][2])["temperature"] == 0.0


def test_streaming_chunks_name_the_stored_message(client):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": HI, "max_tokens": 5, "stream": True, "temperature": 0}) as r:
        assert r.status_code == 200
        lines = [l for l in r.iter_lines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and all(c["chatloop_adapter"] == "base" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert rows(client, f"SELECT content FROM messages WHERE id = '{ids.pop()}'") == [[text]]


@pytest.mark.parametrize("body, status, message", [
    ({"messages": []}, 400, "non-empty"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "empty"),
    ({"messages": [{"role": "user", "content": "x" * 201}]}, 400, "too long"),
    ({"messages": HI * 5}, 400, "too many"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "a\x00b"}]}, 400, "control"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
    ({"messages": HI, "temperature": 9}, 400, "temperature"),
    ({"messages": HI, "max_tokens": 100000}, 400, "max_tokens"),
    ({"messages": HI, "n": 3}, 400, "n must be 1"),
    ({"messages": HI, "chatloop_conversation_id": "conv-nope"}, 404, "unknown conversation"),
    ({"messages": HI, "chatloop_adapter": "v42"}, 400, "unknown adapter"),
    ({"messages": [{"role": "user", "content": "word " * 30}] * 3 + HI, "max_tokens": 480}, 400, "context limit"),
    ({"messages": "hello"}, 400, "messages"),
])
def test_bad_chat_requests_get_clear_errors_and_write_nothing(client, body, status, message):
    before = rows(client, "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM conversations)")
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert rows(client, "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM conversations)") == before


def test_malformed_json_is_a_400(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid request" in r.json()["error"]["message"]


def test_feedback_and_comparisons(client):
    a = chat(client, seed=1, temperature=1.0).json()["id"]
    b = chat(client, seed=2, temperature=1.0).json()["id"]
    r = client.post("/v1/feedback", json={"message_id": a, "rating": 1, "reason": "helpful", "comment": "nice"})
    assert r.status_code == 200 and r.json()["rating"] == 1
    assert client.post("/v1/comparisons", json={"message_a": a, "message_b": b, "choice": "a"}).status_code == 200
    bad = [
        ("/v1/feedback", {"message_id": "msg-nope", "rating": 1}, 404),
        ("/v1/feedback", {"message_id": a, "rating": 0}, 400),
        ("/v1/feedback", {"message_id": a, "rating": "up"}, 400),
        ("/v1/feedback", {"message_id": a}, 400),
        ("/v1/feedback", {"message_id": a, "rating": 1, "reason": "x" * 500}, 400),
        ("/v1/feedback", {"message_id": a, "rating": 1, "extra": 1}, 400),
        ("/v1/comparisons", {"message_a": a, "message_b": "msg-nope", "choice": "a"}, 404),
        ("/v1/comparisons", {"message_a": a, "message_b": b, "choice": "c"}, 400),
        ("/v1/comparisons", {"message_a": a, "message_b": a, "choice": "a"}, 400),
    ]
    before = rows(client, "SELECT (SELECT count(*) FROM feedback_events), (SELECT count(*) FROM comparisons)")
    for path, body, status in bad:
        r = client.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["message"]
    assert rows(client, "SELECT (SELECT count(*) FROM feedback_events), (SELECT count(*) FROM comparisons)") == before


def test_admin_routes_need_the_operator_token(client):
    assert client.get("/admin/status").status_code == 401
    assert client.get("/admin/status", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/admin/status", headers={"X-Admin-Token": ADMIN_TOKEN}).status_code == 200
    assert client.post("/admin/sql", json={"sql": "DROP TABLE messages"}, headers=ADMIN).status_code == 400
    assert client.post("/admin/adapters/v9/activate", headers=ADMIN).status_code == 404
    assert client.post("/admin/rollback", headers=ADMIN).status_code == 400
    assert client.get("/admin/runs/12345", headers=ADMIN).status_code == 404
    assert client.post("/admin/retrain", json={"algo": "nope"}, headers=ADMIN).status_code == 400


def test_a_waited_for_cycle_that_fails_answers_a_json_error(client, monkeypatch):
    from chatloop.loop import TrainingFailed

    def fail(algo, trigger):
        raise TrainingFailed("training process failed: RuntimeError: tensors on two devices")

    monkeypatch.setattr(client.service.retrainer, "run_cycle", fail)
    r = client.post("/admin/retrain", json={"algo": "dpo", "wait": True}, headers=ADMIN)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "training_failed" and "tensors on two devices" in err["message"]


def test_admin_is_disabled_without_a_configured_token(client):
    app = create_app(client.service, admin_token="")
    with TestClient(app) as c:
        r = c.get("/admin/status", headers={"Authorization": "Bearer "})
        assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]


def test_a_client_that_goes_away_frees_the_engine_and_keeps_what_it_saw(client):
    service = client.service
    turn = service.chat(HI, service.params(max_tokens=400, temperature=1.0), user_id="api")
    stream = iter(turn)
    seen = next(stream) + next(stream)
    stream.close()  # what a disconnecting HTTP client does to the response generator
    c = turn.completion
    assert c.finish_reason == "cancelled" and c.completion_tokens < 400
    stored = rows(client, f"SELECT m.content, g.finish_reason FROM messages m JOIN generations g "
                          f"ON g.message_id = m.id WHERE m.id = '{turn.message_id}'")
    assert stored[0][1] == "cancelled" and stored[0][0].startswith(seen)


def test_operator_override_promotes_a_rejected_candidate_and_records_why(client, tiny_model_dir, tmp_path):
    from test_engine import make_adapter

    service = client.service
    version = service.registry.publish(make_adapter(tiny_model_dir, tmp_path / "cand", 5), {"parent": "base"})
    run_id = service.store.start_run("dpo", "api", service.engine.active_version, {})
    service.store.finish_run(run_id, "rejected", candidate_version=version, verdict="rejected: ✗ KL to base 2.0")
    before = service.engine.active_version
    assert client.post(f"/admin/runs/{run_id}/override", json={"reason": "x"}).status_code == 401
    r = client.post(f"/admin/runs/{run_id}/override", json={"reason": ""}, headers=ADMIN)
    assert r.status_code == 400
    r = client.post(f"/admin/runs/{run_id}/override", json={"reason": "  "}, headers=ADMIN)
    assert r.status_code == 400 and "reason" in r.json()["error"]["message"]
    assert service.engine.active_version == before
    r = client.post(f"/admin/runs/{run_id}/override", json={"reason": "reviewed the replies by hand"},
                    headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["active"] == version and service.engine.active_version == version
    run = client.get(f"/admin/runs/{run_id}", headers=ADMIN).json()
    assert run["status"] == "overridden" and "reviewed the replies by hand" in run["override"]
    assert rows(client, "SELECT actor, reason FROM adapter_activations ORDER BY id DESC LIMIT 1") == [
        ["override", "operator overrode the gate: reviewed the replies by hand"]]
    again = client.post(f"/admin/runs/{run_id}/override", json={"reason": "again"}, headers=ADMIN)
    assert again.status_code == 409
    assert client.post("/admin/runs/9999/override", json={"reason": "x"}, headers=ADMIN).status_code == 404
    client.post("/admin/rollback", headers=ADMIN)
    assert service.engine.active_version == before


def test_export_through_the_api(client):
    r = client.get("/admin/export", params={"what": "feedback", "format": "jsonl"}, headers=ADMIN)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert 'filename="chatloop-feedback.jsonl"' in r.headers["content-disposition"]
    stored = rows(client, "SELECT (SELECT count(*) FROM feedback_events) + (SELECT count(*) FROM comparisons)")[0][0]
    assert len(r.text.splitlines()) == stored
    assert client.get("/admin/export", params={"what": "users"}, headers=ADMIN).status_code == 400
    assert client.get("/admin/export").status_code == 401
    parquet = client.get("/admin/export", params={"what": "conversations", "format": "parquet"}, headers=ADMIN)
    assert parquet.status_code == 200 and parquet.content[:4] == b"PAR1"


def test_live_comparison_and_ratings(client, tiny_model_dir, tmp_path):
    from conftest import generation
    from test_engine import make_adapter

    service = client.service
    candidate = service.registry.publish(make_adapter(tiny_model_dir, tmp_path / "live", 6), {"parent": "base"})
    r = client.post("/admin/compare", json={"version": "v404"}, headers=ADMIN)
    assert r.status_code == 404
    r = client.post("/admin/compare", json={"version": service.engine.active_version}, headers=ADMIN)
    assert r.status_code == 400 and "already what serves" in r.json()["error"]["message"]
    r = client.post("/admin/compare", json={"version": candidate}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["live_comparison"] == candidate
    store, conv = service.store, service.store.new_conversation("rater", "compare")
    ctx = [{"role": "user", "content": "rate us"}]
    for i in range(6):  # the candidate wins 5 of 6 blind votes
        a = store.record_exchange(conv, generation(ctx, f"cand {i}", adapter=candidate))
        b = store.record_exchange(conv, generation(ctx, f"active {i}", adapter=service.engine.active_version))
        store.record_comparison(a, b, "a" if i else "b", f"rater{i}")
    ratings = client.get("/admin/ratings", headers=ADMIN).json()
    assert ratings["live_comparison"] == candidate
    best = ratings["ratings"][0]
    assert best["version"] == candidate and best["votes"] >= 6 and best["low"] <= best["rating"] <= best["high"]
    liked = {r["version"]: r for r in ratings["liked_by_version"]}
    assert liked["base"]["gate"] == "the base model"
    assert candidate not in liked  # published by hand, never served, no run: no share and no verdict
    assert client.post("/admin/compare", json={"version": None}, headers=ADMIN).json()["live_comparison"] is None


def test_local_mode_binds_only_loopback(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "CHATLOOP_ADMIN_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "chatloop.cli", "serve", "--local", "--host", "0.0.0.0",
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "only binds to loopback" in r.stderr


def test_only_an_operator_may_ask_for_a_candidate_that_never_served(client, tiny_model_dir, tmp_path):
    """A rejected candidate (or one a failed run left on disk) is not for the public: an
    anonymous ``chatloop_adapter`` naming it is refused like an unknown version; an operator may;
    once it has served, anyone may ask for it again."""
    from test_engine import make_adapter

    service = client.service
    version = service.registry.publish(make_adapter(tiny_model_dir, tmp_path / "unserved", 7), {"parent": "base"})
    r = chat(client, chatloop_adapter=version, user="curious")
    assert r.status_code == 400 and "unknown adapter" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", headers=ADMIN,
                    json={"messages": HI, "max_tokens": 3, "chatloop_adapter": version, "user": "op"})
    assert r.status_code == 200 and r.json()["chatloop_adapter"] == version
    before = service.engine.active_version
    assert client.post(f"/admin/adapters/{version}/activate", headers=ADMIN).status_code == 200
    client.post("/admin/rollback", headers=ADMIN)
    assert service.engine.active_version == before
    assert chat(client, chatloop_adapter=version, user="curious").status_code == 200


@pytest.mark.parametrize("name", ["v" + "9" * 300, "v0", "v01", "v1/../../x"])
def test_odd_version_names_are_unknown_not_a_server_error(client, name):
    r = client.post(f"/admin/adapters/{name}/activate", headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] is None
    assert chat(client, chatloop_adapter=name, user="odd").status_code == 400
