"""Oracles (VADER sentiment, concise, any module:function), their prompts with the fixed split, and
simulated users that chat and rate a live service through its public HTTP API only."""

from __future__ import annotations

import json

import httpx
import pytest

from chatloop import oracles
from chatloop.oracles import load_oracle, load_prompts
from chatloop.simulate import Client, SimReport, SimulationError, simulate
from conftest import ADMIN_TOKEN, SHARED_DATA


def length_oracle(context, reply):  # a module:function oracle for the tests: longer is better
    return float(len(reply))


def test_sentiment_and_concise_oracles_score_the_way_people_would():
    s = load_oracle("sentiment")
    good, bad = "A wonderful, moving film; I loved every minute.", "Boring, ugly and a total waste of time."
    assert s.score([], good) > 0.5 and s.score([], bad) < -0.5
    assert s.likes([], good) and not s.likes([], bad) and s.choose([], bad, good) == "b"
    c = load_oracle("concise")
    short, long_ = "Paris.", "Well, " + "it is a long story about many things " * 5 + "and Paris."
    assert c.score([], short) > c.score([], long_) and c.likes([], short) and not c.likes([], long_)
    assert c.score([], "Paris is the capital") < c.score([], "Paris is the capital.")  # cut off scores half
    assert c.score([], "   ") == 0.0 and c.choose([], "Paris.", "Paris.") == "tie"


def test_oracle_by_module_function_and_clear_errors():
    o = load_oracle("test_simulate:length_oracle", threshold=3)
    assert o.score([], "abcd") == 4.0 and o.likes([], "abc") and not o.likes([], "ab")
    for bad in ("nope", "no_such_module_xyz:f", "test_simulate:missing", "json:__doc__"):
        with pytest.raises(ValueError):
            load_oracle(bad)
    with pytest.raises(ValueError, match="prompts file"):
        load_prompts(o, "train")


def test_prompt_files_follow_the_fixed_split(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(f"question {i}" for i in range(12)) + "\n\n")
    o = load_oracle("concise")
    held = load_prompts(o, "heldout", txt)
    train = load_prompts(o, "train", txt)
    assert [p[0]["content"] for p in held] == ["question 0", "question 5", "question 10"] and len(train) == 9
    assert oracles.review_opening("Great<br /><br />movie &amp; cast, " + "word " * 30, 4) == "Great movie & cast,"
    assert oracles.review_opening("So\x85 bad\x00 it is good", 5) == "So bad it is good"  # the service refuses controls
    with pytest.raises(ValueError, match="not found"):
        load_prompts(o, "train", tmp_path / "missing.txt")


@pytest.mark.skipif(not (SHARED_DATA / "imdb_reviews.csv").is_file(), reason="../shared/data is not beside this checkout")
def test_imdb_prompts_are_review_openings_with_every_fifth_row_held_out():
    s = load_oracle("sentiment")
    held, train = load_prompts(s, "heldout"), load_prompts(s, "train")
    assert len(held) == 498 and len(train) == 2486 - 498
    assert held[0][0]["content"].startswith("Continue this movie review: One of the other reviewers")
    import csv

    with open(SHARED_DATA / "imdb_reviews.csv", newline="") as fh:
        rows = [r["review"] for r in csv.DictReader(fh)]
    assert train[0][0]["content"].endswith(oracles.review_opening(rows[1]))  # row 1 trains, row 0 is held out
    assert held[1][0]["content"].endswith(oracles.review_opening(rows[5]))
    assert all("<br" not in p[0]["content"] for p in held + train)


