"""``chatloop export|import|simulate|sql``: the feedback log in and out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from chatloop.cli.remote import Local, find_service
from chatloop.config import Settings


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
