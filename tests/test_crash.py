"""kill -9 at each phase of a retraining cycle, then a restart (issue 19, item 6): the trainer
child dies with the service, and the restarted service makes the runs, the adapter rows, the
activation log and the registry agree, and says what it did.

The crash points are real SIGKILLs of a real `chatloop serve`: a `sitecustomize` on the server's
path wraps one step of the cycle so that the process kills itself right there."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from chatloop.store import Store
from conftest import ADMIN_TOKEN, generation, start_server, stop_server

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FAST = {"CHATLOOP_TRAINING__GATE_PROMPTS": "0", "CHATLOOP_TRAINING__GATE_REWARD_MODEL": "false"}

# each crash point: the step the server kills itself in, as code for its sitecustomize
CRASH_AT = {
    # published on disk, no adapters row yet
    "publishing": """
        from chatloop.store import Store
        def record_adapter(self, *a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        Store.record_adapter = record_adapter
    """,
    # the registry serves the candidate; the activation is not logged, the run not finished
    "activating": """
        from chatloop.store import Store
        _real = Store.record_activation
        def record_activation(self, version, previous, actor, reason=""):
            if actor == "gate":
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(self, version, previous, actor, reason)
        Store.record_activation = record_activation
    """,
    # everything done but the run's own record
    "finishing": """
        from chatloop.store import Store
        _real = Store.finish_run
        def finish_run(self, run_id, status, **fields):
            if status == "promoted":
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(self, run_id, status, **fields)
        Store.finish_run = finish_run
    """,
}
PROMOTE = """
    import chatloop.evaluate as _ev
    _gate = _ev.gate
    def gate(metrics, t=None):
        _gate(metrics, t)  # the crash is the subject here, not the gate's verdict: always promote
        return _ev.Verdict([_ev.Check("forced", True, "promoted by the crash test")])
    _ev.gate = gate
"""


def seed(data_dir: Path, n: int = 4) -> None:
    store = Store(data_dir / "chatloop.duckdb")
    conv = store.new_conversation("u1", "api")
    for i in range(n):
        ctx = [{"role": "user", "content": f"question {i}"}]
        ids = [store.record_exchange(conv, generation(ctx, t)) for t in (f"A kind answer {i}.", f"Go away {i}.")]
        store.record_comparison(ids[0], ids[1], "a", "u1")
    store.close()


def crashing_env(tmp_path: Path, code: str) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import os, signal\n" + textwrap.dedent(code) + textwrap.dedent(PROMOTE))
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), **FAST}


def wait_dead(proc: subprocess.Popen, timeout: float = 120) -> int:
    return proc.wait(timeout=timeout)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is dead


def restarted(data_dir: Path, model: str) -> tuple:
    server = start_server(data_dir, model, FAST)
    status = httpx.get(server.url + "/admin/status", headers=ADMIN).json()
    runs = httpx.get(server.url + "/admin/runs", headers=ADMIN).json()["runs"]
    return server, status, runs


def sql(server, query: str) -> list:
    return httpx.post(server.url + "/admin/sql", headers=ADMIN, json={"sql": query}).json()["rows"]


def test_killed_while_training_the_trainer_dies_too_and_the_run_is_failed(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    seed(data, 8)
    server = start_server(data, str(tiny_model_dir), {**FAST, "CHATLOOP_TRAINING__EPOCHS": "500",
                                                      "CHATLOOP_TRAINING__EARLY_STOP_PATIENCE": "0"})
    r = httpx.post(server.url + "/admin/retrain", headers=ADMIN, json={"algo": "dpo"})
    assert r.status_code == 202, r.text
    job = data / "runs" / f"run-{r.json()['run_id']}"
    deadline = time.monotonic() + 120
    while not ((job / "child.pid").exists() and (job / "progress.jsonl").exists()):  # the child is training
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    child = int((job / "child.pid").read_text())
    assert pid_alive(child)
    server.proc.send_signal(signal.SIGKILL)
    wait_dead(server.proc)
    deadline = time.monotonic() + 10
    while pid_alive(child):
        assert time.monotonic() < deadline, "the trainer outlived the service"
        time.sleep(0.1)
    server, status, runs = restarted(data, str(tiny_model_dir))
    try:
        assert runs[0]["status"] == "failed" and "stopped" in runs[0]["error"]
        assert any("marked failed" in line for line in status["reconciled_at_startup"])
        assert status["active_adapter"] == "base"
    finally:
        stop_server(server)


@pytest.mark.parametrize("phase", list(CRASH_AT))
def test_killed_in_a_cycle_then_restarted_the_two_truths_agree(phase, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    seed(data)
    server = start_server(data, str(tiny_model_dir), crashing_env(tmp_path, CRASH_AT[phase]))
    try:
        httpx.post(server.url + "/admin/retrain", headers=ADMIN, json={"algo": "dpo", "wait": True}, timeout=300)
    except httpx.HTTPError:
        pass  # the server died under the request: that is the point
    assert wait_dead(server.proc) == -signal.SIGKILL
    assert (data / "adapters" / "v1").is_dir()  # every phase here is after publishing

    server, status, runs = restarted(data, str(tiny_model_dir))
    try:
        run = runs[0]
        assert sql(server, "SELECT version FROM adapters") == [["v1"]]  # the row is there in every case
        assert run["candidate_version"] == "v1"
        said = status["reconciled_at_startup"]
        if phase == "publishing":  # published, never activated: still base, and v1 is no one's but an operator's
            assert status["active_adapter"] == "base" and run["status"] == "failed"
            assert "never activated" in run["error"] and any("never activated" in s for s in said)
            anon = httpx.post(server.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chatloop_adapter": "v1", "user": "x"})
            assert anon.status_code == 400
        else:  # the registry served v1 when the service died: it still does, and the log says so
            assert status["active_adapter"] == "v1" and run["status"] == "promoted"
            log = sql(server, "SELECT version, actor FROM adapter_activations ORDER BY id")
            assert log[-1][0] == "v1" and len(log) == 1
            assert log[-1][1] == ("startup" if phase == "activating" else "gate")
        if phase != "activating":
            return
        # a second restart finds nothing more to repair
        stop_server(server)
        server, status, again = restarted(data, str(tiny_model_dir))
        assert status["reconciled_at_startup"] == [] and again[0] == run
    finally:
        stop_server(server)
