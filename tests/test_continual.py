"""benchmarks/continual.py as an operator runs it, on a tiny model: a real service, a feedback
schedule added through the API (no operator starts a cycle), simulated users rating the served
version round after round, the JSON line and the plot."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_continual_benchmark_runs_unattended_rounds_through_a_schedule(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"What is {w}?" for w in ("tea", "rain", "a cat", "a dog", "snow", "wind", "fog",
                                                            "a map", "a pen", "salt", "sand", "ice", "a bus",
                                                            "a tree", "a song")))
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "continual.py"), "--oracle", "concise", "--prompts", str(prompts),
         "--model", str(tiny_model_dir), "--rounds", "2", "--events-per-round", "10", "--users", "2",
         "--eval-prompts", "3", "--max-tokens", "6", "--data-dir", str(tmp_path / "data"),
         "--plot", str(tmp_path / "continual.png"), "--replies", str(tmp_path / "replies.jsonl"),
         "--set", "schedule_poll_seconds=1",
         "--set", "training.min_pairs=2", "--set", "training.gate_reward_model=false", "--json"],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("base_liked_pct", "rounds", "final_liked_pct", "total_lift_points", "regressions_promoted", "wall_s"):
        assert key in result, key
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        for key in ("liked_pct", "lift_se", "verdict", "promoted", "kl_to_base", "relevance", "served_version",
                    "cycle_s"):
            assert key in r, key
        assert r["events"] == 10 and r["status"] in ("promoted", "rejected") and r["candidate_version"]
        assert r["promoted"] == (r["served_version"] == r["candidate_version"])
    # round 2's users rated what round 1 left being served (on-policy)
    assert set(rounds[1]["rated_versions"]) == {rounds[0]["served_version"]}
    assert result["final_liked_pct"] == rounds[-1]["liked_pct"]
    assert (tmp_path / "continual.png").stat().st_size > 10_000
    # every evaluated version's held-out replies, to read: base before round 1, then each round's
    replies = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert [r["round"] for r in replies[:3]] == [0, 0, 0] and {r["round"] for r in replies} <= {0, 1, 2}
    assert all(set(r) == {"round", "version", "prompt", "reply", "liked"} for r in replies)
    # the cycles were the schedule's, not an operator's
    from chatloop.store import Store

    store = Store(tmp_path / "data" / "chatloop.duckdb")
    try:
        triggers = [r["trigger"] for r in store.list_runs(10)]
    finally:
        store.close()
    assert len(triggers) == 2 and all(t.startswith("feedback:schedule-") for t in triggers)
