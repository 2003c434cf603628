"""The DuckDB log: schema migrations, atomic writes, append-only feedback, the read-only console."""

from __future__ import annotations

import duckdb
import pytest

from chatloop.store import MIGRATIONS, NotFound, SqlRefused, Store, StoreError
from conftest import generation as rec


CTX = [{"role": "user", "content": "hi"}]


def test_migrations_are_recorded_and_idempotent(tmp_path):
    s = Store(tmp_path / "x.duckdb")
    assert s.schema_version() == len(MIGRATIONS)
    s.close()
    s = Store(tmp_path / "x.duckdb")  # reopening applies nothing twice
    assert s._all("SELECT count(*) FROM schema_migrations")[0][0] == len(MIGRATIONS)
    s.close()


def test_exchange_is_recorded_with_its_adapter_and_survives_reopen(tmp_path):
    s = Store(tmp_path / "x.duckdb")
    conv = s.new_conversation("u1", "api")
    mid = s.record_exchange(conv, rec(CTX, "hello!", adapter="v3"))
    s.close()
    s = Store(tmp_path / "x.duckdb")
    msg = s.assistant_message(mid)
    assert msg["content"] == "hello!" and msg["adapter_version"] == "v3" and msg["user_id"] == "u1"
    assert s._all("SELECT role FROM messages ORDER BY role") == [("assistant",), ("user",)]
    s.close()


def test_a_failing_exchange_writes_nothing(store):
    conv = store.new_conversation("u1", "api")
    mid = store.record_exchange(conv, rec(CTX))
    with pytest.raises(duckdb.Error):  # same message id again: the generation insert fails
        store.record_exchange(conv, rec(CTX), message_id=mid)
    assert store._all("SELECT count(*) FROM messages")[0][0] == 2  # the first exchange only


def test_feedback_is_append_only_and_latest_vote_counts(store):
    conv = store.new_conversation("u1", "api")
    mid = store.record_exchange(conv, rec(CTX))
    store.record_feedback(mid, "u1", 1, reason="helpful")
    store.record_feedback(mid, "u1", -1, reason="wrong")
    store.record_feedback(mid, "u2", 1)
    assert store._all("SELECT count(*) FROM feedback_events")[0][0] == 3
    latest = {(r["user_id"], r["rating"], r["reason"]) for r in store.latest_thumbs()}
    assert latest == {("u1", -1, "wrong"), ("u2", 1, None)}


def test_bad_feedback_and_comparisons_are_refused(store):
    conv = store.new_conversation("u1", "api")
    a = store.record_exchange(conv, rec(CTX, "one"))
    b = store.record_exchange(conv, rec(CTX, "two"))
    other = store.record_exchange(conv, rec([{"role": "user", "content": "different"}], "three"))
    with pytest.raises(NotFound):
        store.record_feedback("msg-nope", "u1", 1)
    with pytest.raises(StoreError):
        store.record_feedback(a, "u1", 2)
    with pytest.raises(StoreError, match="same context"):
        store.record_comparison(a, other, "a", "u1")
    with pytest.raises(StoreError):
        store.record_comparison(a, a, "a", "u1")
    with pytest.raises(StoreError):
        store.record_comparison(a, b, "maybe", "u1")
    with pytest.raises(NotFound):
        store.record_comparison(a, "msg-nope", "a", "u1")
    assert store._all("SELECT (SELECT count(*) FROM feedback_events) + (SELECT count(*) FROM comparisons)")[0][0] == 0
    store.record_comparison(a, b, "b", "u1")
    store.record_comparison(b, a, "tie", "u1")  # same pair, other order: latest counts
    assert [r["choice"] for r in store.latest_comparisons()] == ["tie"]


