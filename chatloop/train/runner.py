"""One training job in a child process: a snapshot directory in, an adapter and metrics out.

Usage: ``python -m chatloop.train.runner JOB_DIR``

JOB_DIR holds ``job.json`` (model path, parent adapter path or null, algorithm, settings, and a
reward model the gate's judge may reuse, or null) and
the snapshot: ``train.jsonl``/``eval.jsonl`` (pairs: DPO, and the reward model before PPO),
``train_thumbs.jsonl``/``eval_thumbs.jsonl`` (thumbs: KTO, DPO's thumbs term, and the reward model's
pointwise term), ``train_prompts.jsonl``/``eval_prompts.jsonl`` (logged prompts: PPO and RLOO rollouts).
The child writes ``progress.jsonl`` (one line per step, each naming its phase: the algorithm,
``reward model`` or ``gate reward model``; each phase counts its own steps), then ``adapter/`` (a PEFT directory),
``reward/`` (PPO's and RLOO's reward model), ``pair_relevance.json`` (the chosen replies' relevance,
which decides the pairs learned from) and ``metrics.json``, and exits 0. Any failure writes
``error.txt`` and exits non-zero.

Invariants: the child never opens the DuckDB file; it reads the snapshot and writes files in
JOB_DIR only. It dies with the service that started it (``CHATLOOP_PARENT_PID``): the kernel kills
it when its parent dies (Linux ``PR_SET_PDEATHSIG``), and a watcher thread exits it once it has
been re-parented (elsewhere, and for the moment before the first takes effect). The new adapter starts from the parent adapter's weights (or a fresh LoRA on the
base model), and the parent is the DPO reference.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from chatloop.algorithms import Algorithm
from chatloop.algorithms import parse as parse_algorithm
from chatloop.config import TrainingDefaults
from chatloop.train import configs


def in_phase(hooks: dict, phase: str) -> dict:
    """The same hooks, with every progress line naming its phase (each phase counts its own
    steps: the reward model before PPO, or the gate's reward model after DPO/KTO). An inner
    phase's name wins over the outer one's."""
    return {"on_step": lambda m: hooks["on_step"]({"phase": phase, **m}), "should_stop": hooks["should_stop"]}


def _policy(loaded, job: dict, t: TrainingDefaults):
    """The model to train: the parent adapter (trainable) or a fresh LoRA on the base model."""
    from peft import PeftModel, get_peft_model

    if job.get("parent_adapter"):
        return PeftModel.from_pretrained(loaded.model, job["parent_adapter"], is_trainable=True)
    return get_peft_model(loaded.model, configs.lora_config(t))


def _load(job: dict):
    from chatloop.models import load_model

    return load_model(job["model_path"], Path(job["models_dir"]), job.get("device", "auto"), job.get("dtype", "auto"))


PAIR_RELEVANCE_FILE = "pair_relevance.json"


def relevant_pairs(job_dir: Path, base_model, tokenizer, t: TrainingDefaults, hooks: dict,
                   ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The snapshot's (train, eval) pairs less those whose chosen reply hardly depends on its prompt
    (``chatloop.train.relevance.relevant_pairs``; ``pair_min_relevance`` = 0: all of them), and a
    summary for the metrics. ``base_model`` must be the base model (no adapter yet). The chosen
    replies' figures are computed once per job (``pair_relevance.json``): DPO and its gate's reward
    model, or the reward model before PPO/RLOO, read the same."""
    from chatloop.prefs import read_jsonl
    from chatloop.train.relevance import pmi_of_texts
    from chatloop.train.relevance import relevant_pairs as keep_relevant

    train, held = read_jsonl(job_dir / "train.jsonl"), read_jsonl(job_dir / "eval.jsonl")
    if t.pair_min_relevance <= 0 or not train:
        return train, held, {"off": True} if t.pair_min_relevance <= 0 else {"pairs": 0}
    cache = job_dir / PAIR_RELEVANCE_FILE
    if cache.exists():
        values = json.loads(cache.read_text())
    else:
        rows = train + held
        step = in_phase(hooks, "relevance filter")["on_step"]
        t0 = time.perf_counter()
        pmi = pmi_of_texts(base_model, tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                           t.max_prompt_tokens, t.max_reply_tokens,
                           on_batch=lambda done, total: step({"step": done, "total": total,
                                                              "elapsed_s": time.perf_counter() - t0}))
        values = {"train": pmi[:len(train)], "eval": pmi[len(train):], "seconds": time.perf_counter() - t0}
        cache.write_text(json.dumps(values))
    keep, summary = keep_relevant(values["train"], t.pair_min_relevance)
    keep_held, _ = keep_relevant(values["eval"], t.pair_min_relevance, threshold=summary["threshold"])
    summary = {**summary, "seconds": values.get("seconds"), "eval_pairs": len(held), "eval_kept": sum(keep_held),
               "dropped_examples": [r["chosen"][:200] for r, k in zip(train, keep) if not k][:3]}
    return ([r for r, k in zip(train, keep) if k], [r for r, k in zip(held, keep_held) if k], summary)


def unassuming_thumbs_of(base_model, tokenizer, train: list[dict], held: list[dict], t: TrainingDefaults,
                         hooks: dict) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The thumbs less the liked replies far more assistant-like than the disliked ones
    (``chatloop.train.register.unassuming_thumbs``), and a summary; ``base_model`` must be the base
    model (no adapter yet)."""
    from chatloop.train.common import encode_reply
    from chatloop.train.register import plain_prompt_ids, register_gap, unassuming_thumbs

    rows = train + held
    step = in_phase(hooks, "register filter")["on_step"]
    t0 = time.perf_counter()
    enc = [encode_reply(tokenizer, r["prompt"], r["completion"], t.max_prompt_tokens, t.max_reply_tokens) for r in rows]
    eos = tokenizer.eos_token_id
    gaps: list[float | None] = []
    for start in range(0, len(rows), 32):  # in parts, so the progress moves
        part = slice(start, start + 32)
        gaps += register_gap(base_model, tokenizer, [e.prompt_ids for e in enc[part]],
                             [plain_prompt_ids(tokenizer, r["prompt"], t.max_prompt_tokens) for r in rows[part]],
                             [e.reply_ids if r["completion"].strip() else [eos] for e, r in zip(enc[part], rows[part])])
        step({"step": len(gaps), "total": len(rows), "elapsed_s": time.perf_counter() - t0})
    liked = [bool(r["label"]) for r in rows]
    keep, summary = unassuming_thumbs(gaps[:len(train)], liked[:len(train)], t.kto_register_margin)
    keep_held, _ = unassuming_thumbs(gaps[len(train):], liked[len(train):], t.kto_register_margin,
                                     threshold=summary["threshold"])
    summary = {**summary, "seconds": time.perf_counter() - t0, "eval_thumbs": len(held), "eval_kept": sum(keep_held),
               "dropped_examples": [r["completion"][:200] for r, k in zip(train, keep) if not k][:3]}
    return [r for r, k in zip(train, keep) if k], [r for r, k in zip(held, keep_held) if k], summary


def train_dpo_job(job_dir: Path, job: dict, t: TrainingDefaults, hooks: dict) -> dict:
    from chatloop.prefs import read_jsonl
    from chatloop.train.dpo import train_dpo

    loaded = _load(job)
    train, held, kept = relevant_pairs(job_dir, loaded.model, loaded.tokenizer, t, hooks)
    model = _policy(loaded, job, t)
    metrics = train_dpo(model, loaded.tokenizer, train, held, configs.dpo_config(t), **hooks,
                        thumbs=read_jsonl(job_dir / "train_thumbs.jsonl"))
    metrics["pair_filter"] = kept
    model.save_pretrained(job_dir / "adapter")
    metrics["judge"] = judge_candidate(job_dir, job, t, model, loaded.tokenizer, hooks)
    return metrics


def train_kto_job(job_dir: Path, job: dict, t: TrainingDefaults, hooks: dict) -> dict:
    from chatloop.prefs import read_jsonl
    from chatloop.train.kto import train_kto

    loaded = _load(job)
    train, held = read_jsonl(job_dir / "train_thumbs.jsonl"), read_jsonl(job_dir / "eval_thumbs.jsonl")
    kept = None
    if t.kto_register_margin > 0 and train:
        train, held, kept = unassuming_thumbs_of(loaded.model, loaded.tokenizer, train, held, t, hooks)
    model = _policy(loaded, job, t)
    metrics = train_kto(model, loaded.tokenizer, train, held, configs.kto_config(t), **hooks)
    metrics["thumb_filter"] = kept or {"off": True}
    model.save_pretrained(job_dir / "adapter")
    metrics["judge"] = judge_candidate(job_dir, job, t, model, loaded.tokenizer, hooks)
    return metrics


def _reference(job: dict):
    """The parent adapter as a frozen model, or None when the parent is the base model (the judge
    then uses the candidate with its adapter disabled)."""
    from peft import PeftModel

    if not job.get("parent_adapter"):
        return None
    ref = PeftModel.from_pretrained(_load(job).model, job["parent_adapter"])
    return ref.eval().requires_grad_(False)


def _reward_fn(rm, tokenizer, t: TrainingDefaults):
    from chatloop.train.reward import score

    cfg = configs.scoring_config(t)
    return lambda items: score(rm, tokenizer, items, cfg)


def judge_candidate(job_dir: Path, job: dict, t: TrainingDefaults, candidate, tokenizer, hooks: dict,
                    reference=None, rm=None) -> dict:
    """The gate's behavioural checks on held-out prompts (see ``chatloop.train.judge``). DPO/KTO
    train a reward model on the snapshot first when ``gate_reward_model`` is on and there are pairs."""
    from chatloop.prefs import read_jsonl
    from chatloop.train.judge import judge

    contexts = [p["prompt"] for p in read_jsonl(job_dir / "eval_prompts.jsonl")][: t.gate_prompts]
    if not contexts:
        return {"prompts": 0, "skipped": "no held-out prompts (too little feedback to hold any out)"}
    note = None
    if rm is None and t.gate_reward_model and job.get("reward_model"):
        from chatloop.train.reward import RewardModel

        rm = RewardModel.load(Path(job["reward_model"]), _load(job).model)
        note = f"reused {job['reward_model']}"
    if rm is None and t.gate_reward_model:
        if len(read_jsonl(job_dir / "train.jsonl")) >= 2:
            reward_metrics, rm = train_reward_job(job_dir, job, t, in_phase(hooks, "gate reward model"))
            note = {k: v for k, v in reward_metrics.items() if k != "history"}
        else:
            note = "no reward model: fewer than 2 training pairs"
    if reference is None:
        reference = _reference(job)
    out = judge(candidate, reference, tokenizer, contexts, _reward_fn(rm, tokenizer, t) if rm is not None else None,
                t.max_prompt_tokens, t.gate_max_new_tokens, seed=t.seed + 12345,
                reference_is_base=not job.get("parent_adapter"))
    if note is not None:
        out["reward_model"] = note
    return out


def train_reward_job(job_dir: Path, job: dict, t: TrainingDefaults, hooks: dict):
    """Train the reward model (LoRA + head on the base model) on pairs, plus thumbs pointwise;
    save it under ``reward/`` and return (metrics, the trained model)."""
    from peft import get_peft_model

    from chatloop.prefs import read_jsonl
    from chatloop.train.reward import RewardModel, train_reward

    loaded = _load(job)
    train, held, kept = relevant_pairs(job_dir, loaded.model, loaded.tokenizer, t, hooks)
    cfg = configs.reward_config(t)
    rm = RewardModel(get_peft_model(loaded.model, configs.lora_config(t)),
                     loaded.model.config.hidden_size, cfg.pooling).to(loaded.device)
    metrics = train_reward(rm, loaded.tokenizer, train, held, cfg, read_jsonl(job_dir / "train_thumbs.jsonl"),
                           **hooks)
    metrics["pair_filter"] = kept
    rm.save(job_dir / "reward", {"model_path": job["model_path"], "eval_fraction": t.eval_fraction,
                                 "metrics": {k: v for k, v in metrics.items() if k != "history"}})
    return metrics, rm


def _rollout_job(job_dir: Path, job: dict, t: TrainingDefaults, hooks: dict, train, cfg) -> dict:
    """Reward model first, then the policy-gradient ``train`` against it on the training prompts;
    the candidate is compared with the reference by that reward model on held-out prompts
    (sampled replies, same seeds). A base-model reference is the policy with its adapter disabled."""
    from chatloop.prefs import read_jsonl

    reward_metrics, rm = train_reward_job(job_dir, job, t, in_phase(hooks, "reward model"))
    loaded = _load(job)
    policy = _policy(loaded, job, t)
    reference = _reference(job)
    tok = loaded.tokenizer
    prompts = [p["prompt"] for p in read_jsonl(job_dir / "train_prompts.jsonl")]
    metrics = train(policy, reference, tok, prompts, _reward_fn(rm, tok, t), cfg, **hooks)
    metrics["reward_model"] = {k: v for k, v in reward_metrics.items() if k != "history"}
    policy.save_pretrained(job_dir / "adapter")
    metrics["judge"] = judge_candidate(job_dir, job, t, policy, tok, hooks, reference=reference, rm=rm)
    return metrics


def train_ppo_job(job_dir: Path, job: dict, t: TrainingDefaults, hooks: dict) -> dict:
    from chatloop.train.ppo import train_ppo

    return _rollout_job(job_dir, job, t, hooks, train_ppo, configs.ppo_config(t))


def train_rloo_job(job_dir: Path, job: dict, t: TrainingDefaults, hooks: dict) -> dict:
    from chatloop.train.rloo import train_rloo

    return _rollout_job(job_dir, job, t, hooks, train_rloo, configs.rloo_config(t))


TRAINERS = {Algorithm.DPO: train_dpo_job, Algorithm.KTO: train_kto_job, Algorithm.PPO: train_ppo_job,
            Algorithm.RLOO: train_rloo_job}


def run_job(job_dir: Path) -> dict[str, Any]:
    job = json.loads((job_dir / "job.json").read_text())
    algo = parse_algorithm(job["algo"])
    t = configs.training_settings(job["settings"])
    if job.get("torch_threads"):
        torch.set_num_threads(int(job["torch_threads"]))
    torch.manual_seed(t.seed)
    t0 = time.perf_counter()
    progress = open(job_dir / "progress.jsonl", "a", buffering=1)
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    hooks = {"on_step": lambda m: progress.write(json.dumps(m) + "\n"), "should_stop": lambda: stop["flag"]}
    try:
        metrics = TRAINERS[algo](job_dir, job, t, in_phase(hooks, algo.value))
    finally:
        progress.close()
    metrics["total_s"] = time.perf_counter() - t0
    (job_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Exit as soon as the process ``parent_pid`` (the service) is no longer our parent."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the signal was asked for
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parent = os.environ.get("CHATLOOP_PARENT_PID")
    if parent:
        die_with_parent(int(parent))
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
