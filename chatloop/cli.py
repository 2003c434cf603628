"""The ``chatloop`` command: the composition root that wires core, UI and jobs together.

Commands:
  serve                       start the service (UI + API on one port)
  retrain --algo dpo          one retraining cycle (through the running service, else locally)
  adapters list|activate|rollback
  sql "SELECT ..."            read-only query of the feedback log
  import oasst|hh FILE        replay OpenAssistant trees or HH-RLHF pairs as feedback
  simulate --url URL          simulated users chat and rate through the HTTP API

Invariant: when a service runs on the data directory (``service.json``), commands talk to its
HTTP API and never open the DuckDB file; only when none runs do they open it directly.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from chatloop.algorithms import NAMES as ALGORITHMS
from chatloop.config import ConfigError, Settings, load_settings
from chatloop.run_status import RunStatus

log = logging.getLogger("chatloop")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- serve -------------------------------------------------------------------------------------
def serve(settings: Settings) -> int:
    import gradio as gr
    import uvicorn

    from chatloop.web import create_app
    from chatloop.hotswap_check import HotSwapUnavailable
    from chatloop.requestguard import guarded_protocol
    from chatloop.service import Service
    from jobs.scheduler import RetrainScheduler
    from ui.app import build_ui

    token = settings.admin_token
    if not token and settings.local_mode:
        if not _is_loopback(settings.host):
            print(f"error: local mode (operator access without a token) only binds to loopback, not "
                  f"{settings.host}; set CHATLOOP_ADMIN_TOKEN to serve operators elsewhere", file=sys.stderr)
            return 2
        token = secrets.token_urlsafe(18)
        log.warning("local mode on %s: generated an operator token for this run (it is in %s, mode 0600)",
                    settings.host, settings.service_file)
    elif not token:
        log.warning("no operator token configured: admin routes and the Admin tab are disabled "
                    "(set CHATLOOP_ADMIN_TOKEN, or use --local on loopback)")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    t0 = time.perf_counter()
    service = Service(settings)
    try:
        service.start()
    except HotSwapUnavailable as exc:
        service.close()
        print(f"error: {exc}", file=sys.stderr)
        return 3
    log.info("model %s loaded in %.1f s on %s (%s); serving adapter %s", service.model_name,
             service.load_s, service.loaded.device, service.loaded.dtype, service.active_version)
    scheduler = RetrainScheduler(settings, service.retrainer, service.store).start()
    app = create_app(service, token, scheduler)
    demo = build_ui(service, token, scheduler)
    # run_history=False: Gradio 6 would keep every handler's inputs and outputs (the operator
    # token, SQL results) in the browser's localStorage; it also clears what an older run kept
    app = gr.mount_gradio_app(app, demo, path="/", run_history=False)

    url = f"http://{settings.host}:{settings.port}"
    info = {"url": url, "pid": os.getpid(), "admin_token": token, "started_at": time.time()}
    settings.service_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.service_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    print(f"chatloop ready in {time.perf_counter() - t0:.1f} s: {url}  (model {service.model_name}, "
          f"adapter {service.active_version})", flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                    http=guarded_protocol(settings.limits.request_read_timeout_s))
    finally:
        scheduler.shutdown()
        service.close()
        try:
            if json.loads(settings.service_file.read_text()).get("pid") == os.getpid():
                settings.service_file.unlink()
        except (OSError, ValueError):
            pass
    return 0


# ---- talking to a running service -------------------------------------------------------------
class Remote:
    def __init__(self, url: str, token: str):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=60,
                                   headers={"Authorization": f"Bearer {token}"} if token else {})

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.client.request(method, path, **kw)
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"message": r.text}}
        if r.status_code >= 400:
            raise SystemExit(f"error: {body.get('error', {}).get('message', body)}")
        return body


def find_service(settings: Settings, url: str | None) -> Remote | None:
    """The running service on this data directory (or at --url), if any answers."""
    import httpx

    token = settings.admin_token
    explicit = url is not None
    if not explicit:
        try:
            info = json.loads(settings.service_file.read_text())
        except (OSError, ValueError):
            return None
        url, token = info["url"], token or info.get("admin_token", "")
    try:
        httpx.get(url.rstrip("/") + "/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError:
        if explicit:
            raise SystemExit(f"error: no chatloop service answers at {url}")
        return None  # a stale service.json: the service is gone
    return Remote(url, token)


class Local:
    """Direct access to the data directory when no service runs."""

    def __init__(self, settings: Settings):
        from chatloop.adapters import AdapterRegistry
        from chatloop.store import Store

        self.settings = settings
        self.store = Store(settings.db_path)
        self.registry = AdapterRegistry(settings.adapters_dir)

    def activate(self, version: str, actor: str, reason: str) -> str:
        previous = self.registry.set_active(version)
        self.store.record_activation(version, previous, actor, reason)
        return previous


class PhaseBars:
    """One tqdm bar per training phase (e.g. "reward model", then "ppo"), on stderr, with the
    latest loss (and mean reward, for PPO) beside it."""

    def __init__(self) -> None:
        self.bar, self.phase = None, None

    def show(self, phase: str, step: int, total: int, last: dict[str, Any] | None) -> None:
        from tqdm import tqdm

        if not total:
            return
        if self.bar is None or phase != self.phase:
            self.close()
            self.bar, self.phase = tqdm(total=total, desc=phase or "training", unit="step", file=sys.stderr), phase
        self.bar.update(step - self.bar.n)
        if last:
            shown = {k: f"{last[k]:.4f}" for k in ("loss", "mean_reward", "kl") if isinstance(last.get(k), (int, float))}
            self.bar.set_postfix(shown)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def retrain(settings: Settings, algo: str, url: str | None, trigger: str = "cli") -> int:
    remote = find_service(settings, url)
    if remote is not None:
        started = remote.call("POST", "/admin/retrain", json={"algo": algo})
        run_id = started["run_id"]
        print(f"retraining run {run_id} started on the running service", file=sys.stderr)
        bars = PhaseBars()
        try:
            while True:
                run = remote.call("GET", f"/admin/runs/{run_id}")
                prog = run.get("progress") or {}
                bars.show(prog.get("phase", ""), prog.get("step", 0), prog.get("total", 0), prog.get("last"))
                if run["status"] != RunStatus.RUNNING:
                    break
                time.sleep(0.5)
        finally:
            bars.close()
        return _report(run)

    from chatloop.loop import NotEnoughFeedback, Retrainer
    from chatloop.models import materialize

    local = Local(settings)
    source = materialize(settings.model, settings.models_dir)
    retrainer = Retrainer(settings, local.store, local.registry, source.path,
                          activate=local.activate, active_version=local.registry.active)
    bars = PhaseBars()

    def on_progress(cur) -> None:
        bars.show(cur.phase, cur.step, cur.total, cur.last)

    try:
        run = retrainer.run_cycle(algo, trigger=trigger, on_progress=on_progress)
    except NotEnoughFeedback as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: retraining failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bars.close()
    return _report(run)


def _report(run: dict[str, Any]) -> int:
    status = run["status"]
    if status == RunStatus.REFUSED:
        print(f"error: {run.get('error')}", file=sys.stderr)
        return 2
    if status == RunStatus.FAILED:
        print(f"error: retraining failed: {run.get('error')}", file=sys.stderr)
        return 1
    print(f"run {run['id']}: {status} {run.get('candidate_version') or ''} — {run.get('verdict') or ''}")
    return 0


def adapters_cmd(settings: Settings, action: str, version: str | None, url: str | None) -> int:
    remote = find_service(settings, url)
    if action == "list":
        if remote is not None:
            data = remote.call("GET", "/admin/adapters")
            active, items = data["active"], data["adapters"]
        else:
            local = Local(settings)
            active, items = local.registry.active(), local.registry.list()
        print(f"active: {active}")
        for a in items:
            mark = "*" if a["version"] == active else " "
            print(f"{mark} {a['version']:>6}  parent={a.get('parent')}  algo={a.get('algo')}  "
                  f"run={a.get('run_id')}  pairs={a.get('train_pairs')}  {a.get('verdict', '')}")
        return 0
    if action == "activate":
        if not version:
            raise SystemExit("error: adapters activate needs a VERSION (e.g. v2 or base)")
        if remote is not None:
            out = remote.call("POST", f"/admin/adapters/{version}/activate")
        else:
            out = {"active": version, "previous": Local(settings).activate(version, "operator", "cli")}
        print(f"active: {out['active']} (was {out['previous']})")
        return 0
    if action == "rollback":
        if remote is not None:
            out = remote.call("POST", "/admin/rollback")
        else:
            local = Local(settings)
            previous, target = local.registry.pop_active()
            local.store.record_activation(target, previous, "rollback", "cli")
            out = {"active": target, "previous": previous}
        print(f"active: {out['active']} (was {out['previous']})")
        return 0
    raise SystemExit(f"error: unknown adapters action {action!r}")


def keys_cmd(settings: Settings, args: argparse.Namespace) -> int:
    """API keys: through the running service (so it knows at once), or the store when none runs."""
    remote = find_service(settings, args.url)
    keyring = None
    if remote is None:
        from chatloop.apikeys import KeyRing

        keyring = KeyRing(Local(settings).store)
    if args.action == "create":
        if not args.name:
            raise SystemExit("error: keys create needs a NAME (who the key is for)")
        limits = {"chat_per_minute": args.chat_per_minute, "feedback_per_minute": args.feedback_per_minute,
                  "max_pairs": args.max_pairs}
        if remote is not None:
            out = remote.call("POST", "/admin/keys", json={"name": args.name, **limits})
        else:
            from chatloop.store import StoreError

            try:
                listing, token = keyring.create(args.name, **limits)
            except StoreError as exc:
                raise SystemExit(f"error: {exc}")
            out = {**listing, "key": token}
        print(f"created key {out['id']} for {out['name']!r} (its user is {out['user']}).")
        print("The key, shown this once (it is stored hashed):")
        print(out["key"])
        return 0
    if args.action == "list":
        keys = remote.call("GET", "/admin/keys")["keys"] if remote is not None else keyring.list()
        print("id\tname\tstate\tchat/min\tfeedback/min\tmax pairs\tcreated")
        for k in keys:
            def show(v):
                return "default" if v is None else str(v)
            print(f"{k['id']}\t{k['name']}\t{'revoked' if k['revoked'] else 'active'}\t{show(k['chat_per_minute'])}\t"
                  f"{show(k['feedback_per_minute'])}\t{show(k['max_pairs'])}\t{k['created_at']}")
        return 0
    if args.action == "revoke":
        if not args.name:
            raise SystemExit("error: keys revoke needs the key's ID (see `chatloop keys list`)")
        if remote is not None:
            remote.call("DELETE", f"/admin/keys/{args.name}")
        else:
            from chatloop.store import NotFound

            try:
                keyring.revoke(args.name)
            except NotFound as exc:
                raise SystemExit(f"error: {exc}")
        print(f"revoked key {args.name}")
        return 0
    raise SystemExit(f"error: unknown keys action {args.action!r}")


def jobs_cmd(settings: Settings, args: argparse.Namespace) -> int:
    """Retraining schedules: through the running service, or the store when none runs (the
    service picks them up at its next start)."""
    remote = find_service(settings, args.url)
    action = args.action
    if action == "add":
        given = [(k, v) for k, v in (("cron", args.cron), ("interval", args.interval),
                                     ("feedback", args.after_feedback)) if v is not None]
        if len(given) != 1:
            raise SystemExit("error: jobs add needs exactly one of --cron, --interval or --after-feedback")
        kind, spec = given[0]
        if remote is not None:
            job = remote.call("POST", "/admin/jobs", json={"kind": kind, "spec": str(spec), "algo": args.algo})
        else:
            from jobs.scheduler import ScheduleError, build_trigger

            try:
                build_trigger(kind, str(spec))
            except ScheduleError as exc:
                raise SystemExit(f"error: {exc}")
            local = Local(settings)
            job = local.store.get_schedule(local.store.add_schedule(kind, str(spec), args.algo, "cli"))
        print(f"schedule {job['id']}: {kind} {spec} -> {args.algo}")
        return 0
    if action == "list":
        jobs = (remote.call("GET", "/admin/jobs")["jobs"] if remote is not None
                else Local(settings).store.list_schedules())
        if not jobs:
            print("no retraining schedules")
        for j in jobs:
            extra = f"next {j['next_run']}" if j.get("next_run") else ""
            if j.get("events_until_next") is not None:
                extra = f"{j['events_until_next']} events to go"
            print(f"{j['id']!s:>18}  {j['kind']:<8} {j['spec']:<14} {j['algo']:<4} {extra}")
        return 0
    if args.id is None:
        raise SystemExit(f"error: jobs {action} needs a schedule ID (see `chatloop jobs list`)")
    if action == "remove":
        if remote is not None:
            remote.call("DELETE", f"/admin/jobs/{args.id}")
        else:
            from chatloop.store import NotFound

            try:
                Local(settings).store.remove_schedule(args.id)
            except NotFound as exc:
                raise SystemExit(f"error: {exc}")
        print(f"schedule {args.id} removed")
        return 0
    if action == "run":
        if remote is not None:
            run_id = remote.call("POST", f"/admin/jobs/{args.id}/run")["run_id"]
            print(f"retraining run {run_id} started on the running service (see `chatloop retrain` or "
                  f"the Admin tab for progress)")
            return 0
        from chatloop.store import NotFound

        try:
            algo = Local(settings).store.get_schedule(args.id)["algo"]
        except NotFound as exc:
            raise SystemExit(f"error: {exc}")
        return retrain(settings, algo, None, trigger=f"cli:schedule-{args.id}")
    raise SystemExit(f"error: unknown jobs action {action!r}")


def export_cmd(settings: Settings, what: str, fmt: str, out: str | None, url: str | None) -> int:
    """Write pairs, feedback or conversations as JSON Lines or Parquet (through the running
    service, which holds the database, or from the file when none runs)."""
    target = Path(out or f"chatloop-{what}.{fmt}")
    remote = find_service(settings, url)
    if remote is not None:
        r = remote.client.get("/admin/export", params={"what": what, "format": fmt})
        if r.status_code >= 400:
            raise SystemExit(f"error: {r.json().get('error', {}).get('message', r.text)}")
        data = r.content
    else:
        from chatloop.export import encode, export_rows

        data = encode(export_rows(Local(settings).store, what, settings.training), fmt)
    target.write_bytes(data)
    print(f"wrote {target} ({len(data)} bytes)")
    return 0


def import_cmd(settings: Settings, kind: str, file: str, limit: int | None, url: str | None) -> int:
    """Replay OpenAssistant trees or HH-RLHF pairs into the feedback log (through the running
    service, else into the data directory); held-out rows are marked and never train."""
    path = Path(file)
    if not path.is_file():
        raise SystemExit(f"error: no such file: {path}")
    remote = find_service(settings, url)
    if remote is not None:
        params: dict[str, Any] = {"name": path.name}
        if limit is not None:
            params["limit"] = limit
        report = remote.call("POST", f"/admin/import/{kind}", params=params, content=path.read_bytes(),
                             timeout=None)
    else:
        from tqdm import tqdm

        from chatloop import importers

        store = Local(settings).store
        with tqdm(desc=f"importing {kind}", unit=" trees" if kind == "oasst" else " pairs", file=sys.stderr) as bar:
            tick = lambda _i: bar.update(1)  # noqa: E731
            try:
                report = (importers.import_oasst(store, path, on_tree=tick) if kind == "oasst"
                          else importers.import_hh(store, path, limit, on_row=tick)).as_dict()
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise SystemExit(f"error: cannot import {path} as {kind}: {type(exc).__name__}: {exc}")
    print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report.items()))
    return 0


def simulate_cmd(settings: Settings, args: argparse.Namespace) -> int:
    """Simulated users chat and rate through the public HTTP API of a running service."""
    from tqdm import tqdm

    from chatloop.oracles import load_oracle, load_prompts
    from chatloop.simulate import SimulationError, simulate

    remote = find_service(settings, args.url)
    if remote is None:
        raise SystemExit("error: no running service: start one (chatloop serve) or pass --url")
    try:
        oracle = load_oracle(args.oracle, args.threshold)
        prompts = load_prompts(oracle, args.split, args.prompts)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    url = str(remote.client.base_url)
    print(f"{args.users} simulated users, {args.events} events, oracle {oracle.name} "
          f"(threshold {oracle.threshold}), {len(prompts)} {args.split} prompts, against {url}", file=sys.stderr)
    with tqdm(total=args.events, desc="feedback events", unit="ev", file=sys.stderr) as bar:
        def tick(r) -> None:
            bar.update(r.events - bar.n)
            bar.set_postfix(up=r.thumbs_up, down=r.thumbs_down, ab=r.ab)

        try:
            report = simulate(url, oracle, prompts, args.users, args.events, args.ab_fraction, args.max_tokens,
                              args.seed, on_event=tick)
        except (SimulationError, ValueError) as exc:
            raise SystemExit(f"error: {exc}")
    print(json.dumps(report.as_dict()))
    return 0


def sql_cmd(settings: Settings, query: str, url: str | None) -> int:
    remote = find_service(settings, url)
    if remote is not None:
        res = remote.call("POST", "/admin/sql", json={"sql": query})
        cols, rows, truncated = res["columns"], res["rows"], res["truncated"]
    else:
        from chatloop.operations import run_sql
        from chatloop.store import SqlRefused

        try:
            res = run_sql(Local(settings).store, settings.limits, query)
        except SqlRefused as exc:
            raise SystemExit(f"error: {exc}")
        cols, rows, truncated = res["columns"], res["rows"], res["truncated"]
    print("\t".join(cols))
    for row in rows:  # the same JSON values either way; a LIST or STRUCT as its JSON text
        print("\t".join("" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v) for v in row))
    if truncated:
        print(f"(truncated to {len(rows)} rows)", file=sys.stderr)
    return 0


# ---- argument parsing ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatloop", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="data directory (default ./data or $CHATLOOP_DATA_DIR)")
    common.add_argument("--config", help="TOML config file (default DATA_DIR/chatloop.toml)")
    common.add_argument("--model", help="'default' (embedded SmolLM2-135M-Instruct), a HF id, a directory or a .gguf")
    common.add_argument("--url", help="URL of a running service (default: the one on this data dir)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", parents=[common], help="start the chat service")
    s.add_argument("--host")
    s.add_argument("--local", action="store_true", default=None,
                   help="local mode: no operator token needed; one is generated for this run (loopback only)")
    s.add_argument("--port", type=int)
    s.add_argument("--device", help="auto | cpu | cuda")
    s.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    r = sub.add_parser("retrain", parents=[common], help="run one retraining cycle")
    r.add_argument("--algo", default="dpo", choices=ALGORITHMS)
    a = sub.add_parser("adapters", parents=[common], help="list, activate or roll back adapters")
    a.add_argument("action", choices=["list", "activate", "rollback"])
    a.add_argument("version", nargs="?")
    k = sub.add_parser("keys", parents=[common], help="create, list or revoke API keys")
    k.add_argument("action", choices=["create", "list", "revoke"])
    k.add_argument("name", nargs="?", help="create: who the key is for; revoke: the key's id")
    k.add_argument("--chat-per-minute", type=int, help="this key's chat limit (default: [limits])")
    k.add_argument("--feedback-per-minute", type=int, help="this key's feedback limit (default: [limits])")
    k.add_argument("--max-pairs", type=int, help="training items from this key per snapshot (default: "
                                                 "[training] max_pairs_per_user)")
    j = sub.add_parser("jobs", parents=[common], help="list, add, remove or run retraining schedules")
    j.add_argument("action", choices=["list", "add", "remove", "run"])
    j.add_argument("id", nargs="?", type=int, help="schedule id (remove, run)")
    j.add_argument("--cron", help='crontab line in UTC, e.g. "0 3 * * *"')
    j.add_argument("--interval", type=int, metavar="MINUTES")
    j.add_argument("--after-feedback", type=int, metavar="N", help="after N new thumbs or A/B votes")
    j.add_argument("--algo", default="dpo", choices=ALGORITHMS)
    e = sub.add_parser("export", parents=[common], help="export pairs, feedback or conversations")
    e.add_argument("--what", default="feedback", choices=["pairs", "feedback", "conversations"])
    e.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"])
    e.add_argument("--out", help="output file (default chatloop-WHAT.FORMAT)")
    i = sub.add_parser("import", parents=[common], help="replay a public feedback data set into the log")
    i.add_argument("kind", choices=["oasst", "hh"], help="OpenAssistant trees or HH-RLHF pairs")
    i.add_argument("file")
    i.add_argument("--limit", type=int, help="hh: at most N pairs from each side (training, held-out)")
    m = sub.add_parser("simulate", parents=[common], help="simulated users chat and rate through the HTTP API")
    m.add_argument("--oracle", default="sentiment", help="sentiment | concise | module:function")
    m.add_argument("--users", type=int, default=8)
    m.add_argument("--events", type=int, default=100, help="feedback events in all (thumbs and A/B choices)")
    m.add_argument("--ab-fraction", type=float, default=0.5, help="share of events that are A/B choices")
    m.add_argument("--prompts", help="prompts file: IMDb .csv, OASST .jsonl trees or .txt (default: the oracle's)")
    m.add_argument("--split", default="train", choices=["train", "heldout"], help="which fixed split of the prompts")
    m.add_argument("--threshold", type=float, help="oracle score at or above which a reply gets a thumbs-up")
    m.add_argument("--max-tokens", type=int, default=48)
    m.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("sql", parents=[common], help="read-only SQL over the feedback log")
    q.add_argument("query")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = {"data_dir": args.data_dir, "model": args.model,
                 "host": getattr(args, "host", None), "port": getattr(args, "port", None),
                 "local_mode": getattr(args, "local", None),
                 "device": getattr(args, "device", None), "dtype": getattr(args, "dtype", None)}
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "serve":
        return serve(settings)
    if args.cmd == "retrain":
        return retrain(settings, args.algo, args.url)
    if args.cmd == "adapters":
        return adapters_cmd(settings, args.action, args.version, args.url)
    if args.cmd == "jobs":
        return jobs_cmd(settings, args)
    if args.cmd == "keys":
        return keys_cmd(settings, args)
    if args.cmd == "export":
        return export_cmd(settings, args.what, args.format, args.out, args.url)
    if args.cmd == "sql":
        return sql_cmd(settings, args.query, args.url)
    if args.cmd == "simulate":
        return simulate_cmd(settings, args)
    if args.cmd == "import":
        return import_cmd(settings, args.kind, args.file, args.limit, args.url)
    return 2


if __name__ == "__main__":
    sys.exit(main())
