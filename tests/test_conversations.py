"""A user's own conversations: the list, the current branch with retries as alternatives and
edits as branches, ratings shown after a reload, and soft deletion that keeps the rows but never
trains on them again; through the store, the service's view and the HTTP API."""

from __future__ import annotations

import pytest

from chatloop import prefs
from chatloop.conversations import assistant_turn, current_branch, pick, set_rating, with_alternative
from chatloop.store import Forbidden, NotFound
from chatloop.store.conversations import title_of
from conftest import ADMIN_TOKEN, api_client, log_reply

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def branched_conversation(store, user="ui:alice"):
    """hi -> (hello | hey there) -> 'tell me more' -> more; then 'tell me more' edited to 'why?'."""
    conv = store.new_conversation(user, "ui")
    first = log_reply(store, conv, [u("hi")], "hello")
    retry = log_reply(store, conv, [u("hi")], "hey there")  # the retry, shown from now on
    more = log_reply(store, conv, [u("hi"), a("hey there"), u("tell me more")], "more")
    edited = log_reply(store, conv, [u("hi"), a("hey there"), u("why?")], "because")
    return conv, dict(first=first, retry=retry, more=more, edited=edited)


def test_the_current_branch_follows_the_latest_reply_with_the_alternatives_at_each_reply(store):
    conv, ids = branched_conversation(store)
    store.record_feedback(ids["first"], "ui:alice", -1, reason="wrong", comment="not a greeting", shown_only=True)
    store.record_feedback(ids["retry"], "ui:alice", 1, shown_only=True)
    turns = current_branch(store.conversation_replies(conv, "ui:alice"))
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", "hi"), ("assistant", "hey there"), ("user", "why?"), ("assistant", "because")]
    greeting = turns[1]
    assert [x["message_id"] for x in greeting["alternatives"]] == [ids["first"], ids["retry"]]
    assert greeting["pick"] == 1 and greeting["message_id"] == ids["retry"] and greeting["rating"] == 1
    assert (greeting["alternatives"][0]["rating"], greeting["alternatives"][0]["reason"],
            greeting["alternatives"][0]["comment"]) == (-1, "wrong", "not a greeting")
    # the edited branch is current; the old one ("tell me more" -> "more") is still in the log
    assert turns[3]["message_id"] == ids["edited"] and len(turns[3]["alternatives"]) == 1
    assert ids["more"] in {r["message_id"] for r in store.conversation_replies(conv, "ui:alice")}
    # the two replies to "hi", rated both ways, are a training pair
    pair = [p for p in prefs.build_pairs(store).pairs if p.prompt == [u("hi")]]
    assert [(p.chosen, p.rejected) for p in pair] == [("hey there", "hello")]


def test_choosing_and_rating_an_alternative_keeps_the_turn_consistent():
    r1 = {"message_id": "m1", "content": "one", "adapter": "base", "rating": None, "reason": None, "comment": None}
    r2 = dict(r1, message_id="m2", content="two")
    turn = with_alternative(assistant_turn([r1]), r2)
    assert (turn["pick"], turn["message_id"], turn["content"]) == (1, "m2", "two")
    first = set_rating(pick(turn, 0), -1, "wrong", "no")
    assert (first["message_id"], first["rating"], first["reason"]) == ("m1", -1, "wrong")
    assert pick(first, 1)["rating"] is None and pick(pick(first, 1), 0)["rating"] == -1
    with pytest.raises(IndexError):
        pick(turn, 2)


def test_a_context_the_log_has_no_reply_for_is_shown_but_cannot_be_rated(store):
    conv = store.new_conversation("api:bob", "api")
    log_reply(store, conv, [u("hi"), a("made up by the client"), u("and?")], "fine")
    turns = current_branch(store.conversation_replies(conv, "api:bob"))
    assert turns[1] == {"role": "assistant", "content": "made up by the client"}
    assert turns[3]["content"] == "fine" and "message_id" in turns[3]


def test_the_list_is_the_users_own_newest_first_titled_by_the_first_message(store):
    old, _ = branched_conversation(store)
    new = store.new_conversation("ui:alice", "ui")
    log_reply(store, new, [u("  Write   me a haiku about the sea, please, with a twist at the end of it all")], "waves")
    store.new_conversation("ui:alice", "ui")  # no reply yet: not listed
    other = store.new_conversation("ui:mallory", "ui")
    log_reply(store, other, [u("mine")], "yours")
    listed = store.user_conversations("ui:alice")
    assert [c["id"] for c in listed] == [new, old]
    assert listed[0]["title"].startswith("Write me a haiku about the sea") and listed[0]["title"].endswith("…")
    assert len(listed[0]["title"]) == 60 and listed[1]["title"] == "hi" and listed[1]["replies"] == 4
    assert store.user_conversations("ui:alice", exclude_sources=("ui",)) == []
    assert title_of("Explain **this**:\n```python\nprint('x')\n```") == "Explain this : print('x')"
    with pytest.raises(Forbidden):
        store.conversation_replies(other, "ui:alice")


