"""Our DPO (chatloop.train.dpo.train_dpo) against TRL's DPOTrainer on the same run: the default
model in fp32 on CPU, the first N pairs of HH-RLHF's training split (held-out lines i % 5 == 0
are never used), the same LoRA (r=16, alpha=32, dropout 0, q/k/v/o_proj), batch size, token
limits (the last 256 prompt tokens, the first 128 reply tokens), beta 0.1, sigmoid loss,
lr 5e-5 (AdamW, no weight decay, constant schedule, gradients clipped at 1.0) and 1 epoch.

    python benchmarks/train_dpo_vs_trl.py [--pairs 32] [--batch-size 4] [--json]
    python benchmarks/train_dpo_vs_trl.py --model DIR --device cuda --dtype bfloat16   # on a GPU

Each trainer runs in its own child process (a fresh interpreter), so that each peak RSS
(getrusage's ru_maxrss, the high-water mark of the whole child: Python, torch, the model, the
trainer) is its own. TRL gets the conversational format, so it applies the same chat template;
its tokenized rows are then cut to our limits (TRL 1.x only truncates whole sequences to
max_length, keeping the start) and checked token for token against our encoding. Both
references are the adapter-free model (TRL: peft_config, reference = adapters disabled; ours:
a fresh LoRA, whose B matrices are zero, so the model before the first update).

What "training phase" (the pairs/s) includes:
- ours: the reference log-prob pass over the training pairs (fill_reference, no grad, eval
  mode) plus every optimisation step, up to the end of the last step. Tokenization before it
  and the train-set evaluation that train_dpo runs after it are left out.
- TRL: from Trainer's on_train_begin to the end of the last step; TRL runs the reference
  forward (adapters disabled, no grad) inside every step. Its tokenization (in the trainer's
  constructor) is left out.

Prints a table, and with --json a last line holding one JSON object with the keys
ours_pairs_s, trl_pairs_s, speedup (ours/TRL pairs/s; goal >= 2), mem_ratio (ours/TRL peak
RSS; on CUDA, peak GPU memory allocated), loss0_abs_diff (|our loss - TRL's| at step 0), pairs, ours_peak_mb, trl_peak_mb,
ours_loss0, trl_loss0 (and a few more).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = Path(os.environ.get("CHATLOOP_SHARED_DATA", REPO.parent / "shared" / "data")) / "hh_rlhf_harmless_base_test.jsonl.gz"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def rss_mb() -> float:
    """Current resident set size of this process, in MiB (Linux /proc)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """High-water mark of this process's RSS, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: str) -> float:
    """The memory that bounds a run: GPU memory allocated at its peak on CUDA, else peak RSS."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")


def load_pairs(n: int) -> list[dict]:
    from chatloop.importers import hh_pairs

    pairs = list(itertools.islice(hh_pairs(HH, "train"), n))
    assert all(p["index"] % 5 != 0 for p in pairs), "a held-out line reached the training pairs"
    return pairs


def our_encoding(tokenizer, pairs: list[dict], args):
    from chatloop.train.dpo import DpoConfig, encode_pairs

    cfg = DpoConfig(max_prompt_tokens=args.max_prompt_tokens, max_reply_tokens=args.max_reply_tokens)
    return encode_pairs(tokenizer, pairs, cfg)


# ---- children ----------------------------------------------------------------------------------
def child_ours(args, pairs, loaded) -> dict:
    import torch
    from peft import get_peft_model

    import chatloop.train.dpo as dpo

    torch.manual_seed(args.seed)
    model = get_peft_model(loaded.model, lora_config(args))
    cfg = dpo.DpoConfig(beta=args.beta, loss_type="sigmoid", label_smoothing=0.0, learning_rate=args.lr,
                        epochs=args.epochs, batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens,
                        max_reply_tokens=args.max_reply_tokens, seed=args.seed)
    marks: dict = {"step_end": [], "losses": [], "tokens": 0, "ref_done": False}
    original_fill, original_collate = dpo.fill_reference, dpo.collate_groups

    def timed_fill(*a, **kw):  # the reference pass: its start opens the training phase
        marks["ref_start"] = time.perf_counter()
        out = original_fill(*a, **kw)
        marks["ref_end"] = time.perf_counter()
        marks["ref_done"] = True
        return out

    def counting_collate(groups, pad_id):  # padded tokens fed to the model in the training steps
        batch = original_collate(groups, pad_id)
        if marks["ref_done"] and len(marks["step_end"]) < marks.get("total", math.inf):
            marks["tokens"] += batch.prompt_ids.numel() + batch.reply_ids.numel()  # one prompt pass per pair
        return batch

    def on_step(m):
        marks["step_end"].append(time.perf_counter())
        marks["losses"].append(m["loss"])
        marks["total"] = m["total"]

    dpo.fill_reference, dpo.collate_groups = timed_fill, counting_collate
    rss_before = rss_mb()
    t0 = time.perf_counter()
    try:
        metrics = dpo.train_dpo(model, loaded.tokenizer, pairs, [], cfg, on_step=on_step)
    finally:
        dpo.fill_reference, dpo.collate_groups = original_fill, original_collate
    call_s = time.perf_counter() - t0
    steps = len(marks["step_end"])
    phase = marks["step_end"][-1] - marks["ref_start"]
    return {
        "steps": steps, "train_phase_s": phase, "ref_pass_s": marks["ref_end"] - marks["ref_start"],
        "steps_s": marks["step_end"][-1] - marks["ref_end"], "call_s": call_s,
        "pairs_per_s": len(pairs) * args.epochs / phase, "loss0": marks["losses"][0],
        "final_loss": marks["losses"][-1], "losses": marks["losses"],
        "padded_tokens_per_step": marks["tokens"] / max(steps, 1),
        "rss_before_train_mb": rss_before, "peak_rss_mb": peak_memory_mb(args.device),
        "reported_pairs_per_s": metrics["pairs_per_s"],
    }


