"""Does the loop learn? An outside judge (an oracle) scores the bot on held-out prompts before and
after one retraining cycle of each algorithm, all trained from the same simulated feedback.

    python benchmarks/efficacy.py [--oracle sentiment] [--events 400] [--eval-prompts 150]
                                  [--algos dpo,kto,ppo,rloo] [--model default] [--set training.KEY=VALUE]
                                  [--data-dir DIR [--reuse-feedback]] [--json]

1. Starts ``chatloop serve`` on a fresh data directory (loopback; rate limits off; every other
   setting is the product's default unless --set changes it).
2. Before: the base model answers the oracle's first --eval-prompts *held-out* prompts (for
   sentiment: openings of IMDb reviews at rows i % 5 == 0, "continue this review"), each with a
   fixed seed, through the HTTP API; the oracle scores every reply.
3. ``chatloop.simulate`` users make --events feedback events (thumbs and A/B choices) on the
   oracle's *training* prompts, through the public HTTP API only.
4. For each algorithm: base is made active again, one cycle runs through ``POST /admin/retrain``
   (DPO on the pairs, KTO on the thumbs alone, PPO with a reward model trained first), and the
   candidate it published answers the same held-out prompts with the same seeds, whatever the
   gate decided (the verdict is reported beside it).

Per algorithm: ``before`` and ``after`` (the share of held-out replies the oracle likes, in %;
for sentiment: VADER compound >= 0.05, "positive"), ``lift_points`` (after - before),
``kl_to_base`` (the gate judge's mean per-token log-ratio candidate/base over the candidate's own
replies to the snapshot's held-out prompts, nats/token), ``length_ratio`` (mean reply tokens
after / before, at the --max-tokens cap), ``uncapped_length_ratio`` (the same on --length-prompts
prompts answered up to --length-max-tokens: length gaming shows here even when every capped reply
hits the cap), ``events`` and ``cycle_s`` (the whole cycle: snapshot, training, the gate's reward
model and judge, publishing), and ``lift_se`` (the lift's standard error in points, from the
per-prompt paired differences), ``steps`` and ``selected_step`` (optimisation steps taken, and the
one whose weights DPO/KTO kept by held-out loss). The table adds the mean raw score. A plot (positive share and mean
reply length before/after) goes to --plot. With --json the last line is one JSON object keyed by
algorithm.

To compare training settings on one feedback log, run once with --data-dir, then again with the
same --data-dir, --reuse-feedback and e.g. --set training.learning_rate=5e-5: the base's scores and
the simulated feedback are read back instead of measured again. Such a run's ``cycle_s`` may be
shorter: the gate reuses an earlier cycle's reward model while the data has not grown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from conftest import start_server, stop_server  # noqa: E402 - the tests' way of starting `chatloop serve`

from chatloop.oracles import load_oracle, load_prompts  # noqa: E402
from chatloop.simulate import simulate  # noqa: E402

# the product's own settings (start_server(quick=False) leaves out the test suite's quick ones),
# except the rate limits, which would throttle simulated users that are all one client
SERVICE_ENV = {"CHATLOOP_LIMITS__CHAT_PER_MINUTE": "0", "CHATLOOP_LIMITS__FEEDBACK_PER_MINUTE": "0"}


def answer_all(url: str, prompts: list, version: str, max_tokens: int, seed: int, streams: int,
               headers: dict | None = None) -> list[dict]:
    """Every prompt answered by ``version`` (seed + i for prompt i), ``streams`` requests at a time.
    ``headers`` carry the operator token: only an operator may ask for a candidate the gate rejected."""
    out: list[dict | None] = [None] * len(prompts)
    todo = iter(range(len(prompts)))
    lock = threading.Lock()
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(timeout=600, headers=headers) as http:
            while not errors:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                r = http.post(url + "/v1/chat/completions", json={
                    "model": "chatloop", "messages": prompts[i], "max_tokens": max_tokens, "seed": seed + i,
                    "chatloop_adapter": version, "user": "efficacy-judge"})
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:300]}")
                    return
                c = r.json()
                out[i] = {"text": c["choices"][0]["message"]["content"], "tokens": c["usage"]["completion_tokens"],
                          "adapter": c["chatloop_adapter"]}

    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"answering held-out prompts with {version} failed: {errors[0]}")
    assert all(o is not None and o["adapter"] == version for o in out)
    return out  # type: ignore[return-value]


def judge(oracle, prompts: list, replies: list[dict]) -> dict[str, Any]:
    scores = [oracle.score(p, r["text"]) for p, r in zip(prompts, replies)]
    liked = [int(s >= oracle.threshold) for s in scores]
    return {"liked_pct": 100.0 * sum(liked) / len(liked), "liked": liked, "texts": [r["text"] for r in replies],
            "mean_score": sum(scores) / len(scores),
            "mean_tokens": sum(r["tokens"] for r in replies) / len(replies)}


def uncapped_length(url: str, prompts: list, version: str, args: argparse.Namespace,
                    headers: dict | None = None) -> float | None:
    """Mean reply tokens of ``version`` on ``prompts`` when replies may run to --length-max-tokens."""
    if not prompts:
        return None
    replies = answer_all(url, prompts, version, args.length_max_tokens, args.seed, args.streams, headers)
    return sum(r["tokens"] for r in replies) / len(replies)


def lift_se_points(before: list[int], after: list[int]) -> float:
    """Standard error of the lift in points, from the per-prompt paired differences (after - before
    on the same prompt and seed): std(d) / sqrt(n) * 100."""
    d = [a - b for a, b in zip(after, before)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return 100.0 * (var / n) ** 0.5


def service_env(settings: list[str]) -> dict[str, str]:
    """``section.key=value`` settings (as in chatloop.toml) as the service's environment variables."""
    env = dict(SERVICE_ENV)
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set wants section.key=value, got {item!r}")
        env["CHATLOOP_" + key.strip().upper().replace(".", "__")] = value.strip()
    return env


