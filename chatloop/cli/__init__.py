"""The ``chatloop`` command: the composition root that wires core, UI and jobs together.

Commands (each in a module of this package):
  serve                       start the service (UI + API on one port)            serve.py
  retrain --algo dpo          one retraining cycle (the running service's, else local)  training.py
  adapters list|activate|rollback, keys create|list|revoke, jobs list|add|remove|run   manage.py
  export, import oasst|hh FILE, simulate, sql "SELECT ..."                          data.py

Invariant: when a service runs on the data directory (``service.json``), commands talk to its
HTTP API and never open the DuckDB file; only when none runs do they open it directly.
"""

from __future__ import annotations

import argparse
import logging
import sys

from chatloop.algorithms import NAMES as ALGORITHMS
from chatloop.cli.data import export_cmd, import_cmd, simulate_cmd, sql_cmd
from chatloop.cli.manage import adapters_cmd, jobs_cmd, keys_cmd
from chatloop.cli.serve import serve
from chatloop.cli.training import retrain
from chatloop.config import ConfigError, load_settings


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
    s.add_argument("--serve-weights", help="auto | fp32 | bf16 | int8 | int4 (how the served weights are stored)")
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
                 "device": getattr(args, "device", None), "dtype": getattr(args, "dtype", None),
                 "serve_weights": getattr(args, "serve_weights", None)}
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
