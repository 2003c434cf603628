"""Identity: each browser gets an anonymous id cookie; a user continues only their own
conversations and rates only replies they were shown; foreign and unknown ids are refused."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from chatloop.identity import COOKIE, CookieSigner
from conftest import ADMIN_TOKEN, api_client
from ui.common import browser_user as _browser_user

HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    with api_client(tiny_model_dir, tmp_path_factory.mktemp("identity")) as c:
        yield c.app  # each test opens its own TestClient(s): its own browsers


def test_a_browser_gets_one_id_cookie_and_keeps_it(app):
    with TestClient(app) as browser:
        first = browser.get("/healthz")
        uid = first.cookies.get(COOKIE)
        assert uid and app.state.service.signer.uid_from_cookies({COOKIE: uid})
        assert "httponly" in first.headers["set-cookie"].lower() and "samesite=lax" in first.headers["set-cookie"].lower()
        again = browser.get("/healthz")
        assert COOKIE not in again.cookies and "set-cookie" not in again.headers  # kept, not replaced
    with TestClient(app) as other:
        other.cookies.set(COOKIE, "<script>")  # malformed: ignored and replaced
        r = other.get("/healthz")
        assert r.cookies.get(COOKIE) not in (None, "<script>")


def test_users_rate_only_replies_they_were_shown(app):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(app) as alice, TestClient(app) as bob:
        alice.get("/healthz")
        bob.get("/healthz")
        reply = alice.post("/v1/chat/completions", json=HI).json()
        owner = alice.post("/admin/sql", headers=admin, json={
            "sql": f"SELECT c.user_id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                   f"WHERE m.id = '{reply['id']}'"}).json()["rows"][0][0]
        assert owner == "ui:" + alice.cookies.get(COOKIE).split(".")[0]
        assert alice.post("/v1/feedback", json={"message_id": reply["id"], "rating": 1}).status_code == 200
        foreign = bob.post("/v1/feedback", json={"message_id": reply["id"], "rating": -1})
        assert foreign.status_code == 403 and "you were shown" in foreign.json()["error"]["message"]
        named = bob.post("/v1/feedback", json={"message_id": reply["id"], "rating": -1, "user": "mallory"})
        assert named.status_code == 403
        assert bob.post("/v1/feedback", json={"message_id": "msg-nope", "rating": 1}).status_code == 404
        cont = bob.post("/v1/chat/completions",
                        json={**HI, "chatloop_conversation_id": reply["chatloop_conversation_id"]})
        assert cont.status_code == 403
        assert alice.post("/v1/chat/completions",
                          json={**HI, "chatloop_conversation_id": reply["chatloop_conversation_id"]}).status_code == 200
        assert bob.post("/v1/chat/completions", json={**HI, "chatloop_conversation_id": "conv-nope"}).status_code == 404
        # A/B votes: both replies must have been shown to the voter
        second = alice.post("/v1/chat/completions", json=HI).json()
        vote = {"message_a": reply["id"], "message_b": second["id"], "choice": "a"}
        assert bob.post("/v1/comparisons", json=vote).status_code == 403
        rows = alice.post("/admin/sql", headers=admin, json={
            "sql": "SELECT count(*) FROM feedback_events WHERE rating = -1"}).json()["rows"]
        assert rows == [[0]]


class FakeRequest:
    def __init__(self, cookies):
        self.cookies = cookies


def test_the_ui_user_comes_from_the_signed_cookie():
    signer = CookieSigner(b"s" * 32)
    uid, value = signer.new()
    assert _browser_user(FakeRequest({COOKIE: value}), signer.uid_from_cookies) == f"ui:{uid}"
    assert _browser_user(FakeRequest({COOKIE: "bad value"}), signer.uid_from_cookies).startswith("ui:")
    forged = _browser_user(FakeRequest({COOKIE: uid}), signer.uid_from_cookies)  # the id without its signature
    assert forged.startswith("ui:") and forged != f"ui:{uid}"
    other = CookieSigner(b"t" * 32)  # signed by another server
    assert _browser_user(FakeRequest({COOKIE: value}), other.uid_from_cookies) != f"ui:{uid}"
    read = signer.uid_from_cookies
    assert _browser_user(FakeRequest({COOKIE: "bad value"}), read) != _browser_user(FakeRequest({}), read)


def test_callers_without_user_or_cookie_are_strangers_not_one_shared_user(app):
    """Issue 19: cookieless API callers were all user 'api' and skipped the 'shown to you' check,
    so anyone could overwrite anyone's vote and continue anyone's conversation."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(app) as alice, TestClient(app) as stateless:
        alice.get("/healthz")
        reply = alice.post("/v1/chat/completions", json=HI).json()
        second = alice.post("/v1/chat/completions", json=HI).json()

        def bare(path, body):  # a client that keeps no cookies (curl, a script)
            stateless.cookies.clear()
            return stateless.post(path, json=body)

        thumb = bare("/v1/feedback", {"message_id": reply["id"], "rating": -1})
        assert thumb.status_code == 403 and "you were shown" in thumb.json()["error"]["message"]
        vote = bare("/v1/comparisons", {"message_a": reply["id"], "message_b": second["id"], "choice": "b"})
        assert vote.status_code == 403
        cont = bare("/v1/chat/completions", {**HI, "chatloop_conversation_id": reply["chatloop_conversation_id"]})
        assert cont.status_code == 403
        # two cookieless chats belong to two different new users, and each got its cookie
        first, other = bare("/v1/chat/completions", HI), bare("/v1/chat/completions", HI)
        uids = [r.cookies.get(COOKIE) for r in (first, other)]
        assert all(uids) and uids[0] != uids[1]
        owners = alice.post("/admin/sql", headers=admin, json={
            "sql": "SELECT DISTINCT c.user_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                   f" WHERE m.id IN ('{first.json()['id']}', '{other.json()['id']}')"}).json()["rows"]
        assert sorted(o[0] for o in owners) == sorted(f"ui:{u.split('.')[0]}" for u in uids)
        # a client that keeps the cookie it was given is that user: it may rate its own reply
        stateless.cookies.clear()
        stateless.cookies.set(COOKIE, uids[0])
        assert stateless.post("/v1/feedback", json={"message_id": first.json()["id"], "rating": 1}).status_code == 200
        rows = alice.post("/admin/sql", headers=admin, json={
            "sql": "SELECT count(*) FROM feedback_events WHERE rating = -1 OR user_id = 'api'"}).json()["rows"]
        assert rows == [[0]]
