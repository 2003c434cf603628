"""Does it keep improving on its own? The closed loop, unattended, through the public surfaces only.

    python benchmarks/continual.py [--oracle sentiment] [--prompts FILE] [--rounds 3]
                                   [--events-per-round 200] [--algo dpo] [--eval-prompts 150]
                                   [--set training.KEY=VALUE] [--data-dir DIR] [--replies FILE] [--json]

1. Starts ``chatloop serve`` on a fresh data directory with the product's defaults (rate limits off)
   and adds one schedule through ``POST /admin/jobs``: retrain with --algo after every
   --events-per-round new feedback events (the product's own trigger; no operator starts a cycle).
2. Before round 1, and after every round: the *served* version answers the oracle's first
   --eval-prompts held-out prompts (same prompts, same seeds every time) and the oracle scores them.
3. Each round, simulated users (``chatloop.simulate``) chat with and rate whatever version is being
   served (on-policy) until the round's events are in; the schedule fires, the gate decides, and
   the benchmark waits for that run to end. A rejected candidate is scored too, to show whether
   the gate was right to refuse it.

Per round: ``liked_pct`` (held-out replies of the version served after the round that the oracle
likes), ``lift_se`` (the paired SE, in points, of the change from the version served before),
``verdict`` and ``promoted``, ``candidate_liked_pct`` (the candidate's own share, promoted or not),
``kl_to_base``, ``relevance`` and ``register`` (the gate's measurements: candidate's and base
model's task relevance, the register's shift toward assistant talk), ``document`` (the candidate's
document likelihood against base: talk unlikely in both framings), ``mean_tokens``,
``served_version``, ``cycle_s``, ``simulate_s``, ``evaluate_s``, and a few held-out replies to read. At the end: ``base_liked_pct``, ``final_liked_pct``,
``total_lift_points``, ``regressions_promoted`` (promoted rounds whose candidate scored more than
one SE below the version it replaced), ``drops_beyond_one_se`` (rounds that ended more than one SE
below the round before) and ``wall_s``. A plot of the liked share, KL and relevance per round goes
to --plot; every held-out reply of every evaluated version, with the oracle's verdict, to --replies
(JSONL), to read. With --json the last line is one JSON object.

Any ``module:function`` oracle works (with --prompts for its prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
from conftest import start_server, stop_server  # noqa: E402 - the tests' way of starting `chatloop serve`
from efficacy import answer_all, judge, lift_se_points, service_env  # noqa: E402

from chatloop.oracles import load_oracle, load_prompts  # noqa: E402
from chatloop.simulate import simulate  # noqa: E402


def served_version(http: httpx.Client) -> str:
    return http.get("/admin/status").raise_for_status().json()["active_adapter"]


def wait_for_scheduled_run(http: httpx.Client, after_id: int, timeout_s: float) -> dict[str, Any]:
    """The first run after ``after_id`` started by a feedback schedule, once it has ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = http.get("/admin/runs", params={"limit": 20}).raise_for_status().json()["runs"]
        mine = [r for r in runs if r["id"] > after_id and str(r.get("trigger", "")).startswith("feedback:")]
        done = [r for r in mine if r["status"] not in ("running", "staged")]
        if done:
            return http.get(f"/admin/runs/{min(r['id'] for r in done)}").raise_for_status().json()
        time.sleep(2)
    raise TimeoutError(f"no scheduled run ended within {timeout_s:.0f} s")


def last_run_id(http: httpx.Client) -> int:
    runs = http.get("/admin/runs", params={"limit": 1}).raise_for_status().json()["runs"]
    return runs[0]["id"] if runs else 0


