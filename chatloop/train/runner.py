"""One training job in a child process: a snapshot directory in, an adapter and metrics out.

Usage: ``python -m chatloop.train.runner JOB_DIR``

JOB_DIR holds ``job.json`` (model path, parent adapter path or null, algorithm, settings),
``train.jsonl`` and ``eval.jsonl`` (pairs). The child writes ``progress.jsonl`` (one line per
step), then ``adapter/`` (a PEFT directory) and ``metrics.json``, and exits 0. Any failure
writes ``error.txt`` and exits non-zero.

Invariants: the child never opens the DuckDB file; it reads the snapshot and writes files in
JOB_DIR only. The new adapter starts from the parent adapter's weights (or a fresh LoRA on the
base model), and the parent is the DPO reference.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch


def run_job(job_dir: Path) -> dict[str, Any]:
    from peft import LoraConfig, PeftModel, get_peft_model

    from chatloop.models import load_model
    from chatloop.prefs import read_jsonl
    from chatloop.train.dpo import DpoConfig, train_dpo

    job = json.loads((job_dir / "job.json").read_text())
    if job["algo"] != "dpo":
        raise ValueError(f"algorithm {job['algo']!r} is not available yet; use dpo")
    if job.get("torch_threads"):
        torch.set_num_threads(int(job["torch_threads"]))
    t0 = time.perf_counter()
    loaded = load_model(job["model_path"], Path(job["models_dir"]), job.get("device", "auto"),
                        job.get("dtype", "auto"))
    s = job["settings"]
    if job.get("parent_adapter"):
        model = PeftModel.from_pretrained(loaded.model, job["parent_adapter"], is_trainable=True)
    else:
        lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                          target_modules=list(s["lora_target_modules"]), task_type="CAUSAL_LM")
        model = get_peft_model(loaded.model, lora)
    load_s = time.perf_counter() - t0
    cfg = DpoConfig(beta=s["beta"], loss_type=s["loss_type"], label_smoothing=s["label_smoothing"],
                    learning_rate=s["learning_rate"], epochs=s["epochs"], batch_size=s["batch_size"],
                    max_prompt_tokens=s["max_prompt_tokens"], max_reply_tokens=s["max_reply_tokens"],
                    seed=s["seed"])
    progress = open(job_dir / "progress.jsonl", "a", buffering=1)
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    metrics = train_dpo(model, loaded.tokenizer, read_jsonl(job_dir / "train.jsonl"),
                        read_jsonl(job_dir / "eval.jsonl"), cfg,
                        on_step=lambda m: progress.write(json.dumps(m) + "\n"),
                        should_stop=lambda: stop["flag"])
    progress.close()
    model.save_pretrained(job_dir / "adapter")
    metrics["load_s"] = load_s
    metrics["total_s"] = time.perf_counter() - t0
    (job_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m chatloop.train.runner JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[0])
    try:
        run_job(job_dir)
        return 0
    except BaseException as exc:  # report every failure to the parent through a file
        (job_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
