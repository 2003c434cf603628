"""Per-user rate limits: a token bucket (burst, refill, no limit at 0) and 429 + Retry-After on
chat and feedback through the API, per user and per client address, writing nothing."""

from __future__ import annotations

import pytest

from chatloop.config import Limits
from chatloop.ratelimit import RateLimited, RateLimiter
from conftest import ADMIN_TOKEN, api_client


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_bucket_bursts_refills_and_can_be_off():
    clock = Clock()
    rl = RateLimiter(clock)
    for _ in range(3):
        rl.check("chat", "u1", 3)
    with pytest.raises(RateLimited) as err:
        rl.check("chat", "u1", 3)
    assert err.value.retry_after == pytest.approx(20.0)  # 3/min = one token per 20 s
    rl.check("chat", "u2", 3)  # another user has their own bucket
    rl.check("feedback", "u1", 3)  # and another action too
    clock.t += 20.0
    rl.check("chat", "u1", 3)
    with pytest.raises(RateLimited):
        rl.check("chat", "u1", 3)
    for _ in range(1000):
        rl.check("chat", "u1", 0)  # 0 = no limit


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with api_client(tiny_model_dir, tmp_path_factory.mktemp("ratelimit"),
                    limits=Limits(chat_per_minute=2, feedback_per_minute=3)) as c:
        yield c


def test_api_answers_429_with_retry_after_and_writes_nothing(client):
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "user": "alice"}
    first = client.post("/v1/chat/completions", json=hi)
    assert first.status_code == 200
    assert client.post("/v1/chat/completions", json=hi).status_code == 200
    limited = client.post("/v1/chat/completions", json=hi)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert "per minute" in limited.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json={**hi, "user": "bob"}).status_code == 200
    anonymous = {k: v for k, v in hi.items() if k != "user"}  # keyed by client address
    assert [client.post("/v1/chat/completions", json=anonymous).status_code for _ in range(3)] == [200, 200, 429]
    msg = first.json()["id"]
    codes = [client.post("/v1/feedback", json={"message_id": msg, "rating": 1, "user": "alice"}).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    rows = client.post("/admin/sql", json={"sql": "SELECT count(*) FROM feedback_events"}, headers=admin).json()
    assert rows["rows"] == [[3]]
    gens = client.post("/admin/sql", json={"sql": "SELECT count(*) FROM generations"}, headers=admin).json()
    assert gens["rows"] == [[5]]