def test_client_waits_out_429_with_retry_after():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"message": "slow down"}})
        return httpx.Response(200, json={"ok": True})

    import threading

    report = SimReport()
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = Client("http://sim.invalid", "u1", http, report, threading.Lock())
        assert client.post("/v1/feedback", {"rating": 1}) == {"ok": True}
    assert report.retries == 2 and all(c["user"] == "u1" for c in calls)

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "unknown message 'x'"}})

    with httpx.Client(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(SimulationError, match="404: unknown message"):
            Client("http://sim.invalid", "u1", http, report, threading.Lock()).post("/v1/feedback", {})


def _sql(server, query):
    r = httpx.post(server.url + "/admin/sql", json={"sql": query}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200, r.text
    return r.json()["rows"]


def test_simulated_users_rate_a_live_service_the_way_their_oracle_says(live_server, tmp_path):
    oracle = load_oracle("test_simulate:length_oracle", threshold=30)
    prompts = [[{"role": "user", "content": f"tell me about {w}"}] for w in ("cats", "dogs", "rain", "tea")]
    report = simulate(live_server.url, oracle, prompts, users=3, events=10, ab_fraction=0.5, max_tokens=12, seed=1)
    assert report.events == 10 and report.ab + report.thumbs_up + report.thumbs_down == 10
    assert report.replies == 2 * report.ab + report.thumbs_up + report.thumbs_down and report.versions == {"base": report.replies}
    # the log holds exactly what the oracle decided, under the simulated users' own ids
    thumbs = _sql(live_server, "SELECT f.user_id, f.rating, m.content FROM feedback_events f"
                               " JOIN messages m ON m.id = f.message_id")
    assert len(thumbs) == report.thumbs_up + report.thumbs_down
    for user, rating, content in thumbs:
        assert user.startswith("api:sim-test_simulate.length_oracle-")
        assert rating == (1 if len(content) >= 30 else -1)
    votes = _sql(live_server, "SELECT c.choice, ma.content, mb.content FROM comparisons c"
                              " JOIN messages ma ON ma.id = c.message_a JOIN messages mb ON mb.id = c.message_b")
    assert len(votes) == report.ab
    for choice, a, b in votes:
        assert choice == ("a" if len(a) > len(b) else "b" if len(b) > len(a) else "tie")


def test_simulate_cli_against_a_live_service_and_its_errors(live_server, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"question number {i}?" for i in range(10)))
    done = live_server.cli("simulate", "--url", live_server.url, "--oracle", "concise", "--prompts", str(prompts),
                           "--users", "2", "--events", "4", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["events"] == 4 and "feedback events" in done.stderr
    bad = live_server.cli("simulate", "--url", live_server.url, "--oracle", "nope")
    assert bad.returncode != 0 and "unknown oracle" in bad.stderr
    gone = live_server.cli("simulate", "--url", "http://127.0.0.1:9", "--events", "1")
    assert gone.returncode != 0 and "no chatloop service" in gone.stderr


def test_efficacy_benchmark_end_to_end_then_reusing_its_feedback(tiny_model_dir, tmp_path):
    """benchmarks/efficacy.py as an operator runs it: a real service, simulated feedback, a DPO cycle,
    the JSON line the issue asks for and a plot; then the same log reused for another setting."""
    import subprocess
    import sys

    from conftest import REPO

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"What is {w}?" for w in ("tea", "rain", "a cat", "a dog", "snow", "wind", "fog",
                                                            "a map", "a pen", "salt", "sand", "ice", "a bus",
                                                            "a tree", "a song")))
    data = tmp_path / "data"

    def bench(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "efficacy.py"), "--oracle", "concise", "--prompts", str(prompts),
             "--model", str(tiny_model_dir), "--events", "16", "--users", "2", "--eval-prompts", "3",
             "--length-prompts", "2", "--length-max-tokens", "12", "--max-tokens", "6", "--algos", "dpo",
             "--data-dir", str(data), "--plot", str(tmp_path / "efficacy.png"),
             "--set", "training.min_pairs=2", "--set", "training.gate_reward_model=false", "--json", *extra],
            capture_output=True, text=True, timeout=900, cwd=REPO)

    done = bench()
    assert done.returncode == 0, done.stderr[-3000:]
    dpo = json.loads(done.stdout.strip().splitlines()[-1])["dpo"]
    for key in ("before", "after", "lift_points", "kl_to_base", "length_ratio", "events", "cycle_s"):
        assert key in dpo, (key, dpo)
    assert dpo["events"] == 16 and 0 <= dpo["before"] <= 100 and 0 <= dpo["after"] <= 100
    assert dpo["lift_points"] == pytest.approx(dpo["after"] - dpo["before"], abs=0.02)
    assert dpo["gate"] in ("promoted", "rejected") and dpo["steps"] >= 1 and dpo["cycle_s"] > 0
    assert (tmp_path / "efficacy.png").stat().st_size > 10_000
    # it measures the product's defaults: nothing of the test suite's quick settings (lr 1e-3) leaks in
    from chatloop.config import TrainingDefaults

    job = json.loads(next((data / "runs").glob("run-*/job.json")).read_text())
    assert job["settings"]["learning_rate"] == TrainingDefaults().learning_rate
    assert job["settings"]["max_reply_tokens"] == TrainingDefaults().max_reply_tokens
    again = bench("--reuse-feedback", "--set", "training.beta=0.2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the base's scores and 16 feedback events" in again.stderr
    redo = json.loads(again.stdout.strip().splitlines()[-1])["dpo"]
    assert redo["before"] == dpo["before"] and redo["settings"][-1] == "training.beta=0.2"
    other = bench("--reuse-feedback", "--events", "17")  # a different plan cannot reuse the log
    assert other.returncode == 2 and "needs" in other.stderr