def plot(base: dict[str, Any], rounds: list[dict[str, Any]], oracle: str, n: int, path: Path) -> None:
    """Left: the served version's held-out liked share after each round (error bars: one binomial
    SE), each round marked promoted or rejected, with the candidate's own share; right: KL to base
    and the candidate's task relevance (with the base model's as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(rounds) + 1))
    shares = [base["liked_pct"]] + [r["liked_pct"] for r in rounds]
    se = [100 * ((p / 100) * (1 - p / 100) / n) ** 0.5 for p in shares]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.errorbar(xs, shares, yerr=se, marker="o", capsize=4, label="served version")
    for r in rounds:
        color = "tab:green" if r["promoted"] else "tab:red"
        if r.get("candidate_liked_pct") is not None:
            ax1.scatter([r["round"]], [r["candidate_liked_pct"]], marker="x", color=color, zorder=3)
        ax1.annotate("promoted" if r["promoted"] else "rejected", (r["round"], r["liked_pct"]),
                     textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8, color=color)
    ax1.scatter([], [], marker="x", color="grey", label="candidate (green promoted, red rejected)")
    ax1.set_xticks(xs, ["base"] + [f"round {r['round']}" for r in rounds])
    ax1.set_ylabel(f"held-out replies the {oracle} oracle likes (%)")
    ax1.set_ylim(0, 105)
    ax1.legend(loc="lower right", fontsize=8)
    rx = [r["round"] for r in rounds]
    ax2.plot(rx, [r["kl_to_base"] if r["kl_to_base"] is not None else float("nan") for r in rounds], marker="o",
             label="KL to base (nats/token)")
    rel = [((r.get("relevance") or {}).get("candidate") or {}).get("mean") for r in rounds]
    ax2.plot(rx, [v if v is not None else float("nan") for v in rel], marker="s", label="candidate relevance")
    base_rel = [((r.get("relevance") or {}).get("base") or {}).get("mean") for r in rounds]
    ax2.plot(rx, [v if v is not None else float("nan") for v in base_rel], linestyle="--", label="base relevance")
    ax2.set_xticks(rx, [f"round {x}" for x in rx])
    ax2.legend(loc="best", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"unattended rounds: simulated users rate the served version, a schedule retrains ({n} prompts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--oracle", default="sentiment", help="sentiment | concise | module:function")
    ap.add_argument("--prompts", help="prompts file (default: the oracle's own)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--events-per-round", type=int, default=200)
    ap.add_argument("--algo", default="dpo")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--ab-fraction", type=float, default=0.5)
    ap.add_argument("--eval-prompts", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--model", default="default")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cycle-timeout", type=float, default=3600)
    ap.add_argument("--data-dir", help="the service's data directory (default: a fresh temporary one)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a service setting for this run, e.g. training.gate_max_kl=0.5 (repeatable)")
    ap.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "continual.png"))
    ap.add_argument("--replies", help="write every evaluated version's held-out replies here (JSONL)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1 or args.events_per_round < 1:
        print("error: --rounds and --events-per-round must be at least 1", file=sys.stderr)
        return 2
    oracle = load_oracle(args.oracle)
    try:
        held = load_prompts(oracle, "heldout", args.prompts)[: args.eval_prompts]
        train = load_prompts(oracle, "train", args.prompts)
        env = service_env(args.set)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="chatloop-continual-")) / "data"
    t_all = time.perf_counter()
    server = start_server(data, args.model, timeout=900, extra_env=env, quick=False)
    admin = {"Authorization": f"Bearer {server.token}"}
    http = httpx.Client(base_url=server.url, headers=admin, timeout=None)
    from tqdm import tqdm

    replies_file = open(args.replies, "w") if args.replies else None

    def evaluate(version: str, round_no: int = 0) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        out = judge(oracle, held, answer_all(server.url, held, version, args.max_tokens, args.seed, args.streams,
                                             admin))
        if replies_file is not None:
            for i, text in enumerate(out["texts"]):
                replies_file.write(json.dumps({"round": round_no, "version": version, "prompt": held[i][-1]["content"],
                                               "reply": text, "liked": bool(out["liked"][i])}) + "\n")
            replies_file.flush()
        return out, time.perf_counter() - t0

    rounds: list[dict[str, Any]] = []
    try:
        job = http.post("/admin/jobs", json={"kind": "feedback", "spec": str(args.events_per_round),
                                             "algo": args.algo})
        job.raise_for_status()
        served = served_version(http)
        before, eval_s = evaluate(served)
        base = before
        print(f"base ({served}): {before['liked_pct']:.1f}% liked ({eval_s:.0f} s)", file=sys.stderr)
        for k in range(1, args.rounds + 1):
            mark = last_run_id(http)
            with tqdm(total=args.events_per_round, desc=f"round {k}: simulated users", unit="ev",
                      file=sys.stderr) as bar:
                report = simulate(server.url, oracle, train, args.users, args.events_per_round, args.ab_fraction,
                                  args.max_tokens, args.seed + 1000 * k,
                                  on_event=lambda r: bar.update(r.events - bar.n))
            t0 = time.perf_counter()
            run = wait_for_scheduled_run(http, mark, args.cycle_timeout)
            wait_s = time.perf_counter() - t0
            now = served_version(http)
            after, eval_s = evaluate(now, k) if now != served else (before, 0.0)
            m = run.get("metrics") or {}
            judged = m.get("judge") or {}
            cand = run.get("candidate_version")
            promoted = run["status"] == "promoted"
            if cand and not promoted:
                cand_eval, extra = evaluate(cand, k)
                eval_s += extra
            else:
                cand_eval = after if promoted else None
            se = lift_se_points(before["liked"], cand_eval["liked"]) if cand_eval else None
            row = {
                "round": k, "events": report.events, "rated_versions": report.versions,
                "liked_pct": round(after["liked_pct"], 2),
                "lift_se": round(lift_se_points(before["liked"], after["liked"]), 2),
                "candidate_liked_pct": round(cand_eval["liked_pct"], 2) if cand_eval else None,
                "candidate_vs_served_points": (round(cand_eval["liked_pct"] - before["liked_pct"], 2)
                                               if cand_eval else None),
                "candidate_vs_served_se": round(se, 2) if se is not None else None,
                "verdict": run.get("verdict"), "promoted": promoted, "status": run["status"],
                "kl_to_base": judged.get("kl_to_base"), "relevance": judged.get("relevance"),
                "register": judged.get("register"), "document": judged.get("document"),
                "mean_tokens": round(after["mean_tokens"], 1), "served_version": now, "candidate_version": cand,
                "cycle_s": round(m.get("total_s") or 0.0, 1), "waited_for_cycle_s": round(wait_s, 1),
                "simulate_s": round(report.wall_s, 1), "evaluate_s": round(eval_s, 1),
                "examples": [{"prompt": held[i][-1]["content"][:160], "reply": after["texts"][i][:240]}
                             for i in range(min(3, len(held)))],
            }
            rounds.append(row)
            print(f"round {k}: {json.dumps({x: y for x, y in row.items() if x != 'examples'})}", file=sys.stderr)
            served, before = now, after
    finally:
        http.close()
        stop_server(server)
        if replies_file is not None:
            replies_file.close()

    def regression(r: dict[str, Any]) -> bool:
        return bool(r["promoted"] and r["candidate_vs_served_se"] is not None
                    and r["candidate_vs_served_points"] < -r["candidate_vs_served_se"])

    prev = [round(base["liked_pct"], 2)] + [r["liked_pct"] for r in rounds[:-1]]  # as rounded in the rows
    result = {
        "oracle": oracle.name, "algo": args.algo, "eval_prompts": len(held), "events_per_round": args.events_per_round,
        "base_liked_pct": round(base["liked_pct"], 2), "rounds": rounds,
        "final_liked_pct": rounds[-1]["liked_pct"],
        "total_lift_points": round(rounds[-1]["liked_pct"] - base["liked_pct"], 2),
        "regressions_promoted": sum(regression(r) for r in rounds),
        "drops_beyond_one_se": sum(r["liked_pct"] < p - r["lift_se"] for r, p in zip(rounds, prev)),
        "wall_s": round(time.perf_counter() - t_all, 1), "settings": args.set,
    }
    print(f"oracle {oracle.name}, {args.algo}, {len(held)} held-out prompts, {args.events_per_round} events a round; "
          f"base {result['base_liked_pct']}% liked; {result['wall_s']:.0f} s in all")
    cols = ["liked_pct", "lift_se", "candidate_liked_pct", "status", "kl_to_base", "mean_tokens", "served_version",
            "cycle_s", "simulate_s", "evaluate_s"]
    print(f"{'round':<6}" + "".join(f"{c:>20}" for c in cols) + f"{'relevance (cand/base)':>24}"
          + f"{'register vs base':>20}{'document vs base':>20}")
    for r in rounds:
        rel = r.get("relevance") or {}
        rc, rb = (rel.get("candidate") or {}).get("mean"), (rel.get("base") or {}).get("mean")
        relv = f"{rc:.3f}/{rb:.3f}" if rc is not None and rb is not None else "-"
        shifts = [((r.get(k) or {}).get("paired_difference") or {}) for k in ("register", "document")]
        shifts = [f"{d['mean']:+.3f} ± {d.get('se') or 0:.3f}" if d.get("mean") is not None else "-" for d in shifts]
        print(f"{r['round']:<6}" + "".join(f"{(round(r[c], 3) if isinstance(r[c], float) else r[c])!s:>20}"
                                           for c in cols) + f"{relv:>24}" + "".join(f"{x:>20}" for x in shifts))
        for ex in r["examples"]:
            print(f"      {ex['prompt'][:70]!r} -> {ex['reply'][:120]!r}")
    if args.plot:
        plot(base, rounds, oracle.name, len(held), Path(args.plot))
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
