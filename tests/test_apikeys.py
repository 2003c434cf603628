"""Identities that cost something (issue 19, item 4): API keys an operator issues (hashed at rest,
revocable, with their own limits and training cap), a ceiling on new unkeyed identities per
client address, and a service that can require keys."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chatloop import prefs
from chatloop.config import Limits
from conftest import ADMIN_TOKEN, api_client

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with api_client(tiny_model_dir, tmp_path_factory.mktemp("keys"), training={"max_pairs_per_user": 1},
                    limits=Limits(new_identities_per_hour=3)) as c:
        yield c


def rows(client, sql):
    return client.post("/admin/sql", headers=ADMIN, json={"sql": sql}).json()["rows"]


PROMPTS = iter(range(10**6))


def pair(client, headers=None, user=None):
    """Two replies to a new prompt and an A/B vote on them, as ``user`` (or the key in ``headers``)."""
    extra = {"user": user} if user else {}
    msgs = [{"role": "user", "content": f"question {next(PROMPTS)}"}]
    a, b = (client.post("/v1/chat/completions", headers=headers, json={**HI, "messages": msgs, **extra, "seed": s,
                                                                     "temperature": 1.0}) for s in (1, 2))
    if a.status_code != 200:
        return a
    return client.post("/v1/comparisons", headers=headers, json={
        "message_a": a.json()["id"], "message_b": b.json()["id"], "choice": "a", **extra})


def test_a_key_is_its_holders_identity_and_only_its_hash_is_kept(client):
    made = client.post("/admin/keys", headers=ADMIN, json={"name": "acme bot"})
    assert made.status_code == 201
    key, key_id = made.json()["key"], made.json()["id"]
    assert key.startswith(f"clk_{key_id}_")
    auth = {"Authorization": f"Bearer {key}"}
    r = client.post("/v1/chat/completions", headers=auth, json={**HI, "user": "someone-else"})
    assert r.status_code == 200
    owner = rows(client, f"SELECT c.user_id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                         f"WHERE m.id = '{r.json()['id']}'")
    assert owner == [[f"key:{key_id}"]]  # the key, not the self-declared user
    secret = key.split("_", 2)[2]
    stored = rows(client, "SELECT * FROM api_keys")
    assert stored and all(secret not in str(v) for row in stored for v in row)
    # a wrong secret for a real id, a made-up key, and then the revoked key: all refused
    for bad in (f"clk_{key_id}_{'A' * 43}", "clk_deadbeef_" + "B" * 43, "clk_nonsense"):
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {bad}"}, json=HI)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert client.delete(f"/admin/keys/{key_id}", headers=ADMIN).status_code == 200
    assert client.post("/v1/chat/completions", headers=auth, json=HI).status_code == 401
    assert client.delete(f"/admin/keys/{key_id}", headers=ADMIN).status_code == 404
    listed = client.get("/admin/keys", headers=ADMIN).json()["keys"]
    assert [k["revoked"] for k in listed if k["id"] == key_id] == [True]
    assert "key" not in listed[0] and all("secret" not in k for k in listed[0])
    assert client.post("/admin/keys", json={"name": "x"}).status_code == 401  # operators only


def test_a_key_has_its_own_limits(client):
    key = client.post("/admin/keys", headers=ADMIN, json={"name": "slow", "chat_per_minute": 2}).json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    codes = [client.post("/v1/chat/completions", headers=auth, json=HI).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    bad = client.post("/admin/keys", headers=ADMIN, json={"name": "x", "max_pairs": -1})
    assert bad.status_code == 400


def test_made_up_users_hit_the_ceiling_and_their_pairs_stay_capped(client):
    """The issue's attack: with the cap at 1 pair a user, five made-up users from one client got 5
    pairs into training. Now only the ceiling's 3 identities are admitted at all."""
    results = [pair(client, user=f"sock{i}") for i in range(5)]
    assert [r.status_code for r in results] == [200, 200, 200, 429, 429]
    assert "new users from this address" in results[3].json()["error"]["message"]
    assert pair(client, user="sock0").status_code == 200  # a known identity goes on
    pairs = prefs.build_pairs(client.service.store, 1).pairs
    assert len([p for p in pairs if p.user_id.startswith("api:sock")]) == 3
    # an issued key is no new identity, and its own max_pairs replaces the cap of 1
    key = client.post("/admin/keys", headers=ADMIN, json={"name": "trusted rater", "max_pairs": 2}).json()
    auth = {"Authorization": f"Bearer {key['key']}"}
    assert all(pair(client, headers=auth).status_code == 200 for _ in range(3))
    pairs = prefs.build_pairs(client.service.store, 1).pairs
    assert len([p for p in pairs if p.user_id == key["user"]]) == 2


def test_a_service_can_require_keys(tiny_model_dir, tmp_path):
    with api_client(tiny_model_dir, tmp_path, require_api_key=True) as c:
        r = c.post("/v1/chat/completions", json={**HI, "user": "anon"})
        assert r.status_code == 401 and "requires an API key" in r.json()["error"]["message"]
        assert c.post("/v1/chat/completions", headers=ADMIN, json={**HI, "user": "op"}).status_code == 200
        key = c.post("/admin/keys", headers=ADMIN, json={"name": "k"}).json()["key"]
        assert c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=HI).status_code == 200


def test_keys_from_the_cli(tmp_path, tiny_model_dir):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "chatloop.cli", "keys", *args, "--data-dir", str(tmp_path / "d"),
                               "--model", str(tiny_model_dir)], capture_output=True, text=True, timeout=120)

    made = cli("create", "ops laptop", "--max-pairs", "5")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    key_id = key.split("_")[1]
    listed = cli("list")
    assert f"{key_id}\tops laptop\tactive\tdefault\tdefault\t5" in listed.stdout
    assert cli("revoke", key_id).returncode == 0
    assert f"{key_id}\tops laptop\trevoked" in cli("list").stdout
    again = cli("revoke", key_id)
    assert again.returncode != 0 and "no active API key" in again.stderr
