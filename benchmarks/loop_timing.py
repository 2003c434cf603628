"""Timing of the loop on the default model (CPU or GPU): model load on first and second start,
and the wall time of one DPO retraining cycle on N preference pairs from HH-RLHF's training
split (held-out lines i % 5 == 0 are never used).

    python benchmarks/loop_timing.py [--pairs 50] [--second-cycle] [--json]

Prints a table, and with --json a last line holding one JSON object with the keys
first_load_s, second_load_s, load_ratio, retrain_s, pairs, train_pairs, eval_pairs, steps,
pairs_per_s, first_loss, final_loss, verdict, timings (and second_retrain_s with --second-cycle:
a second cycle on the same data, whose gate reuses the first cycle's reward model).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

from _report import print_report
from chatloop.adapters import AdapterRegistry
from chatloop.config import Settings
from chatloop.importers import hh_pairs
from chatloop.loop import Retrainer
from chatloop.models import load_model
from chatloop.store import GenerationRecord, Store

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"


def log_pairs(store: Store, pairs: list[dict]) -> None:
    """Write pairs into the log the way live traffic would: two replies and an A/B choice (one
    rater per pair, so the per-user cap on a snapshot does not apply)."""
    conv = store.new_conversation("bench", "import")
    for k, p in enumerate(pairs):
        ids = [store.record_exchange(conv, GenerationRecord(
            context=p["prompt"], reply=reply, model="hh-rlhf", adapter_version="base", settings={},
            prompt_tokens=0, completion_tokens=0, ttft_ms=None, latency_ms=0, finish_reason="stop"))
            for reply in (p["chosen"], p["rejected"])]
        store.record_comparison(ids[0], ids[1], "a", f"hh-rater-{k}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--model", default="default")
    ap.add_argument("--second-cycle", action="store_true", help="run a second cycle on the same data")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not HH.is_file():
        print(f"error: {HH} not found (the shared data directory sits beside the repository)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        settings = settings.replace(model=args.model)
        t0 = time.perf_counter()
        loaded = load_model(args.model, settings.models_dir, settings.device, settings.dtype)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_model(args.model, settings.models_dir, settings.device, settings.dtype)
        second = time.perf_counter() - t0
        store = Store(settings.db_path)
        log_pairs(store, list(itertools.islice(hh_pairs(HH, "train"), args.pairs)))
        registry = AdapterRegistry(settings.adapters_dir)

        def activate(version, actor, reason):
            registry.set_active(version)

        retrainer = Retrainer(settings, store, registry, loaded.path, activate, registry.active)
        t0 = time.perf_counter()
        run = retrainer.run_cycle("dpo", trigger="benchmark")
        retrain_s = time.perf_counter() - t0
        m = run["metrics"]
        result = {
            "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
            "first_load_s": round(first, 2), "second_load_s": round(second, 2),
            "load_ratio": round(first / max(second, 1e-9), 1),
            "retrain_s": round(retrain_s, 1), "pairs": args.pairs, "train_pairs": m["train_pairs"],
            "eval_pairs": m["eval_pairs"], "steps": m["steps"], "pairs_per_s": round(m["pairs_per_s"], 2),
            "first_loss": round(m["first_loss"], 4), "final_loss": round(m["final_loss"], 4),
            "held_out_accuracy": m["held_out"].get("accuracy"), "verdict": run["verdict"],
            "timings": m.get("timings"),
        }
        if args.second_cycle:  # the same data again: the gate's judge reuses the reward model
            registry.set_active("base")
            t0 = time.perf_counter()
            again = retrainer.run_cycle("dpo", trigger="benchmark")
            result["second_retrain_s"] = round(time.perf_counter() - t0, 1)
            result["second_reward_model"] = str((again["metrics"].get("judge") or {}).get("reward_model", ""))[:60]
        store.close()
    print_report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
