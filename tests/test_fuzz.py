"""Property-based fuzzing of the HTTP API (hypothesis): whatever a client sends to any route,
the answer is never a 5xx, errors are JSON, and the service keeps working afterwards."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatloop.config import GenerationDefaults, Limits
from conftest import ADMIN_TOKEN, api_client

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
texts = st.text(max_size=60)  # includes control characters and lone surrogates
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "", None]),
                                 "content": st.one_of(texts, json_values)})
chat_body = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=4), json_values)}, optional={
    "temperature": scalars, "top_p": scalars, "top_k": scalars, "max_tokens": scalars, "stop": json_values,
    "seed": scalars, "stream": st.booleans(), "user": st.one_of(texts, scalars), "n": scalars,
    "repetition_penalty": scalars, "chatloop_conversation_id": st.one_of(texts, scalars),
    "chatloop_adapter": st.one_of(st.sampled_from(["base", "v1", "../x"]), texts)})
ids = st.one_of(st.sampled_from(["KNOWN"]), texts, scalars)
feedback_body = st.fixed_dictionaries({"message_id": ids, "rating": scalars}, optional={
    "reason": st.one_of(texts, scalars), "comment": st.one_of(texts, scalars), "user": st.one_of(texts, scalars)})
comparison_body = st.fixed_dictionaries({"message_a": ids, "message_b": ids,
                                         "choice": st.one_of(st.sampled_from(["a", "b", "tie", "both_bad"]), texts)})


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with api_client(tiny_model_dir, tmp_path_factory.mktemp("fuzz"), raise_server_exceptions=False,
                    generation=GenerationDefaults(max_tokens=4, max_tokens_limit=8),
                    limits=Limits(chat_per_minute=0, feedback_per_minute=0, sql_timeout_s=2.0)) as c:
        c.known = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json()["id"]
        yield c


def _send(client, path: str, body, headers=None):
    body = json.loads(json.dumps(body).replace('"KNOWN"', json.dumps(client.known))) if body is not None else None
    try:
        payload = json.dumps(body, allow_nan=True)
    except (TypeError, ValueError):
        return
    r = client.post(path, content=payload.encode("utf-8", "surrogatepass"),
                    headers={"content-type": "application/json", **(headers or {})})
    assert r.status_code < 500, (path, body, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert "error" in r.json(), r.text[:300]
    else:
        r.read()


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])


@FUZZ
@given(body=chat_body)
def test_chat_never_fails_with_5xx(client, body):
    _send(client, "/v1/chat/completions", body)


@FUZZ
@given(body=feedback_body)
def test_feedback_never_fails_with_5xx(client, body):
    _send(client, "/v1/feedback", body)


@FUZZ
@given(body=comparison_body)
def test_comparisons_never_fail_with_5xx(client, body):
    _send(client, "/v1/comparisons", body)


@FUZZ
@given(sql=st.one_of(texts, st.sampled_from(["SELECT 1; SELECT 2", "PRAGMA version", "SELECT * FROM messages",
                                             "EXPLAIN SELECT 1", "SUMMARIZE messages", "COPY x TO 'y'"])),
       rows=st.one_of(st.none(), st.integers(-5, 10**9)))
def test_sql_console_never_fails_with_5xx(client, sql, rows):
    _send(client, "/admin/sql", {"sql": sql, "max_rows": rows}, ADMIN)


@FUZZ
@given(body=st.fixed_dictionaries({"kind": st.one_of(st.sampled_from(["cron", "interval", "feedback"]), texts),
                                   "spec": st.one_of(texts, scalars), "algo": st.one_of(texts, scalars)}),
       path=st.sampled_from(["/admin/jobs", "/admin/compare", "/admin/retrain", "/admin/runs/1/override"]))
def test_admin_routes_never_fail_with_5xx(client, body, path):
    _send(client, path, body, ADMIN)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_garbage_bodies_get_a_clear_400(client, raw):
    for path in ("/v1/chat/completions", "/v1/feedback", "/v1/comparisons"):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500 and "error" in r.json(), (path, raw, r.text[:300])


HOSTILE = [  # a fixed battery of the fuzzers' kinds of input, so this test proves something run alone
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 5e-324, "top_k": 1,
                              "seed": 2**63 - 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30}),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": {"nested": [1, [2, [3]]]}}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}], "stop": ["", None]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chatloop_adapter": "../../etc"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "chatloop_conversation_id": "conv-of-someone-else"}),
    ("/v1/feedback", {"message_id": "KNOWN", "rating": float("nan"), "reason": "x" * 10_000}),
    ("/v1/comparisons", {"message_a": "KNOWN", "message_b": "KNOWN", "choice": "\x00"}),
]


def test_still_serving_after_hostile_input(client):
    for path, body in HOSTILE:
        _send(client, path, body)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    fb = client.post("/v1/feedback", json={"message_id": r.json()["id"], "rating": 1})
    assert fb.status_code == 200  # the reply is stored and can be rated: the write path still works


@pytest.mark.parametrize("content, message", [("a\ud800b", "valid Unicode"), ("bell\x07", "control characters")])
def test_text_that_cannot_be_stored_is_refused(client, content, message):
    raw = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    fb = json.dumps({"message_id": client.known, "rating": 1, "reason": content}).encode()
    r = client.post("/v1/feedback", content=fb, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"]
