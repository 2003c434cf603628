"""``chatloop adapters|keys|jobs``: versions, API keys and retraining schedules."""

from __future__ import annotations

import argparse

from chatloop.cli.remote import Local, find_service
from chatloop.cli.training import retrain
from chatloop.config import Settings


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
            previous, target = Local(settings).rollback("cli")
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
