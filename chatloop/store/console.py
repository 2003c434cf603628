"""The read-only SQL console: one read statement, with row, byte and time limits.

Owns: ``SqlConsole`` and ``SqlResult``. Invariants: only SELECT/EXPLAIN statements, and no
writing node or sequence function inside them (a DELETE ... RETURNING in a CTE is a SELECT to
DuckDB); the statement runs in a transaction that is always rolled back.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import duckdb

from chatloop.store.records import SqlRefused

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
# query nodes a read may contain (a DELETE/INSERT/UPDATE ... RETURNING inside a CTE is a SELECT
# statement to DuckDB, but its parse tree names the writing node), and functions that change state
# outside the transaction that the console rolls back
_READ_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
_STATEFUL_FUNCTIONS = {"nextval", "setval", "currval"}
_EXPLAIN = re.compile(r"^\s*EXPLAIN(\s+ANALY[SZ]E)?\s+", re.IGNORECASE)


@dataclass(frozen=True)
class SqlResult:
    columns: list[str]
    rows: list[tuple]
    truncated: bool


class SqlConsole:
    # ---- read-only SQL console ---------------------------------------------------------------
    def query_readonly(self, sql: str, max_rows: int = 1000, timeout_s: float = 10.0,
                       max_bytes: int = 8 << 20) -> SqlResult:
        """Run one read statement (SELECT, WITH ... SELECT, EXPLAIN) with row, byte and time
        limits. Rows stop at ``max_rows`` or once their text passes ``max_bytes`` (truncated)."""
        if not sql or not sql.strip():
            raise SqlRefused("empty query")
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise SqlRefused(f"cannot parse query: {exc}") from None
        if len(statements) != 1:
            raise SqlRefused("exactly one statement per query, please")
        kind = statements[0].type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise SqlRefused(f"only read statements are allowed (got {kind})")
        with self._lock:
            cur = self._con.cursor()
        timer = threading.Timer(timeout_s, cur.interrupt)
        timer.start()
        try:
            _refuse_writes_inside(cur, sql)
            # A transaction that is rolled back: even if a read statement had side effects, none stay.
            cur.execute("BEGIN TRANSACTION")
            try:
                res = cur.execute(sql)
                cols = [d[0] for d in res.description] if res.description else []
                rows, size, truncated = [], 0, False
                while len(rows) <= max_rows and not truncated:
                    chunk = res.fetchmany(min(256, max_rows + 1 - len(rows)))
                    if not chunk:
                        break
                    for row in chunk:
                        size += sum(len(v) if isinstance(v, (str, bytes)) else 16 for v in row)
                        if size > max_bytes and rows:
                            truncated = True
                            break
                        rows.append(row)
            finally:
                cur.execute("ROLLBACK")
        except duckdb.InterruptException:
            raise SqlRefused(f"query interrupted after the {timeout_s:g} s time limit") from None
        except duckdb.Error as exc:
            raise SqlRefused(str(exc).splitlines()[0]) from None
        finally:
            timer.cancel()
            cur.close()
        truncated = truncated or len(rows) > max_rows
        return SqlResult(columns=cols, rows=rows[:max_rows], truncated=truncated)


def _refuse_writes_inside(cur: Any, sql: str) -> None:
    """Refuse a read statement whose parse tree holds a write (``WITH x AS (DELETE ... RETURNING
    *) SELECT ...``) or a sequence function: the console must not rely on its rollback alone."""
    inner = _EXPLAIN.sub("", sql, count=1)
    tree = json.loads(cur.execute("SELECT json_serialize_sql(?)", [inner]).fetchone()[0])
    if tree.get("error"):  # e.g. DESCRIBE/SUMMARIZE of a table parse as SELECT; others do not
        raise SqlRefused(f"only read statements are allowed ({tree.get('error_message', 'not a query')})")
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and kind.endswith("_NODE") and kind not in _READ_NODES:
                raise SqlRefused(f"only read statements are allowed (the query holds a {kind.removesuffix('_QUERY_NODE').removesuffix('_NODE')})")
            if node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in _STATEFUL_FUNCTIONS:
                raise SqlRefused(f"only read statements are allowed ({node['function_name']} changes a sequence)")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
