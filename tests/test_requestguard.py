"""How requests may arrive (issue 19, item 7): a body over the cap is refused unread, a slow head
or body is cut off, and wrong operator tokens earn a back-off. The timeouts are tried against a
real `chatloop serve` through raw sockets, the way a slow client holds a connection."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from chatloop.config import Limits
from chatloop.ratelimit import FailureBackoff, RateLimited
from conftest import ADMIN_TOKEN, api_client, start_server, stop_server

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with api_client(tiny_model_dir, tmp_path_factory.mktemp("guard"),
                    limits=Limits(max_body_bytes=64 << 10, max_import_bytes=1 << 20)) as c:
        yield c


def test_a_body_over_the_cap_is_refused_and_nothing_is_written(client):
    big = {"messages": [{"role": "user", "content": "hi"}], "user": "big", "padding": "x" * (100 << 10)}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the cap holds for a chunked body too
        yield b'{"messages": [{"role": "user", "content": "hi"}], "user": "chunked", "padding": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    count = client.post("/admin/sql", headers=ADMIN, json={"sql": "SELECT count(*) FROM conversations"})
    assert count.json()["rows"] == [[0]]
    ok = client.post("/v1/chat/completions", json={**big, "padding": "x" * 1000, "max_tokens": 2})
    assert ok.status_code == 200


def test_only_an_operator_may_send_a_large_import(client):
    line = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"})
    data = ((line + "\n") * 1000).encode()  # ~90 kB: over the chat cap, under the import cap
    assert client.post("/admin/import/hh", content=data).status_code == 413  # no token: the small cap
    r = client.post("/admin/import/hh", content=data, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 413
    r = client.post("/admin/import/hh?limit=3", content=data, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert client.post("/admin/import/hh", content=data * 20, headers=ADMIN).status_code == 413


def test_wrong_operator_tokens_earn_a_back_off_per_address():
    now = [0.0]
    backoff = FailureBackoff(free=3, clock=lambda: now[0])
    for _ in range(3):
        backoff.check("a")
        backoff.failed("a")
    with pytest.raises(RateLimited) as waited:
        backoff.check("a")
    assert waited.value.retry_after == pytest.approx(1.0)
    backoff.check("b")  # another address is not affected
    now[0] += 1.1
    backoff.check("a")
    backoff.failed("a")
    with pytest.raises(RateLimited) as waited:
        backoff.check("a")
    assert waited.value.retry_after == pytest.approx(2.0)  # doubles
    now[0] += 2.1
    backoff.succeeded("a")
    backoff.check("a")


def test_the_api_refuses_even_the_right_token_while_an_address_waits(client):
    for _ in range(5):
        assert client.get("/admin/status", headers={"Authorization": "Bearer guess"}).status_code == 403
    r = client.get("/admin/status", headers={"Authorization": "Bearer guess"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert client.get("/admin/status", headers=ADMIN).status_code == 429
    client.service.signin_backoff.succeeded("testclient")  # as the wait running out would
    assert client.get("/admin/status", headers=ADMIN).status_code == 200


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("slow")
    server = start_server(d / "data", str(tiny_model_dir), {"CHATLOOP_LIMITS__REQUEST_READ_TIMEOUT_S": "1.5"})
    yield server
    stop_server(server)


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        out += data
    return out


def test_a_half_sent_head_is_cut_off(slow_server):
    sock = _connect(slow_server.url)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    t0 = time.monotonic()
    assert _read_all(sock) == b""  # closed, no answer to a request that never was whole
    assert 1.0 < time.monotonic() - t0 < 8
    sock.close()
    assert httpx.get(slow_server.url + "/healthz").status_code == 200


def test_a_half_sent_body_gets_408(slow_server):
    sock = _connect(slow_server.url)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 500\r\n\r\n{\"messages\": [")
    t0 = time.monotonic()
    answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert 1.0 < time.monotonic() - t0 < 8
    sock.close()


def test_a_keep_alive_connection_still_serves_requests_in_a_row(slow_server):
    with httpx.Client(base_url=slow_server.url) as http:
        for _ in range(3):
            assert http.get("/healthz").status_code == 200
            time.sleep(0.5)
