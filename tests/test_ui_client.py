"""The Chat tab's API as Gradio documents it: ``gradio_client.Client`` against a real server on
loopback chats, retries, rates with a reason and a comment, reopens and deletes a chat, and every
effect is in the log (checked through the operator SQL route)."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402


def admin_sql(server, sql):
    r = httpx.post(server.url + "/admin/sql", json={"sql": sql},
                   headers={"Authorization": f"Bearer {server.token}"}, timeout=10)
    r.raise_for_status()
    body = r.json()
    return [dict(zip(body["columns"], row)) for row in body["rows"]]


def text_of(content):
    """A message's content as text (Gradio sends it as a list of typed parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content


def chatbot_of(result):
    """The Chatbot's messages among an endpoint's outputs (the one update with a feedback value)."""
    found = [o["value"] for o in result if isinstance(o, dict) and "feedback_value" in o]
    assert len(found) == 1, result
    return [{"role": m["role"], "content": text_of(m["content"])} for m in found[0]]


def test_gradio_client_chats_retries_rates_and_manages_chats(live_server):
    client = Client(live_server.url + "/", verbose=False, analytics_enabled=False, download_files=False)
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/send", "/retry", "/rate", "/new_chat", "/open_chat", "/delete_chat"} <= names, names

    refused = client.predict("a bell \x07 rings", 0.7, 8, api_name="/send")  # control characters: refused
    assert refused[0] == "a bell \x07 rings" and chatbot_of(refused) == []  # back in the box, nothing shown
    assert any("⚠️" in str(o) and "control characters" in str(o) for o in refused), refused
    sent = client.predict("Name three rivers.", 0.7, 8, api_name="/send")
    shown = chatbot_of(sent)
    assert [m["role"] for m in shown] == ["user", "assistant"] and shown[0]["content"] == "Name three rivers."
    assert any("model version: base" in str(o) for o in sent), sent
    retried = client.predict(0.7, 8, api_name="/retry")
    assert any("Reply **2 / 2**" in str(o) for o in retried), retried  # the navigator shows both

    replies = admin_sql(live_server, "SELECT m.id, m.conversation_id, g.context_hash, c.user_id FROM messages m "
                                     "JOIN generations g ON g.message_id = m.id "
                                     "JOIN conversations c ON c.id = m.conversation_id ORDER BY m.created_at")
    assert len(replies) == 2 and len({r["context_hash"] for r in replies}) == 1
    assert len({r["conversation_id"] for r in replies}) == 1 and replies[0]["user_id"].startswith("ui:")
    conv, user = replies[0]["conversation_id"], replies[0]["user_id"]

    # rate the shown reply (the retry, chatbot row 1) down, with a reason and a comment
    client.predict(1, "down", "too long", "it rambles", api_name="/rate")
    rows = admin_sql(live_server, "SELECT message_id, rating, reason, comment, user_id FROM feedback_events")
    assert rows == [{"message_id": replies[1]["id"], "rating": -1, "reason": "too long", "comment": "it rambles",
                     "user_id": user}]
    with pytest.raises(Exception, match="not in this conversation"):
        client.predict(7, "up", None, "", api_name="/rate")
    with pytest.raises(Exception, match="up' or 'down"):
        client.predict(1, "sideways", None, "", api_name="/rate")

    # a new chat, then the first one reopened from the list: both replies and the thumb come back
    assert chatbot_of(client.predict(api_name="/new_chat")) == []
    opened = client.predict(conv, api_name="/open_chat")
    assert [m["role"] for m in chatbot_of(opened)] == ["user", "assistant"]
    assert any("Reply **2 / 2**" in str(o) for o in opened), opened
    assert chatbot_of(client.predict("And three lakes?", 0.7, 8, api_name="/send"))[2]["content"] == "And three lakes?"
    assert admin_sql(live_server, "SELECT count(DISTINCT conversation_id) AS n FROM messages") == [{"n": 1}]

    # another session (another user) cannot open it (its list does not offer it, and the service
    # refuses another user's); its owner deletes it and it stays in the log
    with pytest.raises(Exception, match="another user|not in the list of choices"):
        Client(live_server.url + "/", verbose=False, analytics_enabled=False).predict(conv, api_name="/open_chat")
    client.predict(api_name="/delete_chat")
    assert admin_sql(live_server, f"SELECT deleted_at IS NOT NULL AS gone FROM conversations WHERE id = '{conv}'") == [
        {"gone": True}]
    with pytest.raises(Exception, match="deleted|not in the list of choices"):
        client.predict(conv, api_name="/open_chat")
