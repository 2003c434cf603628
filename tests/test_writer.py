"""The group-commit writer: concurrent writes share commits, each is acknowledged only after its
commit, a bad write fails alone, and acknowledged feedback survives kill -9 of the service."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from chatloop.store import NotFound
from chatloop.writer import GroupWriter, WriterClosed
from conftest import ADMIN_TOKEN, log_reply, start_server, stop_server


def test_concurrent_thumbs_share_commits_and_every_ack_is_a_row(store):
    conv = store.new_conversation("u", "api")
    msgs = [log_reply(store, conv, [{"role": "user", "content": f"q{i}"}], f"r{i}") for i in range(20)]
    groups0, writes0 = store.write_stats
    acks: list[int] = []
    lock = threading.Lock()

    def rate(worker: int) -> None:
        for i in range(20):
            fid = store.record_feedback(msgs[(worker + i) % 20], f"user{worker}", 1 if i % 2 else -1,
                                        "because" if i % 3 else None, None)
            with lock:
                acks.append(fid)

    threads = [threading.Thread(target=rate, args=(w,)) for w in range(48)]  # groups big enough for
    for t in threads:                                                        # the columnar insert too
        t.start()
    for t in threads:
        t.join()
    assert len(acks) == len(set(acks)) == 960
    assert store._all("SELECT count(*) FROM feedback_events")[0][0] == 960
    assert sorted(r[0] for r in store._all("SELECT id FROM feedback_events")) == sorted(acks)
    groups, writes = store.write_stats
    assert writes - writes0 == 960 and groups - groups0 < 960, "writes should have shared commits"
    assert store._all("SELECT count(DISTINCT user_id) FROM feedback_events")[0][0] == 48
    reasons = store._all("SELECT count(*) FROM feedback_events WHERE reason = 'because'")[0][0]
    assert reasons == 48 * sum(1 for i in range(20) if i % 3)


def test_a_bad_write_fails_alone_in_its_group(store):
    conv = store.new_conversation("u", "api")
    good = log_reply(store, conv, [{"role": "user", "content": "q"}], "r")
    results: dict[str, object] = {}
    barrier = threading.Barrier(9)

    def write(name: str, message: str) -> None:
        barrier.wait()
        try:
            results[name] = store.record_feedback(message, name, 1)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            results[name] = exc

    threads = [threading.Thread(target=write, args=(f"u{i}", good)) for i in range(8)]
    threads.append(threading.Thread(target=write, args=("bad", "msg-does-not-exist")))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["bad"], NotFound)
    assert all(isinstance(results[f"u{i}"], int) for i in range(8))
    assert store._all("SELECT count(*) FROM feedback_events")[0][0] == 8


def test_a_group_whose_transaction_fails_is_retried_one_write_at_a_time(store):
    from chatloop.store import _Statements, _Thumb

    conv = store.new_conversation("owner", "api")
    msg = log_reply(store, conv, [{"role": "user", "content": "q"}], "r")
    broken = _Statements([("INSERT INTO no_such_table VALUES (1)", [])], "never")
    results = store._apply_group([_Thumb(msg, "a", 1, None, None), broken, _Thumb(msg, "b", -1, None, None)])
    assert isinstance(results[0], int) and isinstance(results[2], int)
    assert isinstance(results[1], Exception) and "no_such_table" in str(results[1])
    assert store._all("SELECT user_id, rating FROM feedback_events ORDER BY id") == [("a", 1), ("b", -1)]


def test_the_writer_delivers_each_writes_own_result_or_error_and_refuses_after_close():
    """Writes queued while the writer is busy form one group; each hears its own result or error,
    and a group the store could not apply at all fails every write in it with that error."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    calls: list[list[str]] = []
    busy, release = threading.Event(), threading.Event()

    def apply(ops):
        calls.append(list(ops))
        if ops == ["hold"]:
            busy.set()
            assert release.wait(10)
        if "store down" in ops:
            raise RuntimeError("the store could not apply the group")
        return [ValueError("boom") if op == "boom" else op.upper() for op in ops]

    def queued(writer, n_before: int) -> None:  # until the writer's queue holds n_before writes
        deadline = time.monotonic() + 10
        while writer._queue.qsize() < n_before and time.monotonic() < deadline:
            time.sleep(0.005)

    writer = GroupWriter(apply)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(writer.submit, "hold")
            assert busy.wait(10)
            futures = []
            for op in ("a", "boom", "b"):  # one at a time, so the group keeps this order
                futures.append(pool.submit(writer.submit, op))
                queued(writer, len(futures))
            release.set()
            assert first.result(10) == "HOLD"
            assert futures[0].result(10) == "A" and futures[2].result(10) == "B"
            with pytest.raises(ValueError, match="boom"):
                futures[1].result(10)
        assert calls[:2] == [["hold"], ["a", "boom", "b"]]  # the three shared one commit
        busy.clear(), release.clear()
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(writer.submit, "hold")
            assert busy.wait(10)
            both = [pool.submit(writer.submit, "c")]
            queued(writer, 1)
            both.append(pool.submit(writer.submit, "store down"))
            queued(writer, 2)
            release.set()
            first.result(10)
            for f in both:
                with pytest.raises(RuntimeError, match="could not apply"):
                    f.result(10)
        assert calls[-1] == ["c", "store down"]
    finally:
        release.set()
        writer.close()
    with pytest.raises(WriterClosed):
        writer.submit("late")


def test_acknowledged_feedback_survives_kill_9(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    server = start_server(data, str(tiny_model_dir))
    acked = 0
    try:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                                 "user": "rater"}).json()
        for i in range(60):
            r = httpx.post(server.url + "/v1/feedback", timeout=30,
                           json={"message_id": reply["id"], "rating": 1 if i % 2 else -1, "user": "rater"})
            assert r.status_code == 200, r.text
            acked += 1
        os.kill(server.proc.pid, signal.SIGKILL)  # no shutdown hook runs
        server.proc.wait(30)
    finally:
        if server.proc.poll() is None:
            stop_server(server)
    server = start_server(data, str(tiny_model_dir))
    try:
        r = httpx.post(server.url + "/admin/sql", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                       json={"sql": "SELECT count(*) FROM feedback_events"}, timeout=30)
        assert r.json()["rows"] == [[acked]]
        r = httpx.post(server.url + "/admin/sql", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                       json={"sql": "SELECT count(*) FROM generations"}, timeout=30)
        assert r.json()["rows"] == [[1]]
    finally:
        stop_server(server)


def test_a_big_group_takes_the_columnar_path_with_the_same_result(store):
    from chatloop.store import _Thumb

    conv = store.new_conversation("owner", "api")
    msg = log_reply(store, conv, [{"role": "user", "content": "q"}], "r")
    ops = [_Thumb(msg, f"u{i}" if i % 2 else None, 1 if i % 3 else -1, "why" if i % 4 == 0 else None, None)
           for i in range(40)] + [_Thumb("msg-missing", "x", 1, None, None)]
    results = store._apply_group(ops)
    assert isinstance(results[-1], NotFound)
    ids = results[:-1]
    rows = store._all("SELECT id, user_id, rating, reason FROM feedback_events ORDER BY id")
    assert [r[0] for r in rows] == ids
    assert [(r[1], r[2], r[3]) for r in rows] == [
        (f"u{i}" if i % 2 else "owner", 1 if i % 3 else -1, "why" if i % 4 == 0 else None) for i in range(40)]
