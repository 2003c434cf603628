"""One retraining cycle: snapshot -> train (child process) -> gate -> publish -> activate.

Owns: the cycle's steps and their order, the one-cycle-at-a-time rule, cancellation, and the
training-run record of every attempt (refused, failed, rejected or promoted).

Invariants:
- One cycle at a time per process, whatever triggered it: a second trigger raises CycleBusy.
- The child process trains from files; it never opens the database. The adapter it writes is
  published into the registry atomically (see ``adapters``) before anything activates it.
- A failure at any step marks the run failed with the error and leaves serving untouched.
- The reference/parent is the version active when the snapshot is taken; a candidate is never
  promoted over another version that became active while it trained (check ``replaces``).
- With ``gate_live_votes`` a candidate that passes is *staged* (served on one side of the
  Compare tab) and promoted only by ``settle_live_comparisons`` once users' votes are in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chatloop import evaluate, prefs
from chatloop.adapters import BASE_VERSION, AdapterRegistry
from chatloop.algorithms import Algorithm
from chatloop.algorithms import parse as parse_algorithm
from chatloop.config import Settings
from chatloop.errors import ChatloopError, Conflict
from chatloop.reconcile import CHILD_PID_FILE
from chatloop.run_status import RunStatus
from chatloop.store import Store

log = logging.getLogger(__name__)

LIVE_CHECK = "live_ab"  # the gate's last check for a staged candidate: users' blind A/B votes


def _live_score(vote: tuple[str, str, str], candidate: str) -> float:
    """The candidate's share of one A/B vote (version a, version b, choice): ties count half."""
    a, b, choice = vote
    if choice in ("tie", "both_bad"):
        return 0.5
    return 1.0 if (a if choice == "a" else b) == candidate else 0.0


class CycleBusy(Conflict, RuntimeError):
    """A retraining cycle is already running."""


class NotEnoughFeedback(ChatloopError, ValueError):
    """The log does not hold enough preference pairs to train on."""
    status, type = 422, "not_enough_feedback"


class TrainingFailed(ChatloopError, RuntimeError):
    """A cycle failed after it started (its run is recorded as failed)."""
    status, type, code = 500, "server_error", "training_failed"


@dataclass
class CycleState:
    run_id: int
    algo: str
    stage: str = "starting"  # snapshot | training | gate | publishing | done
    phase: str = ""  # inside training: the algorithm, "reward model" or "gate reward model"
    step: int = 0
    total: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Activate = Callable[[str, str, str], None]  # (version, actor, reason)