def plot(results: dict[str, Any], before: dict[str, Any], oracle_name: str, n_prompts: int, path: Path) -> None:
    """Left: the share of held-out replies the oracle likes (error bars: one binomial standard
    error); right: mean reply length at the cap and uncapped. Each bar names the gate's verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(results)
    labels = ["before"] + [f"{a}\n({results[a]['gate']})" for a in algos]
    shares = [before["liked_pct"]] + [results[a]["after"] for a in algos]
    errors = [100 * ((p / 100) * (1 - p / 100) / n_prompts) ** 0.5 for p in shares]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.bar(labels, shares, yerr=errors, capsize=4, color=["grey"] + ["tab:blue"] * len(algos))
    ax1.set_ylabel(f"held-out replies the {oracle_name} oracle likes (%)")
    ax1.set_ylim(0, 100)
    x = list(range(len(labels)))
    capped = [before["mean_tokens"]] + [results[a]["mean_tokens"] for a in algos]
    ax2.bar([i - 0.2 for i in x], capped, width=0.4, color="tab:orange", label="capped (--max-tokens)")
    if before.get("uncapped_tokens"):
        uncapped = [before["uncapped_tokens"]] + [results[a]["uncapped_tokens"] for a in algos]
        ax2.bar([i + 0.2 for i in x], uncapped, width=0.4, color="tab:green", label="uncapped")
    ax2.set_xticks(x, labels)
    ax2.set_ylabel("mean reply length (tokens)")
    ax2.set_ylim(0, ax2.get_ylim()[1] * 1.25)  # room for the legend above the bars
    ax2.legend(loc="upper left", ncol=2)
    fig.suptitle(f"one retraining cycle of each algorithm, from the same simulated feedback ({n_prompts} prompts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--oracle", default="sentiment", help="sentiment | concise | module:function")
    ap.add_argument("--prompts", help="prompts file (default: the oracle's own)")
    ap.add_argument("--events", type=int, default=400)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--ab-fraction", type=float, default=0.5)
    ap.add_argument("--eval-prompts", type=int, default=150)
    ap.add_argument("--length-prompts", type=int, default=30,
                    help="held-out prompts answered without the --max-tokens cap (up to --length-max-tokens), "
                         "so that the length check also sees replies that grow")
    ap.add_argument("--length-max-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=48, help="reply length, in feedback and in evaluation")
    ap.add_argument("--algos", default="dpo,kto,ppo,rloo")
    ap.add_argument("--model", default="default")
    ap.add_argument("--streams", type=int, default=8, help="concurrent evaluation requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", help="keep the service's data here (default: a fresh temporary directory)")
    ap.add_argument("--reuse-feedback", action="store_true",
                    help="skip the base's evaluation and the simulated feedback: reuse what an earlier run with "
                         "the same --data-dir and settings measured (to compare training settings on one log)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a service setting for this run, e.g. training.learning_rate=1e-4 (repeatable)")
    ap.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "efficacy.png"))
    ap.add_argument("--replies", help="write every held-out reply (base and each candidate) to this JSON file, "
                                      "to read them or replay them (tests/fixtures/relevance was made so)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    oracle = load_oracle(args.oracle)
    try:
        held = load_prompts(oracle, "heldout", args.prompts)[: args.eval_prompts]
        train = load_prompts(oracle, "train", args.prompts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        env = service_env(args.set)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="chatloop-efficacy-")) / "data"
    saved = data / "efficacy-feedback.json"  # what an earlier run with this data directory measured
    # the base's scores and the feedback depend only on these; --reuse-feedback checks they match
    plan = {"oracle": oracle.name, "prompts": args.prompts, "eval_prompts": len(held), "max_tokens": args.max_tokens,
            "seed": args.seed, "length_prompts": args.length_prompts, "length_max_tokens": args.length_max_tokens,
            "events": args.events, "users": args.users, "ab_fraction": args.ab_fraction, "model": args.model}
    reuse = None
    if args.reuse_feedback:
        if not saved.is_file() or json.loads(saved.read_text())["plan"] != plan:
            print(f"error: --reuse-feedback needs {saved} from an earlier run with the same settings", file=sys.stderr)
            return 2
        reuse = json.loads(saved.read_text())
    t_all = time.perf_counter()
    server = start_server(data, args.model, timeout=900, extra_env=env, quick=False)
    admin = {"Authorization": f"Bearer {server.token}"}
    http = httpx.Client(base_url=server.url, headers=admin, timeout=None)
    try:
        if reuse:
            before, sim = reuse["before"], SimpleNamespace(**reuse["feedback"])
            print(f"reusing the base's scores and {sim.events} feedback events from {saved}", file=sys.stderr)
        else:
            t0 = time.perf_counter()
            before = judge(oracle, held, answer_all(server.url, held, "base", args.max_tokens, args.seed,
                                                    args.streams))
            before["uncapped_tokens"] = uncapped_length(server.url, held[: args.length_prompts], "base", args)
            print(f"before: { {k: v for k, v in before.items() if k not in ('liked', 'texts')} } ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)

            from tqdm import tqdm

            with tqdm(total=args.events, desc="simulated feedback", unit="ev", file=sys.stderr) as bar:
                report = simulate(server.url, oracle, train, args.users, args.events, args.ab_fraction,
                                  args.max_tokens, args.seed, on_event=lambda r: bar.update(r.events - bar.n))
            print(f"feedback: {report.as_dict()}", file=sys.stderr)
            saved.write_text(json.dumps({"plan": plan, "before": before, "feedback": report.as_dict()}))
            sim = SimpleNamespace(**report.as_dict())

        results: dict[str, Any] = {}
        replies: dict[str, Any] = {"oracle": oracle.name, "prompts": args.prompts, "split": "heldout",
                                   "max_tokens": args.max_tokens, "base": before.get("texts")}
        for algo in algos:
            http.post("/admin/adapters/base/activate").raise_for_status()
            t0 = time.perf_counter()
            r = http.post("/admin/retrain", json={"algo": algo, "wait": True})
            cycle_s = time.perf_counter() - t0
            if r.status_code >= 400:
                print(f"{algo}: the cycle was refused: {r.text[:300]}", file=sys.stderr)
                try:
                    message = r.json().get("error", {}).get("message", r.text)
                except ValueError:  # not JSON
                    message = r.text
                results[algo] = {"error": message, "events": sim.events, "cycle_s": round(cycle_s, 1)}
                continue
            run = r.json()
            version = run.get("candidate_version")
            if run["status"] == "failed" or not version:
                results[algo] = {"error": run.get("error"), "events": sim.events, "cycle_s": round(cycle_s, 1)}
                continue
            after = judge(oracle, held, answer_all(server.url, held, version, args.max_tokens, args.seed, args.streams,
                                                    admin))
            uncapped = uncapped_length(server.url, held[: args.length_prompts], version, args, admin)
            replies[algo] = {"texts": after["texts"], "gate": run["status"], "settings": args.set}
            m = run.get("metrics") or {}
            results[algo] = {
                "before": round(before["liked_pct"], 2), "after": round(after["liked_pct"], 2),
                "lift_points": round(after["liked_pct"] - before["liked_pct"], 2),
                "lift_se": round(lift_se_points(before["liked"], after["liked"]), 2),
                "kl_to_base": (m.get("judge") or {}).get("kl_to_base"),
                "relevance": (m.get("judge") or {}).get("relevance"),
                "register": (m.get("judge") or {}).get("register"),
                "document": (m.get("judge") or {}).get("document"),
                "length_ratio": round(after["mean_tokens"] / max(before["mean_tokens"], 1e-9), 3),
                "uncapped_length_ratio": (round(uncapped / before["uncapped_tokens"], 3)
                                          if uncapped and before.get("uncapped_tokens") else None),
                "uncapped_tokens": uncapped,
                "events": sim.events, "cycle_s": round(cycle_s, 1),
                "mean_score_before": round(before["mean_score"], 4), "mean_score_after": round(after["mean_score"], 4),
                "mean_tokens": round(after["mean_tokens"], 1), "version": version, "gate": run["status"],
                "train_examples": run.get("n_pairs"), "verdict": run.get("verdict"),
                # optimisation steps taken, and the one whose weights were kept (held-out selection)
                "steps": m.get("steps"), "selected_step": (m.get("selection") or {}).get("best_step"),
                "settings": args.set,
            }
            print(f"{algo}: {results[algo]}", file=sys.stderr)
    finally:
        http.close()
        stop_server(server)

    print(f"oracle {oracle.name}: {len(held)} held-out prompts, {sim.events} feedback events "
          f"({sim.thumbs_up} up, {sim.thumbs_down} down, {sim.ab} A/B of which {sim.ties} ties) in {sim.wall_s:.0f} s; "
          f"before: {before['liked_pct']:.1f}% liked, mean score {before['mean_score']:.3f}, "
          f"{before['mean_tokens']:.1f} tokens; total {time.perf_counter() - t_all:.0f} s")
    cols = ["before", "after", "lift_points", "lift_se", "mean_score_after", "kl_to_base", "length_ratio",
            "uncapped_length_ratio", "cycle_s", "gate"]
    print(f"{'algo':<6}" + "".join(f"{c:>23}" for c in cols))
    for algo, res in results.items():
        if "error" in res:
            print(f"{algo:<6}  error: {res['error']}")
            continue
        print(f"{algo:<6}" + "".join(f"{res[c] if not isinstance(res[c], float) else round(res[c], 4)!s:>23}"
                                     for c in cols))
    if args.replies:
        Path(args.replies).write_text(json.dumps(replies, indent=1))
        print(f"replies: {args.replies}")
    ok = {a: r for a, r in results.items() if "error" not in r}
    if ok and args.plot:
        plot(ok, before, oracle.name, len(held), Path(args.plot))
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
