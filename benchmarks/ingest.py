"""Feedback ingest and dashboard queries, side by side in one run:

1. the store's write path (what every route and the UI call: ``Store.record_feedback``, through
   the group-commit writer), from many threads: acknowledged (committed) events per second and
   acknowledgement latency p50/p99, against single-row autocommit inserts (the old path) on the
   same file;
2. the same through HTTP: ``POST /v1/feedback`` on a real ``chatloop serve`` (default model) from
   32 client threads on the same machine, and a check that every acknowledged event is stored;
3. dashboard queries (votes per adapter, per day, latest down-votes, top users, up-share per
   version) over 1M feedback events: p50/p95 latency.

    python benchmarks/ingest.py [--seconds 10] [--threads 32] [--events 1000000] [--json]

With --json the last line is one JSON object with events_per_s, ack_p99_ms and query_p95_ms
(and the other figures of the table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from _report import print_report
from chatloop.store import GenerationRecord, Store

QUERIES = {
    "votes_per_adapter": """
        SELECT g.adapter_version, count(*) FILTER (WHERE f.rating = 1) AS up,
               count(*) FILTER (WHERE f.rating = -1) AS down
        FROM feedback_events f JOIN generations g ON g.message_id = f.message_id GROUP BY 1 ORDER BY 1""",
    "votes_per_day": """
        SELECT date_trunc('day', created_at) AS day, count(*), avg(rating) FROM feedback_events
        WHERE created_at > now()::TIMESTAMP - INTERVAL 30 DAY GROUP BY 1 ORDER BY 1""",
    "latest_down_votes": """
        SELECT f.created_at, f.user_id, f.reason, m.content FROM feedback_events f
        JOIN messages m ON m.id = f.message_id WHERE f.rating = -1 ORDER BY f.created_at DESC LIMIT 50""",
    "top_users": """
        SELECT user_id, count(*) AS n FROM feedback_events GROUP BY 1 ORDER BY n DESC LIMIT 20""",
    "up_share_by_version_and_reason": """
        SELECT g.adapter_version, f.reason, avg((f.rating + 1) / 2) AS up_share, count(*)
        FROM feedback_events f JOIN generations g ON g.message_id = f.message_id GROUP BY ALL""",
}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def seed_replies(store: Store, n: int) -> list[str]:
    conv = store.new_conversation("bench", "api")
    return [store.record_exchange(conv, GenerationRecord(
        context=[{"role": "user", "content": f"question {i}"}], reply=f"reply {i}", model="m",
        adapter_version=f"v{i % 4}" if i % 5 else "base", settings={}, prompt_tokens=3, completion_tokens=2,
        ttft_ms=1.0, latency_ms=2.0, finish_reason="stop")) for i in range(n)]


def store_path(store: Store, msgs: list[str], seconds: float, threads: int) -> tuple[int, list[float]]:
    lat: list[list[float]] = [[] for _ in range(threads)]
    stop = time.perf_counter() + seconds

    def worker(w: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            store.record_feedback(msgs[(w * 7919 + i) % len(msgs)], f"user{w}", 1 if i % 3 else -1,
                                  "too long" if i % 3 == 0 else None, None)
            lat[w].append((time.perf_counter() - t0) * 1000)
            i += 1

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    flat = [x for xs in lat for x in xs]
    return len(flat), flat


def autocommit_rate(store: Store, msgs: list[str], seconds: float) -> float:
    """The old path: one autocommitted INSERT per event."""
    n, stop = 0, time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        store._one("INSERT INTO feedback_events (message_id, user_id, rating, created_at)"
                   " VALUES (?, 'auto', 1, now()::TIMESTAMP) RETURNING id", [msgs[n % len(msgs)]])
        n += 1
    return n / (time.perf_counter() - t0)


def http_path(seconds: float, clients: int) -> dict[str, float]:
    """A real service on loopback; returns acked/stored counts, rate and latency."""
    data = Path(tempfile.mkdtemp(prefix="chatloop-ingest-http-"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import start_server, stop_server  # the tests' way of starting `chatloop serve`

    server = start_server(data / "data", "default", timeout=300, quick=False,
                          extra_env={"CHATLOOP_LIMITS__FEEDBACK_PER_MINUTE": "0"})  # measure, do not throttle
    try:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                 "user": "bench"}).json()
        lat: list[float] = []
        counts = [0] * clients
        stop = time.perf_counter() + seconds

        def client_thread(c: int) -> None:  # threads with keep-alive clients: httpx's asyncio
            with httpx.Client(base_url=server.url, timeout=30) as client:  # client was the bottleneck
                i = 0
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    r = client.post("/v1/feedback", json={"message_id": reply["id"],
                                                          "rating": 1 if i % 2 else -1, "user": "bench"})
                    if r.status_code == 200:
                        counts[c] += 1
                        lat.append((time.perf_counter() - t0) * 1000)
                    i += 1

        t0 = time.perf_counter()
        ts = [threading.Thread(target=client_thread, args=(c,)) for c in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        acked = sum(counts)
        stored = httpx.post(server.url + "/admin/sql", headers={"Authorization": f"Bearer {server.token}"},
                            json={"sql": "SELECT count(*) FROM feedback_events"}, timeout=30).json()["rows"][0][0]
    finally:
        stop_server(server)
    if not lat:
        raise RuntimeError("no HTTP feedback was acknowledged")
    return {"http_events_per_s": acked / wall, "http_ack_p99_ms": pct(lat, 0.99), "http_acked": acked,
            "http_stored": stored}


def bulk_events(store: Store, msgs: list[str], n: int) -> None:
    """n feedback events spread over 60 days, straight into the table (setup, not measured)."""
    store._con.execute("CREATE TEMP TABLE bench_msgs AS SELECT unnest(?) AS id, generate_subscripts(?, 1) - 1 AS k",
                       [msgs, msgs])
    store._con.execute(
        f"""INSERT INTO feedback_events (message_id, user_id, rating, reason, comment, created_at)
        SELECT b.id, 'u' || (i % 5000), CASE WHEN i % 3 = 0 THEN -1 ELSE 1 END,
               CASE WHEN i % 7 = 0 THEN 'too long' WHEN i % 11 = 0 THEN 'wrong' END, NULL,
               now()::TIMESTAMP - to_seconds((i * 5) % (60 * 86400))
        FROM range({int(n)}) r(i) JOIN bench_msgs b ON b.k = i % {len(msgs)}""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP phase")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bar = tqdm(total=4, desc="ingest benchmark", unit="phase")

    store = Store(Path(tempfile.mkdtemp(prefix="chatloop-ingest-")) / "chatloop.duckdb")
    msgs = seed_replies(store, 1000)
    auto = autocommit_rate(store, msgs, min(args.seconds, 5))
    bar.update()
    g0, w0 = store.write_stats
    t0 = time.perf_counter()
    n, lat = store_path(store, msgs, args.seconds, args.threads)
    rate = n / (time.perf_counter() - t0)
    groups, writes = store.write_stats
    bar.update()

    http = {} if args.no_http else http_path(min(args.seconds, 10), 32)
    bar.update()

    store._con.execute("DELETE FROM feedback_events")
    bulk_events(store, msgs, args.events)
    total = store._one("SELECT count(*) FROM feedback_events")[0]
    qlat: dict[str, list[float]] = {k: [] for k in QUERIES}
    for _ in range(20):
        for name, sql in QUERIES.items():
            t = time.perf_counter()
            store.query_readonly(sql, max_rows=1000)
            qlat[name].append((time.perf_counter() - t) * 1000)
    bar.update()
    bar.close()
    every = [x for xs in qlat.values() for x in xs]
    result: dict[str, object] = {
        "events_per_s": round(rate, 1),
        "ack_p50_ms": round(statistics.median(lat), 2),
        "ack_p99_ms": round(pct(lat, 0.99), 2),
        "threads": args.threads,
        "writes_per_commit": round((writes - w0) / max(groups - g0, 1), 1),
        "autocommit_events_per_s": round(auto, 1),
        "speedup_vs_autocommit": round(rate / auto, 2),
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in http.items()},
        "dashboard_events": total,
        "query_p50_ms": round(statistics.median(every), 2),
        "query_p95_ms": round(pct(every, 0.95), 2),
        **{f"q_{k}_p95_ms": round(pct(v, 0.95), 2) for k, v in qlat.items()},
    }
    store.close()
    print_report(result, args.json)


if __name__ == "__main__":
    main()
