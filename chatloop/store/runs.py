"""What the operators' machinery records: retraining schedules, training runs, adapters and
their activations, API keys.

Owns: ``RunRecords``. Invariants: a run's JSON fields (metrics, settings, feedback ids) are
stored as JSON text and read back decoded; only the known run fields can be updated.
"""

from __future__ import annotations

import json
from typing import Any

from chatloop.store.records import NotFound, StoreError, _decode_json, now


class RunRecords:
    # ---- retraining schedules ----------------------------------------------------------------
    def add_schedule(self, kind: str, spec: str, algo: str, created_by: str) -> int:
        row = self._one(
            "INSERT INTO schedules (kind, spec, algo, created_at, created_by, feedback_mark)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            [kind, spec, algo, now(), created_by, self.feedback_count()])
        return int(row[0])

    def list_schedules(self) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM schedules ORDER BY id")

    def get_schedule(self, schedule_id: int) -> dict[str, Any]:
        rows = self._dicts("SELECT * FROM schedules WHERE id = ?", [schedule_id])
        if not rows:
            raise NotFound(f"unknown schedule {schedule_id}")
        return rows[0]

    def remove_schedule(self, schedule_id: int) -> None:
        self.get_schedule(schedule_id)
        with self._lock:
            self._con.execute("DELETE FROM schedules WHERE id = ?", [schedule_id])

    def schedule_fired(self, schedule_id: int, run_id: int | None, feedback_mark: int) -> None:
        with self._lock:
            self._con.execute("UPDATE schedules SET last_fired_at = ?, last_run_id = ?, feedback_mark = ?"
                              " WHERE id = ?", [now(), run_id, feedback_mark, schedule_id])

    # ---- training runs and adapters ----------------------------------------------------------
    def start_run(self, algo: str, trigger: str, parent_version: str, settings: dict) -> int:
        row = self._one(
            "INSERT INTO training_runs (algo, trigger, status, started_at, parent_version, settings)"
            " VALUES (?, ?, 'running', ?, ?, ?) RETURNING id",
            [algo, trigger, now(), parent_version, json.dumps(settings)],
        )
        return int(row[0])

    _RUN_FIELDS = {"status", "candidate_version", "snapshot_dir", "n_pairs", "n_eval_pairs",
                   "feedback_ids", "comparison_ids", "metrics", "verdict", "error", "finished_at", "override"}

    def update_run(self, run_id: int, **fields: Any) -> None:
        bad = set(fields) - self._RUN_FIELDS
        if bad:
            raise StoreError(f"unknown run fields {sorted(bad)}")
        cols, vals = [], []
        for k, v in fields.items():
            cols.append(f"{k} = ?")
            vals.append(json.dumps(v) if k in ("feedback_ids", "comparison_ids", "metrics") else v)
        with self._lock:
            self._con.execute(f"UPDATE training_runs SET {', '.join(cols)} WHERE id = ?",
                              vals + [run_id])

    def finish_run(self, run_id: int, status: str, **fields: Any) -> None:
        self.update_run(run_id, status=status, finished_at=now(), **fields)

    def get_run(self, run_id: int) -> dict[str, Any]:
        rows = self._dicts("SELECT * FROM training_runs WHERE id = ?", [run_id])
        if not rows:
            raise NotFound(f"unknown training run {run_id}")
        return _decode_json(rows[0], ("metrics", "settings", "feedback_ids", "comparison_ids"))

    def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._dicts(
            "SELECT id, algo, trigger, status, started_at, finished_at, parent_version,"
            " candidate_version, n_pairs, n_eval_pairs, verdict, override, error"
            " FROM training_runs ORDER BY id DESC LIMIT ?", [limit])
        return rows

    def record_adapter(self, version: str, parent: str, algo: str, run_id: int | None,
                       path: str, metrics: dict) -> None:
        with self._lock:
            self._con.execute(
                "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [version, parent, algo, run_id, path, json.dumps(metrics), now()])

    def record_activation(self, version: str, previous: str, actor: str, reason: str = "") -> None:
        with self._lock:
            self._con.execute(
                "INSERT INTO adapter_activations (version, previous, actor, reason, activated_at)"
                " VALUES (?, ?, ?, ?, ?)", [version, previous, actor, reason, now()])

    def candidate_verdicts(self) -> list[dict[str, Any]]:
        """id, candidate_version, status, verdict (its line) and checks (the structured verdict, JSON)
        of every run that produced a candidate."""
        return self._dicts("SELECT id, candidate_version, status, verdict,"
                           " json_extract(metrics, '$.gate') AS checks"
                           " FROM training_runs WHERE candidate_version IS NOT NULL ORDER BY id")

    def first_activations(self) -> dict[str, Any]:
        """When each version first became the active one."""
        return {v: t for v, t in self._all("SELECT version, min(activated_at) FROM adapter_activations GROUP BY 1")}

    def running_runs(self) -> list[dict[str, Any]]:
        return self._dicts("SELECT id, snapshot_dir FROM training_runs WHERE status = 'running' ORDER BY id")

    def recorded_adapters(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._con.execute("SELECT version FROM adapters").fetchall()}

    def last_activation(self) -> str | None:
        """The version the activation log says serves (None before the first activation)."""
        with self._lock:
            row = self._con.execute("SELECT version FROM adapter_activations ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    # ---- API keys (written by operators, read through chatloop.apikeys) -----------------------
    def add_api_key(self, key_id: str, name: str, secret_sha256: str, chat_per_minute: int | None,
                    feedback_per_minute: int | None, max_pairs: int | None) -> None:
        with self._lock:
            self._con.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
                              [key_id, name, secret_sha256, now(), chat_per_minute, feedback_per_minute, max_pairs])

    def api_keys(self) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM api_keys ORDER BY created_at, id")

    def revoke_api_key(self, key_id: str) -> None:
        with self._lock:
            n = self._con.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
                                  " RETURNING id", [now(), key_id]).fetchall()
        if not n:
            raise NotFound(f"no active API key {key_id!r}")

    def user_caps(self) -> dict[str, int]:
        """Per-user caps on training items that differ from the default: API keys' ``max_pairs``."""
        with self._lock:
            rows = self._con.execute("SELECT id, max_pairs FROM api_keys WHERE max_pairs IS NOT NULL").fetchall()
        return {f"key:{key_id}": int(cap) for key_id, cap in rows}

    def served_versions(self) -> set[str]:
        """Every version that has been made active (by the gate, an operator, a rollback)."""
        with self._lock:
            return {r[0] for r in self._con.execute("SELECT DISTINCT version FROM adapter_activations").fetchall()}