HOSTILE = [
    ("INSERT INTO users VALUES ('x', 'y', now())", "only read"),
    ("DELETE FROM feedback_events", "only read"),
    ("UPDATE messages SET content = ''", "only read"),
    ("DROP TABLE messages", "only read"),
    ("CREATE TABLE evil AS SELECT 1", "only read"),
    ("COPY messages TO '/tmp/leak.csv'", "only read"),
    ("ATTACH '/tmp/other.duckdb' AS o", "only read"),
    ("INSTALL httpfs", "only read"),
    ("LOAD httpfs", "only read"),
    ("SET enable_external_access = true", "only read"),
    ("PRAGMA database_list", "only read"),
    ("CALL pragma_version()", "only read"),
    ("SELECT 1; DROP TABLE messages", "one statement"),
    ("SELECT * FROM read_csv('/etc/passwd')", "disabled"),
    ("SELECT * FROM read_text('/etc/hostname')", "disabled"),
    ("SELECT * FROM 'https://example.com/x.parquet'", "disabled|not found|extension"),
    ("", "empty"),
    ("SELEC 1", "parse"),
    # writes that DuckDB parses as a SELECT statement, and a sequence the rollback cannot undo
    ("WITH x AS (DELETE FROM messages RETURNING *) SELECT count(*) FROM x", "DELETE"),
    ("SELECT * FROM (WITH y AS (UPDATE messages SET content = 'x' RETURNING id) SELECT * FROM y)", "UPDATE"),
    ("WITH x AS (INSERT INTO schema_version VALUES (99, now(), 'x') RETURNING *) SELECT 1", "INSERT"),
    ("EXPLAIN ANALYZE WITH x AS (DELETE FROM messages RETURNING *) SELECT 1 FROM x", "DELETE"),
    ("SELECT nextval('nope')", "sequence"),
]


@pytest.mark.parametrize("sql, message", HOSTILE)
def test_sql_console_refuses_hostile_queries(store, sql, message):
    with pytest.raises(SqlRefused, match=message):
        store.query_readonly(sql)
    assert store._all("SELECT count(*) FROM messages")[0][0] == 0
    assert store.schema_version() == len(MIGRATIONS)


def test_sql_console_reads_with_row_and_time_limits(store):
    conv = store.new_conversation("u1", "api")
    for i in range(5):
        store.record_exchange(conv, rec(CTX, f"r{i}"))
    res = store.query_readonly("SELECT content FROM messages WHERE role = 'assistant' ORDER BY content", max_rows=3)
    assert res.columns == ["content"] and [r[0] for r in res.rows] == ["r0", "r1", "r2"] and res.truncated
    assert store.query_readonly("DESCRIBE feedback_events").rows
    assert store.query_readonly("WITH t AS (SELECT 1 AS x) SELECT x FROM t").rows == [(1,)]
    with pytest.raises(SqlRefused, match="time limit"):
        store.query_readonly("SELECT count(*) FROM range(10000000000) a", timeout_s=0.5)
    assert store.query_readonly("SELECT 42").rows == [(42,)]  # still usable afterwards
    assert store.query_readonly("EXPLAIN SELECT 1").rows
    assert store.query_readonly("SELECT 1 UNION ALL SELECT 2 ORDER BY 1").rows == [(1,), (2,)]


def test_sql_console_caps_the_bytes_it_returns(store):
    """Under the row cap, a query's text is also capped: 200 rows of 100 kB stop near 1 MB."""
    res = store.query_readonly("SELECT repeat('x', 100000) FROM range(200)", max_rows=1000, max_bytes=1 << 20)
    assert res.truncated and 9 <= len(res.rows) <= 11
    one = store.query_readonly("SELECT repeat('x', 3000000)", max_bytes=1 << 20)
    assert len(one.rows) == 1 and not one.truncated  # a single row is returned whole


def test_feedback_browser_filters_by_kind_version_user_and_date(store):
    from conftest import generation

    conv = store.new_conversation("u1", "ui")
    ctx = [{"role": "user", "content": "hello there"}]
    m1 = store.record_exchange(conv, generation(ctx, "reply one", adapter="v1"))
    m2 = store.record_exchange(conv, generation(ctx, "reply two", adapter="v2"))
    store.record_feedback(m1, "alice", 1, None, None)
    store.record_feedback(m2, "bob", -1, "wrong", None)
    store.record_comparison(m1, m2, "a", "carol")
    assert [r["kind"] for r in store.browse_feedback()] == ["ab", "thumb", "thumb"]
    assert [r["user_id"] for r in store.browse_feedback(kind="up")] == ["alice"]
    down = store.browse_feedback(kind="down")
    assert down[0]["reason"] == "wrong" and down[0]["prompt"] == "hello there" and down[0]["reply"] == "reply two"
    assert {r["user_id"] for r in store.browse_feedback(version="v2")} == {"bob", "carol"}
    assert [r["user_id"] for r in store.browse_feedback(kind="A/B")] == ["carol"]
    assert store.browse_feedback(user="nobody") == []
    assert len(store.browse_feedback(since="2000-01-01")) == 3 and store.browse_feedback(since="2999-01-01") == []
    with pytest.raises(StoreError, match="date"):
        store.browse_feedback(since="yesterday'; DROP TABLE messages; --")
    with pytest.raises(StoreError, match="kind"):
        store.browse_feedback(kind="sideways")
    assert store.version_votes()[0][1:] == ("v1", "v2", "a")
