"""Held-out pair accuracy of our reward model (the default model + LoRA + a scalar head,
chatloop.train.reward.train_reward) trained on part of HH-RLHF's training split.

Training uses the first --train-pairs pairs of the training split (lines i % 5 != 0); accuracy is
measured on the first --eval-pairs pairs of the held-out split (lines i % 5 == 0, never trained
on), for the trained model and for the same model before training (fresh LoRA, zero head: the
baseline, 0.5). fp32 on CPU.

    python benchmarks/reward_hh.py [--train-pairs 320] [--eval-pairs 200] [--warm-start on|off] [--baseline on|off] [--json]

The defaults are sized to finish in about a quarter of an hour on 2 CPU cores: 320 training pairs,
1 epoch, batch 8 (40 steps), LoRA lr 1e-4, head lr 1e-3, the head warm-started on the frozen states,
the last 256 prompt tokens and the first 128 reply tokens, 200 held-out pairs. Measured there:
held-out accuracy 0.63, training 470 s, each evaluation of 200 pairs about 120 s. With 160
training pairs it was 0.575 (0.57 without the warm start).

With --epochs 0 the reward model is the head probed on the frozen model's states alone (no LoRA
steps), and train_s is the whole training call.

Times: train_s is the optimisation itself (first step's start to last step's end);
train_call_s is the whole train_reward call (it also tokenizes the training pairs)
once more (the train accuracy); eval_s is the held-out evaluation of the trained model,
baseline_eval_s that of the untrained one.

Prints a table, and with --json a last line holding one JSON object with the keys
heldout_accuracy (goal >= 0.60), train_pairs, wall_s (the whole run: load, baseline, training,
evaluation), eval_pairs, baseline_accuracy (the untrained model: its zero head scores every reply
alike, so exactly 0.5), margin, train_s, eval_s (and a few more).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

from _report import print_report

REPO = Path(__file__).resolve().parents[1]
HH = Path(os.environ.get("CHATLOOP_SHARED_DATA", REPO.parent / "shared" / "data")) / "hh_rlhf_harmless_base_test.jsonl.gz"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-pairs", type=int, default=320, help="first N pairs of the training split")
    ap.add_argument("--eval-pairs", type=int, default=200, help="first N pairs of the held-out split")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate")
    ap.add_argument("--head-lr", type=float, default=1e-3, help="the scalar head's learning rate")
    ap.add_argument("--warm-start", choices=["on", "off"], default=None,
                    help="fit the head alone on the frozen states first (default: RewardConfig's)")
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--max-reply-tokens", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--pooling", default="last_mean", help="what the reward head reads: last | last_mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--models-dir", default="/tmp/chatloop-bench-models",
                    help="cache of the converted default model (the first conversion takes ~30 s)")
    ap.add_argument("--baseline", choices=["on", "off"], default="on",
                    help="also score the untrained model (exactly 0.5 by construction: a check, not a figure)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not HH.is_file():
        print(f"error: {HH} not found (the shared data directory sits beside the repository); skipping",
              file=sys.stderr)
        return 2

    wall0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from chatloop.importers import hh_pairs
    from chatloop.models import load_model
    from chatloop.train.reward import PROBE_PHASE, RewardConfig, RewardModel, evaluate_pairs, train_reward

    if args.threads:
        torch.set_num_threads(args.threads)
    train = list(itertools.islice(hh_pairs(HH, "train"), args.train_pairs))
    held = list(itertools.islice(hh_pairs(HH, "heldout"), args.eval_pairs))
    assert all(p["index"] % 5 != 0 for p in train) and all(p["index"] % 5 == 0 for p in held)
    assert not {p["index"] for p in train} & {p["index"] for p in held}

    t0 = time.perf_counter()
    loaded = load_model("default", Path(args.models_dir), "cpu", "float32")
    load_s = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")
    rm = RewardModel(get_peft_model(loaded.model, lora), loaded.model.config.hidden_size, args.pooling).to(loaded.device)
    warm = {"head_warm_start": args.warm_start == "on"} if args.warm_start else {}
    cfg = RewardConfig(learning_rate=args.lr, head_learning_rate=args.head_lr, epochs=args.epochs, batch_size=args.batch_size,
                       max_prompt_tokens=args.max_prompt_tokens, max_reply_tokens=args.max_reply_tokens,
                       seed=args.seed, **warm)
    tok = loaded.tokenizer

    t0 = time.perf_counter()
    baseline = evaluate_pairs(rm, tok, held, cfg) if args.baseline == "on" else {"accuracy": None, "margin": None}
    baseline_eval_s = time.perf_counter() - t0

    bar = probe_bar = None
    marks: dict = {}

    def on_step(m: dict) -> None:
        nonlocal bar, probe_bar
        if m.get("phase") == PROBE_PHASE:  # the head's warm start: one forward pass over the pairs
            if probe_bar is None:
                probe_bar = tqdm(total=m["total"], desc=PROBE_PHASE, unit="pair", file=sys.stderr)
            probe_bar.update(m["step"] - probe_bar.n)
            return
        if probe_bar is not None:  # the probe is over: training's steps follow
            probe_bar.close()
            probe_bar = None
        if bar is None:
            bar = tqdm(total=m["total"], desc="reward model", unit="step", file=sys.stderr)
            # elapsed_s counts from fit's start, so the optimisation start is now - elapsed_s
            marks["fit_start"] = time.perf_counter() - m["elapsed_s"]
        marks["fit_end"] = time.perf_counter()
        marks["steps"] = m["step"]
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
        bar.update(1)

    t0 = time.perf_counter()
    try:
        metrics = train_reward(rm, tok, train, [], cfg, on_step=on_step)  # held-out scored below, timed apart
    finally:
        if bar is not None:
            bar.close()
    train_call_s = time.perf_counter() - t0
    # the optimisation; with --epochs 0 there is none and the probe (its forward pass, the fit) is the training
    train_s = marks["fit_end"] - marks["fit_start"] if "fit_start" in marks else train_call_s

    t0 = time.perf_counter()
    trained = evaluate_pairs(rm, tok, held, cfg)
    eval_s = time.perf_counter() - t0

    result = {
        "heldout_accuracy": round(trained["accuracy"], 4),
        "heldout_accuracy_se": round((trained["accuracy"] * (1 - trained["accuracy"]) / max(len(held), 1)) ** 0.5, 4),
        "pooling": args.pooling, "train_pairs": len(train),
        "wall_s": round(time.perf_counter() - wall0, 1),
        "eval_pairs": len(held), "epochs": args.epochs, "steps": marks.get("steps", 0),
        "batch_size": args.batch_size, "learning_rate": args.lr, "head_learning_rate": args.head_lr,
        "head_warm_start": cfg.head_warm_start, "probe_accuracy": metrics.get("probe_accuracy"),
        "probe_l2": metrics.get("probe_l2"), "probe_cv_loss": metrics.get("probe_cv_loss"),
        "max_prompt_tokens": args.max_prompt_tokens, "max_reply_tokens": args.max_reply_tokens,
        "baseline_accuracy": None if baseline["accuracy"] is None else round(baseline["accuracy"], 4),
        "margin": round(trained["margin"], 4),
        "baseline_margin": None if baseline["margin"] is None else round(baseline["margin"], 4),
        "train_accuracy": round(metrics["train_accuracy_last_epoch"], 4),
        "first_loss": round(metrics["first_loss"], 4), "final_loss": round(metrics["final_loss"], 4),
        "train_s": round(train_s, 1), "train_call_s": round(train_call_s, 1), "eval_s": round(eval_s, 1),
        "baseline_eval_s": round(baseline_eval_s, 1), "load_s": round(load_s, 1),
        "train_pairs_per_s": round(len(train) * max(args.epochs, 1) / train_s, 3),
        "torch_threads": torch.get_num_threads(),
    }
    print_report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