class Retrainer:
    def __init__(self, settings: Settings, store: Store, registry: AdapterRegistry,
                 model_path: str, activate: Activate, active_version: Callable[[], str]):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.model_path = model_path
        self._activate = activate
        self._active_version = active_version
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.current: CycleState | None = None

    # ---- triggers ----------------------------------------------------------------------------
    def run_cycle(self, algo: str = Algorithm.DPO, trigger: str = "cli",
                  on_progress: Callable[[CycleState], None] | None = None) -> dict[str, Any]:
        """Run one cycle to the end in this thread; returns the finished run record."""
        run_id = self._begin(algo, trigger)
        return self._run(run_id, algo, on_progress)

    def start_cycle(self, algo: str = Algorithm.DPO, trigger: str = "api") -> int:
        """Start a cycle in a background thread; returns its run id at once."""
        run_id = self._begin(algo, trigger)
        threading.Thread(target=self._run_quietly, args=(run_id, algo), name=f"cycle-{run_id}",
                         daemon=True).start()
        return run_id

    def cancel(self) -> bool:
        if self.current is None:
            return False
        self._cancel.set()
        return True

    # ---- the cycle ---------------------------------------------------------------------------
    def _begin(self, algo: str, trigger: str) -> int:
        algo = parse_algorithm(algo)
        if not self._lock.acquire(blocking=False):
            busy = self.current.run_id if self.current else "?"
            raise CycleBusy(f"a retraining cycle is already running (run {busy}); try again when it ends")
        try:
            self._cancel.clear()
            settings = dataclasses.asdict(self.settings.training)
            run_id = self.store.start_run(algo, trigger, self._active_version(), settings)
            self.current = CycleState(run_id=run_id, algo=algo)
            return run_id
        except BaseException:
            self._lock.release()
            raise

    def _run_quietly(self, run_id: int, algo: str) -> None:
        try:
            self._run(run_id, algo, None)
        except Exception as exc:  # recorded in the run; the service keeps serving
            log.warning("retraining run %s ended: %s", run_id, exc)

    def _stage(self, stage: str, on_progress) -> None:
        assert self.current is not None
        self.current.stage = stage
        if on_progress:
            on_progress(self.current)

    def _run(self, run_id: int, algo: str, on_progress) -> dict[str, Any]:
        t = self.settings.training
        try:
            parent = self._active_version()
            timings: dict[str, float] = {}
            clock = time.perf_counter()

            def lap(name: str) -> None:
                nonlocal clock
                timings[f"{name}_s"] = round(time.perf_counter() - clock, 3)
                clock = time.perf_counter()

            self._stage("snapshot", on_progress)
            job_dir = self.settings.runs_dir / f"run-{run_id}"
            snap = self._snapshot(algo, job_dir)
            lap("snapshot")
            self.store.update_run(run_id, snapshot_dir=str(job_dir), n_pairs=snap["n_train"],
                                  n_eval_pairs=snap["n_eval"], feedback_ids=snap["feedback_ids"],
                                  comparison_ids=snap["comparison_ids"])
            parent_path = None if parent == BASE_VERSION else str(self.registry.path(parent))
            reuse = self._reusable_reward_model(algo, snap["n_train"])
            job = {"algo": algo, "model_path": self.model_path,
                   "models_dir": str(self.settings.models_dir), "parent_adapter": parent_path,
                   "parent_version": parent, "device": self.settings.device,
                   "dtype": self.settings.dtype, "torch_threads": self.settings.torch_threads,
                   "settings": dataclasses.asdict(t), "reward_model": reuse}
            (job_dir / "job.json").write_text(json.dumps(job, indent=2))

            self._stage("training", on_progress)
            metrics = self._train_in_child(job_dir, on_progress)
            lap("train_and_judge")

            self._stage("gate", on_progress)
            verdict = evaluate.gate(metrics, t)
            serving = self._active_version()
            if serving != parent:  # it was judged against the parent, not against what it would replace
                verdict.add(evaluate.Check("replaces", False, f"{serving} became active while the candidate trained "
                                                              f"from {parent}: it was never compared with {serving}"))
            metrics["gate"] = verdict.as_dict()  # the offline checks, in the adapter's metadata too
            self._stage("publishing", on_progress)
            meta = {"parent": parent, "algo": algo, "run_id": run_id, "settings": job["settings"],
                    "train_pairs": snap["n_train"], "eval_pairs": snap["n_eval"], "capped": snap["capped"],
                    "feedback_ids": snap["feedback_ids"], "comparison_ids": snap["comparison_ids"],
                    "metrics": {k: v for k, v in metrics.items() if k != "history"},
                    "verdict": verdict.summary, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            version = self.registry.publish(job_dir / "adapter", meta)
            self.store.record_adapter(version, parent, algo, run_id,
                                      str(self.registry.path(version)), meta["metrics"])
            staged = verdict.promote and t.gate_live_votes > 0
            if staged:  # the last check is live: users' blind A/B votes against the active version
                self.registry.set_compare_version(version)
                verdict.add(evaluate.Check(LIVE_CHECK, None, f"waiting for {t.gate_live_votes} live A/B votes "
                                                             f"against {parent}", threshold=0.5))
            elif verdict.promote:
                self._activate(version, "gate", verdict.summary)
            lap("publish")
            metrics["timings"] = timings
            metrics["gate"] = verdict.as_dict()
            status = RunStatus.STAGED if staged else RunStatus.PROMOTED if verdict.promote else RunStatus.REJECTED
            self.store.finish_run(run_id, status, candidate_version=version, metrics=metrics,
                                  verdict=verdict.line(status))
            self._stage("done", on_progress)
            return self.store.get_run(run_id)
        except NotEnoughFeedback as exc:
            self.store.finish_run(run_id, RunStatus.REFUSED, error=str(exc))
            raise
        except BaseException as exc:
            self.store.finish_run(run_id, RunStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.current = None
            self._lock.release()

    def settle_live_comparisons(self) -> list[dict[str, Any]]:
        """Decide staged candidates that have their live A/B votes: promote one that won at least
        half of the votes against its parent (ties count half), reject it otherwise. Skipped
        while a cycle runs; a candidate whose parent is no longer active is rejected as stale."""
        need = self.settings.training.gate_live_votes
        staged = [r for r in self.store.list_runs(500) if r["status"] == RunStatus.STAGED]
        if not staged or not self._lock.acquire(blocking=False):
            return []
        try:
            decided = []
            votes = self.store.version_votes()
            for run in staged:
                cand, parent = run["candidate_version"], run["parent_version"]
                between = [(a, b, c) for _, a, b, c in votes if {a, b} == {cand, parent}]
                if self._active_version() != parent:
                    live = evaluate.Check(LIVE_CHECK, False, f"stale: {parent} is no longer active")
                elif len(between) < need:
                    continue
                else:
                    share = sum(_live_score(v, cand) for v in between) / len(between)
                    live = evaluate.Check(LIVE_CHECK, share >= 0.5, f"live A/B: {cand} won {share:.2f} of "
                                                                    f"{len(between)} votes against {parent}", share, 0.5)
                if live.passed:
                    self._activate(cand, "gate", live.render())
                if self.registry.compare_version() == cand:
                    self.registry.set_compare_version(None)
                record = self.store.get_run(run["id"])
                metrics = record.get("metrics") or {}
                verdict = evaluate.Verdict.from_dict(metrics.get("gate") or {}).without(LIVE_CHECK).add(live)
                metrics["gate"] = verdict.as_dict()
                status = RunStatus.PROMOTED if live.passed else RunStatus.REJECTED
                self.store.update_run(run["id"], status=status, verdict=verdict.line(status), metrics=metrics)
                decided.append(self.store.get_run(run["id"]))
            return decided
        finally:
            self._lock.release()

    def _reusable_reward_model(self, algo: str, n_train: int) -> str | None:
        """A recent reward model the gate's judge may reuse instead of training one (DPO/KTO only;
        PPO and RLOO always train their own). It must come from the same base model and split, have had a
        held-out side (so it never trained on a context that is held out now: the split is a
        stable hash of the context), and have seen enough of today's training data."""
        t = self.settings.training
        if parse_algorithm(algo).samples_rollouts or not t.gate_reward_model or t.gate_reward_refresh <= 0:
            return None
        for run in self.store.list_runs(50):
            path = self.settings.runs_dir / f"run-{run['id']}" / "reward"
            try:
                meta = json.loads((path / "reward.json").read_text())
            except (OSError, ValueError):
                continue
            rm = meta.get("metrics") or {}
            # the snapshot's pairs it was trained from (before the relevance filter left some out)
            seen = (rm.get("pair_filter") or {}).get("pairs") or rm.get("train_pairs") or 0
            held = ((meta.get("metrics") or {}).get("held_out") or {}).get("pairs")
            if (meta.get("model_path") == self.model_path and meta.get("eval_fraction") == t.eval_fraction
                    and held and (path / "head.safetensors").is_file()):
                return str(path) if n_train <= seen * (1 + t.gate_reward_refresh) else None
        return None

    def _snapshot(self, algo: str, job_dir: Path) -> dict[str, Any]:
        """Write the data this algorithm trains on into ``job_dir``; refuse if there is too little.

        Whether a held-out side exists is decided once, from the algorithm's main data, and the
        same context-hash rule then splits pairs, thumbs and prompts alike (no context leaks).
        """
        t = self.settings.training
        algo = parse_algorithm(algo)
        outliers = prefs.outlier_raters(self.store, t.outlier_z, t.outlier_min_votes)
        pairset = prefs.build_pairs(self.store, t.max_pairs_per_user, outliers)
        thumbs, capped_thumbs = prefs.unpaired_thumbs(self.store, t.max_pairs_per_user, outliers)
        pairs = pairset.pairs
        hint = ("Pairs come from A/B choices and from a thumbs-up and a thumbs-down on two replies to "
                "the same conversation.")
        if (algo == Algorithm.DPO or algo.samples_rollouts) and len(pairs) < t.min_pairs:
            raise NotEnoughFeedback(f"not enough feedback to retrain: {len(pairs)} preference pair(s), "
                                    f"need at least {t.min_pairs}. {hint}")
        if algo == Algorithm.KTO:
            ups = sum(th.label for th in thumbs)
            if len(thumbs) < t.min_thumbs or ups == 0 or ups == len(thumbs):
                raise NotEnoughFeedback(
                    f"not enough feedback for KTO: {ups} thumbs-up and {len(thumbs) - ups} thumbs-down "
                    f"replies, need at least {t.min_thumbs} in all, with both kinds")
        main = thumbs if algo == Algorithm.KTO else pairs
        hold = prefs.enough_to_hold_out(len(main), t.eval_fraction, t.min_eval_pairs)
        job_dir.mkdir(parents=True, exist_ok=True)
        train_p, held_p = prefs.split_by_context(pairs, t.eval_fraction, hold)
        train_t, held_t = prefs.split_by_context(thumbs, t.eval_fraction, hold)
        if not (train_t if algo == Algorithm.KTO else train_p):  # a degenerate draw: train on everything
            train_p, held_p, train_t, held_t = pairs, [], thumbs, []
        # Every algorithm gets pairs and thumbs: the reward model (PPO's, and the gate's for
        # DPO/KTO) trains on both; held-out prompts are what the gate's judge asks both sides.
        uses_pairs = algo == Algorithm.DPO or algo.samples_rollouts or t.gate_reward_model
        uses_thumbs = (algo == Algorithm.KTO or algo.samples_rollouts or t.gate_reward_model
                       or (algo == Algorithm.DPO and t.dpo_thumbs_weight > 0))  # DPO's thumbs term
        prefs.write_jsonl(job_dir / "train.jsonl", train_p if uses_pairs else [])
        prefs.write_jsonl(job_dir / "eval.jsonl", held_p if uses_pairs else [])
        prefs.write_jsonl(job_dir / "train_thumbs.jsonl", train_t if uses_thumbs else [])
        prefs.write_jsonl(job_dir / "eval_thumbs.jsonl", held_t if uses_thumbs else [])
        train_q, held_q = prefs.split_by_context(prefs.logged_prompts(self.store), t.eval_fraction, hold)
        prefs.write_jsonl(job_dir / "train_prompts.jsonl", train_q if algo.samples_rollouts else [])
        prefs.write_jsonl(job_dir / "eval_prompts.jsonl", held_q)
        used_pairs = train_p if uses_pairs else []
        used_thumbs = train_t if uses_thumbs else []
        return {
            "n_train": len(train_t) if algo == Algorithm.KTO else len(train_p),
            "n_eval": len(held_t) if algo == Algorithm.KTO else len(held_p),
            "feedback_ids": sorted({i for p in used_pairs for i in p.feedback_ids}
                                   | {i for th in used_thumbs for i in th.feedback_ids}),
            "comparison_ids": sorted({i for p in used_pairs for i in p.comparison_ids}),
            "capped": {"pairs": pairset.capped, "thumbs": capped_thumbs, "outlier_raters": sorted(outliers)},
        }

    def _train_in_child(self, job_dir: Path, on_progress) -> dict[str, Any]:
        log_file = open(job_dir / "child.log", "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", CHATLOOP_PARENT_PID=str(os.getpid()))  # dies with us
        proc = subprocess.Popen([sys.executable, "-m", "chatloop.train.runner", str(job_dir)],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)
        (job_dir / CHILD_PID_FILE).write_text(str(proc.pid))  # for the start-up reconciliation
        progress_file = job_dir / "progress.jsonl"
        offset = 0
        try:
            while True:
                rc = proc.poll()
                if progress_file.exists():
                    with open(progress_file) as fh:
                        fh.seek(offset)
                        for line in fh:
                            if not line.endswith("\n"):
                                break
                            offset += len(line.encode())
                            m = json.loads(line)
                            assert self.current is not None
                            self.current.step, self.current.total, self.current.last = m["step"], m["total"], m
                            self.current.phase = m.get("phase", "")
                            self.current.history.append(m)
                            if on_progress:
                                on_progress(self.current)
                if rc is not None:
                    break
                if self._cancel.is_set():
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    raise InterruptedError("retraining cancelled by an operator")
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                proc.kill()
            log_file.close()
        if rc != 0:
            err = job_dir / "error.txt"
            detail = err.read_text().splitlines()[0] if err.exists() else f"exit code {rc}"
            raise TrainingFailed(f"training process failed: {detail}")
        return json.loads((job_dir / "metrics.json").read_text())