def test_a_deleted_conversation_is_hidden_kept_and_never_trains_again(store):
    conv, ids = branched_conversation(store)
    store.record_feedback(ids["first"], "ui:alice", -1, shown_only=True)
    store.record_feedback(ids["retry"], "ui:alice", 1, shown_only=True)
    keep = store.new_conversation("ui:alice", "ui")
    kept = log_reply(store, keep, [u("other")], "reply")
    store.record_feedback(kept, "ui:alice", 1, shown_only=True)
    assert prefs.build_pairs(store).pairs and store.feedback_count() == 3
    with pytest.raises(Forbidden):
        store.delete_conversation(conv, "ui:mallory")
    store.delete_conversation(conv, "ui:alice")
    assert [c["id"] for c in store.user_conversations("ui:alice")] == [keep]
    with pytest.raises(NotFound, match="deleted"):
        store.conversation_replies(conv, "ui:alice")
    with pytest.raises(NotFound, match="deleted"):
        store.conversation_owner(conv)  # so it cannot be continued either
    # kept in the log, marked, for operators ...
    def sql(q):
        return [list(r) for r in store.query_readonly(q).rows]

    assert sql(f"SELECT deleted_at IS NOT NULL FROM conversations WHERE id = '{conv}'") == [[True]]
    assert sql("SELECT count(*) FROM feedback_events") == [[3]]
    # ... and left out of everything that trains or counts toward training
    assert prefs.build_pairs(store).pairs == []
    assert [t["message_id"] for t in store.latest_thumbs()] == [kept]
    assert store.feedback_count() == 1
    assert [c for _, c in store.distinct_contexts()] == [[u("other")]]


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with api_client(tiny_model_dir, tmp_path_factory.mktemp("conversations")) as c:
        yield c


def test_the_conversation_routes_list_show_and_delete_only_the_callers_own(client):
    body = {"messages": [u("hi")], "max_tokens": 4, "user": "carol"}
    first = client.post("/v1/chat/completions", json=body).json()
    conv = first["chatloop_conversation_id"]
    again = client.post("/v1/chat/completions", json={**body, "chatloop_conversation_id": conv}).json()
    listed = client.get("/v1/conversations", params={"user": "carol"}).json()["data"]
    assert [(c["id"], c["title"], c["replies"]) for c in listed] == [(conv, "hi", 2)]
    shown = client.get(f"/v1/conversations/{conv}", params={"user": "carol"}).json()["messages"]
    assert [x["message_id"] for x in shown[1]["alternatives"]] == [first["id"], again["id"]]
    # another user can neither read nor delete it
    assert client.get(f"/v1/conversations/{conv}", params={"user": "dave"}).status_code == 403
    assert client.delete(f"/v1/conversations/{conv}", params={"user": "dave"}).status_code == 403
    assert client.get("/v1/conversations", params={"user": "dave"}).json()["data"] == []
    assert client.delete(f"/v1/conversations/{conv}", params={"user": "carol"}).json() == {"id": conv, "deleted": True}
    assert client.get("/v1/conversations", params={"user": "carol"}).json()["data"] == []
    gone = client.get(f"/v1/conversations/{conv}", params={"user": "carol"})
    assert gone.status_code == 404 and "deleted" in gone.json()["error"]["message"]
    cont = client.post("/v1/chat/completions", json={**body, "chatloop_conversation_id": conv})
    assert cont.status_code == 404
    rows = client.post("/admin/sql", json={"sql": f"SELECT count(*) FROM messages WHERE conversation_id = '{conv}'"},
                       headers=ADMIN).json()["rows"]
    assert rows == [[4]]  # two exchanges, kept in the log
    assert client.get("/v1/conversations/conv-nope", params={"user": "carol"}).status_code == 404


@pytest.mark.parametrize("conversation_id", ["'; DROP TABLE messages; --", "x" * 4000, "..%2F..%2Fdata", "%00",
                                             "\u202eevil", "conv-" + "0" * 20])
@pytest.mark.parametrize("user", [None, "mallory", "x" * 500, "\x07"])
def test_odd_conversation_ids_and_users_get_a_4xx_and_change_nothing(client, conversation_id, user):
    params = {} if user is None else {"user": user}
    before = client.post("/admin/sql", json={"sql": "SELECT count(*) FROM conversations WHERE deleted_at IS NULL"},
                         headers=ADMIN).json()["rows"]
    for method in (client.get, client.delete):
        r = method(f"/v1/conversations/{conversation_id}", params=params)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (r.status_code, r.text)
    r = client.get("/v1/conversations", params={**params, "limit": 10**9})
    assert r.status_code in (400, 422), r.text
    after = client.post("/admin/sql", json={"sql": "SELECT count(*) FROM conversations WHERE deleted_at IS NULL"},
                        headers=ADMIN).json()["rows"]
    assert after == before