def child_trl(args, pairs, loaded) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = loaded.tokenizer
    rows = [{"prompt": p["prompt"],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    marks: dict = {"step_end": [], "losses": [], "tokens": 0}

    class Timing(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            marks["begin"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            marks["step_end"].append(time.perf_counter())

    class RecordingDPOTrainer(DPOTrainer):
        """Records the exact (unrounded) loss and the padded size of every training batch."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                loss = out[0] if return_outputs else out
                marks["losses"].append(float(loss.detach()))
                marks["tokens"] += inputs["input_ids"].numel()
            return out

    with tempfile.TemporaryDirectory(prefix="trl-dpo-bench-") as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
            learning_rate=args.lr, beta=args.beta, loss_type=["sigmoid"], label_smoothing=0.0,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            bf16=args.dtype == "bfloat16", fp16=False, use_cpu=args.device == "cpu",
            gradient_checkpointing=args.trl_gradient_checkpointing,
            max_length=None,  # we cut prompt and replies ourselves, below, to our limits
            precompute_ref_log_probs=False, report_to="none", save_strategy="no", eval_strategy="no",
            push_to_hub=False, logging_steps=1, disable_tqdm=True, seed=args.seed, data_seed=args.seed,
            dataloader_num_workers=0,
        )
        trainer = RecordingDPOTrainer(model=loaded.model, args=config, train_dataset=Dataset.from_list(rows),
                                      processing_class=tok, peft_config=lora_config(args),
                                      callbacks=[Timing()])
        P, R = args.max_prompt_tokens, args.max_reply_tokens
        trainer.train_dataset = trainer.train_dataset.map(lambda ex: {
            "prompt_ids": ex["prompt_ids"][-P:], "chosen_ids": ex["chosen_ids"][:R],
            "rejected_ids": ex["rejected_ids"][:R]})
        # Same tokens as ours? (pair for pair, in dataset order)
        ours = our_encoding(tok, pairs, args)
        ds = trainer.train_dataset
        same = sum(1 for e, p, c, r in zip(ours, ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
                   if e.chosen.prompt_ids == p and e.chosen.reply_ids == c and e.rejected.reply_ids == r)
        rss_before = rss_mb()
        t0 = time.perf_counter()
        trainer.train()
        call_s = time.perf_counter() - t0
    steps = len(marks["step_end"])
    phase = marks["step_end"][-1] - marks["begin"]
    return {
        "steps": steps, "train_phase_s": phase, "ref_pass_s": None, "steps_s": phase, "call_s": call_s,
        "pairs_per_s": len(pairs) * args.epochs / phase, "loss0": marks["losses"][0],
        "final_loss": marks["losses"][-1], "losses": marks["losses"],
        "padded_tokens_per_step": marks["tokens"] / max(steps, 1),
        "rss_before_train_mb": rss_before, "peak_rss_mb": peak_memory_mb(args.device),
        "dataset_rows": len(ds), "tokens_identical_pairs": same,
        "first_logged": next((h for h in trainer.state.log_history if "loss" in h), None),
        "gradient_checkpointing": args.trl_gradient_checkpointing,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(args) -> int:
    os.environ.update(OFFLINE_ENV)
    import torch

    from chatloop.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pairs = load_pairs(args.pairs)
    loaded = load_model(args.model, Path(args.models_dir), args.device, args.dtype)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    load_s = time.perf_counter() - t0
    result = (child_ours if args.child == "ours" else child_trl)(args, pairs, loaded)
    result.update({"which": args.child, "load_s": load_s, "pairs": len(pairs),
                   "torch_threads": torch.get_num_threads()})
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---- parent ------------------------------------------------------------------------------------
def spawn(which: str, args, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(prefix=f"dpo-bench-{which}-", suffix=".json", delete=False) as fh:
        result_path = fh.name
    try:
        env = {**os.environ, **OFFLINE_ENV}
        t0 = time.perf_counter()
        # The children's chatter (TRL warnings, HF logs) goes to stderr; stdout stays the table.
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", which,
                               "--result", result_path], env=env, cwd=str(REPO),
                              stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno())
        if proc.returncode != 0:
            raise RuntimeError(f"the {which} child failed with exit code {proc.returncode}")
        result = json.loads(Path(result_path).read_text())
        result["child_wall_s"] = time.perf_counter() - t0
        return result
    finally:
        Path(result_path).unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=32, help="first N pairs of the HH-RLHF training split")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--max-reply-tokens", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="TRL's own default (off here: ours does not checkpoint)")
    ap.add_argument("--order", choices=["ours-first", "trl-first"], default="ours-first")
    ap.add_argument("--models-dir", default="/tmp/chatloop-bench-models",
                    help="cache of the converted default model (the first conversion takes ~30 s)")
    ap.add_argument("--model", default="default", help="the model setting (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (TRL then trains with bf16=True)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not HH.is_file():
        print(f"error: {HH} not found (the shared data directory sits beside the repository); skipping",
              file=sys.stderr)
        return 2
    if args.child:
        return run_child(args)

    os.environ.update(OFFLINE_ENV)
    from chatloop.models import materialize

    t0 = time.perf_counter()
    materialize(args.model, Path(args.models_dir))  # convert once here, not inside a measured child
    convert_s = time.perf_counter() - t0
    argv = [a for a in sys.argv[1:] if a != "--json"]
    order = ["ours", "trl"] if args.order == "ours-first" else ["trl", "ours"]
    res = {which: spawn(which, args, argv) for which in order}
    ours, trl = res["ours"], res["trl"]

    def f(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)

    rows = [
        ("pairs (HH-RLHF train split)", ours["pairs"], trl["pairs"], None),
        ("optimisation steps", ours["steps"], trl["steps"], None),
        ("torch threads", ours["torch_threads"], trl["torch_threads"], None),
        ("training phase s (ref + steps)", ours["train_phase_s"], trl["train_phase_s"],
         trl["train_phase_s"] / ours["train_phase_s"]),
        ("  reference pass s", ours["ref_pass_s"], "in steps", None),
        ("  steps s", ours["steps_s"], trl["steps_s"], trl["steps_s"] / ours["steps_s"]),
        ("pairs/s", ours["pairs_per_s"], trl["pairs_per_s"], ours["pairs_per_s"] / trl["pairs_per_s"]),
        ("padded tokens per step", ours["padded_tokens_per_step"], trl["padded_tokens_per_step"],
         ours["padded_tokens_per_step"] / trl["padded_tokens_per_step"]),
        ("RSS before training MB", ours["rss_before_train_mb"], trl["rss_before_train_mb"],
         ours["rss_before_train_mb"] / trl["rss_before_train_mb"]),
        ("peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB", ours["peak_rss_mb"], trl["peak_rss_mb"],
         ours["peak_rss_mb"] / trl["peak_rss_mb"]),
        ("loss at step 0", ours["loss0"], trl["loss0"], None),
        ("loss at last step", ours["final_loss"], trl["final_loss"], None),
        ("model load s", ours["load_s"], trl["load_s"], None),
        ("child wall s", ours["child_wall_s"], trl["child_wall_s"], None),
    ]
    print(f"{'':<32} {'ours':>10} {'TRL':>10} {'ours/TRL':>9}")
    for name, a, b, r in rows:
        nd = 4 if "loss" in name else 2
        print(f"{name:<32} {f(a, nd):>10} {f(b, nd):>10} {f(r):>9}")
    print(f"log 2 = {math.log(2):.4f}; TRL rows token-identical to ours: "
          f"{trl['tokens_identical_pairs']}/{trl['dataset_rows']}; speed ratio (ours/TRL pairs/s) = "
          f"{ours['pairs_per_s'] / trl['pairs_per_s']:.2f}x (goal >= 2x); TRL gradient checkpointing: "
          f"{'on' if args.trl_gradient_checkpointing else 'off'}; model cache ready in {convert_s:.1f} s")
    result = {
        "ours_pairs_s": round(ours["pairs_per_s"], 3), "trl_pairs_s": round(trl["pairs_per_s"], 3),
        "speedup": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
        "mem_ratio": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3),
        "loss0_abs_diff": abs(ours["loss0"] - trl["loss0"]),
        "pairs": ours["pairs"], "epochs": args.epochs,
        "ours_peak_mb": round(ours["peak_rss_mb"], 1), "trl_peak_mb": round(trl["peak_rss_mb"], 1),
        "device": args.device, "dtype": args.dtype, "model": args.model,
        "ours_loss0": round(ours["loss0"], 6), "trl_loss0": round(trl["loss0"], 6),
        "ours_train_phase_s": round(ours["train_phase_s"], 2), "trl_train_phase_s": round(trl["train_phase_s"], 2),
        "ours_ref_pass_s": round(ours["ref_pass_s"], 2), "steps": ours["steps"],
        "ours_final_loss": round(ours["final_loss"], 6), "trl_final_loss": round(trl["final_loss"], 6),
        "tokens_identical_pairs": trl["tokens_identical_pairs"], "batch_size": args.batch_size,
        "max_prompt_tokens": args.max_prompt_tokens, "max_reply_tokens": args.max_reply_tokens,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing, "torch_threads": ours["torch_threads"],
    }
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
