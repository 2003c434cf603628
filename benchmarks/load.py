"""Load on a real service: simulated users chat and rate for a while on loopback while an
operator activates another adapter version every minute, and one hostile client attacks.

Each honest user has its own API key (as distinct clients would; they all share the loopback
address here) and loops: a chat request (streamed), then a thumb on the reply, and every third
turn a second reply to the same prompt and an A/B vote. Counts requests, failures (any non-2xx,
or a stream that breaks), acknowledged feedback vs rows in the store at the end, and latency.

The hostile client (``--no-hostile`` leaves it out) has no key and takes a new identity (a new
``user`` and no cookie, or a forged cookie) for every attempt, in turn: degenerate sampling
settings inside the accepted ranges, a stream it hangs up on after two chunks, and two replies
with an A/B vote for the worse one (feedback poisoning). Its figures: what it was answered, how
many identities the service admitted, and how many of its votes the training snapshot holds.

    python benchmarks/load.py [--users 16] [--minutes 5] [--model default] [--json]

With --json the last line is one JSON object with requests, failures (honest users only),
acked_feedback, stored_feedback, lost_feedback, p50_ms, p95_ms, and ``hostile`` (its figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from _report import print_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import start_server, stop_server  # noqa: E402 - the tests' way of starting `chatloop serve`

PROMPTS = ["Tell me a fun fact about owls.", "How do I boil an egg?", "Write a haiku about rain.",
           "What is the capital of France?", "Give me a tip for learning Python.", "Why is the sky blue?"]


def make_adapters(model_path: str, out: Path, n: int) -> list[Path]:
    """Small random LoRA adapters of the served model (what a retraining cycle would publish)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_path)
        peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        peft.save_pretrained(out / f"a{i}")
        dirs.append(out / f"a{i}")
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True,
                    help="run one hostile client beside the honest users")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="chatloop-load-"))
    server = start_server(tmp / "data", args.model, timeout=600, quick=False, extra_env={
        "CHATLOOP_LIMITS__CHAT_PER_MINUTE": "0", "CHATLOOP_LIMITS__FEEDBACK_PER_MINUTE": "0",
        "CHATLOOP_GENERATION__MAX_TOKENS": str(args.max_tokens)})
    admin = {"Authorization": f"Bearer {server.token}"}
    keys = [httpx.post(server.url + "/admin/keys", headers=admin, json={"name": f"load user {u}"}).json()["key"]
            for u in range(args.users)]
    lock = threading.Lock()
    stats = {"requests": 0, "failures": 0, "acked_feedback": 0, "chats": 0}
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + args.minutes * 60

    def count(ok: bool, what: str, ms: float | None = None) -> None:
        with lock:
            stats["requests"] += 1
            if not ok:
                stats["failures"] += 1
                errors.append(what)
            elif ms is not None:
                latencies.append(ms)

    def chat(client: httpx.Client, user: str, prompt: str) -> str | None:  # an honest user's
        t0 = time.perf_counter()
        msg_id, text = None, ""
        try:
            with client.stream("POST", "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": prompt}], "stream": True, "user": user}) as r:
                if r.status_code != 200:
                    count(False, f"chat {r.status_code}: {r.read()[:200]!r}")
                    return None
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            count(False, f"chat stream error: {obj['error']}")
                            return None
                        msg_id = obj["id"]
                        text += obj["choices"][0]["delta"].get("content", "")
        except httpx.HTTPError as exc:
            count(False, f"chat: {exc!r}")
            return None
        count(True, "chat", (time.perf_counter() - t0) * 1000)
        with lock:
            stats["chats"] += 1
        return msg_id

    def post(client: httpx.Client, path: str, body: dict) -> bool:
        t0 = time.perf_counter()
        try:
            r = client.post(path, json=body)
        except httpx.HTTPError as exc:
            count(False, f"{path}: {exc!r}")
            return False
        count(r.status_code == 200, f"{path} {r.status_code}: {r.text[:200]}", (time.perf_counter() - t0) * 1000)
        return r.status_code == 200

    def user_loop(u: int) -> None:
        user = f"load{u}"  # only a label: the key is the identity
        with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {keys[u]}"}) as client:
            turn = 0
            while time.monotonic() < stop_at:
                prompt = PROMPTS[(u + turn) % len(PROMPTS)]
                first = chat(client, user, prompt)
                if first and post(client, "/v1/feedback", {"message_id": first, "rating": 1 if turn % 2 else -1,
                                                           "user": user, "reason": "load test"}):
                    with lock:
                        stats["acked_feedback"] += 1
                if first and turn % 3 == 0:
                    second = chat(client, user, prompt)
                    if second and post(client, "/v1/comparisons", {"message_a": first, "message_b": second,
                                                                    "choice": "a", "user": user}):
                        with lock:
                            stats["acked_feedback"] += 1
                turn += 1

    hostile: dict = {"attempts": 0, "answers": {}, "hangups": 0, "votes_acked": 0}
    # inside every accepted range, but numerically degenerate (issue 19, item 1)
    degenerate = [{"temperature": 1e-40}, {"temperature": 5e-324, "top_p": 5e-324}, {"top_p": 1e-300, "top_k": 1},
                  {"temperature": 2.0, "repetition_penalty": 1e-9}, {"temperature": 1e-300, "seed": 2**63 - 1}]

    def hostile_loop() -> None:
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            cookies = {"chatloop_uid": f"{'A' * 22}.forged{i}"} if i % 2 else None  # a forged cookie, or none
            with httpx.Client(base_url=server.url, timeout=120, cookies=cookies) as client:
                user = f"sock{i}"
                body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "user": user}
                try:
                    kind = i % 3
                    if kind == 0:
                        r = client.post("/v1/chat/completions", json={**body, **degenerate[i % len(degenerate)]})
                        codes = [r.status_code]
                    elif kind == 1:
                        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                                                 "max_tokens": 1024}) as r:
                            codes = [r.status_code]
                            for n, _ in enumerate(r.iter_lines()):
                                if n >= 3:
                                    break  # leaving the block closes the socket mid-stream
                        with lock:
                            hostile["hangups"] += 1
                    else:
                        a, b = (client.post("/v1/chat/completions", json={**body, "seed": s}) for s in (1, 2))
                        codes = [a.status_code, b.status_code]
                        if a.status_code == b.status_code == 200:
                            v = client.post("/v1/comparisons", json={"message_a": a.json()["id"], "user": user,
                                                                     "message_b": b.json()["id"], "choice": "b"})
                            codes.append(v.status_code)
                            with lock:
                                hostile["votes_acked"] += v.status_code == 200
                except httpx.HTTPError as exc:
                    codes = [type(exc).__name__]
            with lock:
                hostile["attempts"] += 1
                for c in codes:
                    hostile["answers"][str(c)] = hostile["answers"].get(str(c), 0) + 1
            if codes and codes[0] == 429:
                time.sleep(0.2)  # refused at the door: try the next identity a moment later

    try:
        converted = sorted((tmp / "data" / "models").glob("*/config.json"))  # the default model, converted
        source = str(converted[0].parent) if converted else args.model
        adapter_dirs = make_adapters(source, tmp / "adapters-src", max(1, int(args.minutes)))
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from chatloop.adapters import AdapterRegistry

        registry = AdapterRegistry(tmp / "data" / "adapters")  # publishing is a file operation
        threads = [threading.Thread(target=user_loop, args=(u,), daemon=True) for u in range(args.users)]
        if args.hostile:
            threads.append(threading.Thread(target=hostile_loop, daemon=True))
        for t in threads:
            t.start()
        activations = []
        bar = tqdm(total=int(args.minutes * 60), desc="load", unit="s")
        next_swap, k = time.monotonic() + 60, 0
        while time.monotonic() < stop_at:
            time.sleep(1)
            bar.update(1)
            bar.set_postfix(requests=stats["requests"], failures=stats["failures"])
            if time.monotonic() >= next_swap and k < len(adapter_dirs):
                version = registry.publish(adapter_dirs[k], {"parent": "base", "algorithm": "load-test"})
                t0 = time.perf_counter()
                r = httpx.post(server.url + f"/admin/adapters/{version}/activate", headers=admin, timeout=120)
                activations.append({"version": version, "status": r.status_code,
                                    "ms": round((time.perf_counter() - t0) * 1000, 1)})
                next_swap, k = next_swap + 60, k + 1
        bar.close()
        for t in threads:
            t.join(300)
        stored = httpx.post(server.url + "/admin/sql", headers=admin, timeout=60, json={
            "sql": "SELECT (SELECT count(*) FROM feedback_events WHERE user_id LIKE 'key:%') "  # the honest users'
                   "+ (SELECT count(*) FROM comparisons WHERE user_id LIKE 'key:%')"}).json()
        stored_feedback = stored["rows"][0][0]
        by_version = httpx.post(server.url + "/admin/sql", headers=admin, timeout=60, json={
            "sql": "SELECT adapter_version, count(*) FROM generations GROUP BY 1 ORDER BY 1"}).json()["rows"]
        admitted = httpx.post(server.url + "/admin/sql", headers=admin, timeout=60, json={
            "sql": "SELECT count(DISTINCT user_id) FROM conversations WHERE user_id NOT LIKE 'key:%'"}).json()
        hostile["identities_admitted"] = admitted["rows"][0][0]
        snapshot = httpx.get(server.url + "/admin/export", headers=admin, timeout=120,
                             params={"what": "pairs", "format": "jsonl"}).text.splitlines()
        hostile["pairs_in_snapshot"] = sum(not json.loads(line)["user_id"].startswith("key:") for line in snapshot)
        hostile["pairs_in_snapshot_total"] = len(snapshot)
    finally:
        stop_server(server)
    latencies.sort()
    result = {
        "users": args.users, "minutes": args.minutes, "requests": stats["requests"], "failures": stats["failures"],
        "chats": stats["chats"], "acked_feedback": stats["acked_feedback"], "stored_feedback": stored_feedback,
        "lost_feedback": stats["acked_feedback"] - stored_feedback,
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
        "activations": len(activations), "activation_failures": sum(a["status"] != 200 for a in activations),
        "replies_by_version": {v: n for v, n in by_version},
    }
    if args.hostile:
        result["hostile"] = hostile
    if errors:
        result["first_errors"] = errors[:3]
    print_report(result, args.json)


if __name__ == "__main__":
    main()
