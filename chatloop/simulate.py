"""Simulated users: oracle-driven clients that chat and rate through a service's public HTTP API.

Owns: the simulated traffic loop. Each of N users is a thread with its own user id; together they
make K feedback events, each either a thumb (one reply, rated up when the oracle likes it) or an
A/B choice (two replies to the same prompt, the oracle's preferred one chosen). They call only
``/v1/chat/completions``, ``/v1/feedback`` and ``/v1/comparisons``, as any client would, and wait
out a 429 or 503 for as long as ``Retry-After`` says.

Invariants: nothing here touches the database or the model; the draw of prompts and event kinds
is reproducible from the seed (which replies come back depends on the service).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from chatloop.oracles import Context, Oracle


class SimulationError(RuntimeError):
    pass


@dataclass
class SimReport:
    events: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    ab: int = 0
    ties: int = 0
    replies: int = 0
    retries: int = 0
    scores: list[float] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "scores"}
        d["mean_score"] = sum(self.scores) / len(self.scores) if self.scores else None
        return d


class Client:
    """One simulated user's HTTP calls, retrying on 429/503 after ``Retry-After``."""

    def __init__(self, url: str, user: str, http: httpx.Client, report: SimReport, lock: threading.Lock,
                 max_wait_s: float = 120.0):
        self.url, self.user, self.http, self.report, self.lock = url.rstrip("/"), user, http, report, lock
        self.max_wait_s = max_wait_s

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + self.max_wait_s
        while True:
            r = self.http.post(self.url + path, json={**body, "user": self.user})
            if r.status_code in (429, 503) and time.monotonic() < deadline:
                with self.lock:
                    self.report.retries += 1
                time.sleep(min(float(r.headers.get("Retry-After", "1")), max(0.0, deadline - time.monotonic())))
                continue
            if r.status_code >= 400:
                try:
                    message = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = r.text[:300]
                raise SimulationError(f"POST {path} answered {r.status_code}: {message}")
            return r.json()

    def reply(self, context: Context, max_tokens: int, seed: int) -> tuple[str, str, str]:
        """(message id, text, adapter version) of a new reply to ``context``."""
        c = self.post("/v1/chat/completions", {"model": "chatloop", "messages": context,
                                                "max_tokens": max_tokens, "seed": seed})
        with self.lock:
            self.report.replies += 1
            v = c.get("chatloop_adapter", "?")
            self.report.versions[v] = self.report.versions.get(v, 0) + 1
        return c["id"], c["choices"][0]["message"]["content"], c.get("chatloop_adapter", "?")


def simulate(url: str, oracle: Oracle, prompts: list[Context], users: int = 8, events: int = 100,
             ab_fraction: float = 0.5, max_tokens: int = 48, seed: int = 0,
             on_event: Callable[[SimReport], None] = lambda r: None, timeout_s: float = 300.0) -> SimReport:
    """Run ``events`` feedback events from ``users`` concurrent simulated users; returns the tally."""
    if users < 1 or events < 1:
        raise ValueError("users and events must be at least 1")
    if not 0.0 <= ab_fraction <= 1.0:
        raise ValueError("ab_fraction must be between 0 and 1")
    if not prompts:
        raise ValueError("no prompts to ask")
    rng = random.Random(seed)
    # the whole plan is drawn up front, so it does not depend on thread timing
    plan = [(rng.choice(prompts), rng.random() < ab_fraction, rng.randrange(2**31)) for _ in range(events)]
    report, lock = SimReport(), threading.Lock()
    next_event = iter(range(events))
    errors: list[BaseException] = []
    t0 = time.perf_counter()

    def run_user(k: int) -> None:
        with httpx.Client(timeout=timeout_s) as http:
            client = Client(url, f"sim-{oracle.name.replace(':', '.')}-{k}", http, report, lock)
            while not errors:
                with lock:
                    i = next(next_event, None)
                if i is None:
                    return
                context, is_ab, s = plan[i]
                try:
                    one_event(client, oracle, context, is_ab, s, max_tokens)
                except BaseException as exc:  # stop everyone: a broken service is not a statistic
                    errors.append(exc)
                    return
                with lock:
                    report.events += 1
                on_event(report)

    threads = [threading.Thread(target=run_user, args=(k,), name=f"sim-user-{k}", daemon=True) for k in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.wall_s = time.perf_counter() - t0
    if errors:
        raise SimulationError(f"simulation stopped after {report.events} events: {errors[0]}") from errors[0]
    return report


def one_event(client: Client, oracle: Oracle, context: Context, is_ab: bool, seed: int, max_tokens: int) -> None:
    """One thumb (one reply) or one A/B choice (two replies to the same prompt), tallied in the
    client's shared report."""
    report, lock = client.report, client.lock
    if not is_ab:
        mid, text, _ = client.reply(context, max_tokens, seed)
        score = oracle.score(context, text)
        up = score >= oracle.threshold
        client.post("/v1/feedback", {"message_id": mid, "rating": 1 if up else -1,
                                     "reason": f"oracle {oracle.name}: {score:.3f}"})
        with lock:
            report.scores.append(score)
            report.thumbs_up += up
            report.thumbs_down += not up
        return
    (ma, ta, _), (mb, tb, _) = client.reply(context, max_tokens, seed), client.reply(context, max_tokens, seed + 1)
    choice = oracle.choose(context, ta, tb)
    client.post("/v1/comparisons", {"message_a": ma, "message_b": mb, "choice": choice})
    with lock:
        report.scores += [oracle.score(context, ta), oracle.score(context, tb)]
        report.ab += 1
        report.ties += choice == "tie"
