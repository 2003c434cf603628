"""Each trainer's config, built from the service's ``[training]`` settings by one typed function.

Owns: the mapping from ``chatloop.config.TrainingDefaults`` (one flat table an operator edits) to
``DpoConfig``, ``KtoConfig``, ``RewardConfig``, ``PpoConfig``, ``RlooConfig`` and the LoRA config, and the rules
that mapping applies, written here and nowhere else:
- KTO's batches hold twice ``batch_size`` replies (at least 2): a DPO batch of n pairs is 2n
  replies, so the same setting costs both about the same per step.
- DPO's thumbs term draws as many ups as downs each step when ``kto_balance`` is on (the one
  setting decides, for KTO and DPO alike, that both kinds of thumb pull equally).
- The reward model is scored ``reward_evals_per_epoch`` times an epoch (it over-fits sooner),
  with the same patience as DPO/KTO.
"""

from __future__ import annotations

from typing import Any

from chatloop.config import TrainingDefaults


def training_settings(settings: dict[str, Any]) -> TrainingDefaults:
    """A job's settings (``dataclasses.asdict`` of the service's, in ``job.json``), typed again."""
    known = {k: v for k, v in settings.items() if k in TrainingDefaults.__dataclass_fields__}
    if "lora_target_modules" in known:
        known["lora_target_modules"] = tuple(known["lora_target_modules"])
    return TrainingDefaults(**known)


def _shared(t: TrainingDefaults) -> dict[str, Any]:
    return {"learning_rate": t.learning_rate, "epochs": t.epochs, "batch_size": t.batch_size,
            "max_prompt_tokens": t.max_prompt_tokens, "max_reply_tokens": t.max_reply_tokens, "seed": t.seed,
            "select_best": t.select_best, "select_min_heldout": t.select_min_heldout,
            "evals_per_epoch": t.evals_per_epoch, "patience": t.early_stop_patience}


def dpo_config(t: TrainingDefaults):
    from chatloop.train.dpo import DpoConfig

    return DpoConfig(**_shared(t), beta=t.beta, loss_type=t.loss_type, label_smoothing=t.label_smoothing,
                     thumbs_weight=t.dpo_thumbs_weight, thumbs_per_step=t.dpo_thumbs_per_step,
                     thumbs_balance=t.kto_balance, nll_weight=t.dpo_nll_weight)


def kto_config(t: TrainingDefaults):
    from chatloop.train.kto import KtoConfig

    return KtoConfig(**{**_shared(t), "batch_size": max(2, t.batch_size * 2)}, beta=t.beta,
                     desirable_weight=t.kto_desirable_weight, undesirable_weight=t.kto_undesirable_weight,
                     balance=t.kto_balance)


def reward_config(t: TrainingDefaults):
    from chatloop.train.reward import RewardConfig

    return RewardConfig(**{**_shared(t), "learning_rate": t.reward_learning_rate, "epochs": t.reward_epochs,
                           "evals_per_epoch": t.reward_evals_per_epoch},
                        head_learning_rate=t.reward_head_learning_rate, pointwise_weight=t.reward_pointwise_weight,
                        pooling=t.reward_pooling)


def scoring_config(t: TrainingDefaults):
    """What scoring replies with a trained reward model needs: its token limits."""
    from chatloop.train.reward import RewardConfig

    return RewardConfig(max_prompt_tokens=t.max_prompt_tokens, max_reply_tokens=t.max_reply_tokens)


def ppo_config(t: TrainingDefaults):
    from chatloop.train.ppo import PpoConfig

    return PpoConfig(learning_rate=t.ppo_learning_rate, rollout_batch_size=t.ppo_rollout_batch_size,
                     minibatch_size=t.ppo_minibatch_size, ppo_epochs=t.ppo_epochs, rollouts=t.ppo_rollouts,
                     max_new_tokens=t.ppo_max_new_tokens, max_prompt_tokens=t.max_prompt_tokens,
                     init_kl_coef=t.ppo_init_kl_coef, target_kl=t.ppo_target_kl,
                     relevance_coef=t.ppo_relevance_coef, degenerate_penalty=t.ppo_degenerate_penalty,
                     register_coef=t.ppo_register_coef, document_coef=t.ppo_document_coef,
                     temperature=t.ppo_temperature, seed=t.seed)


def rloo_config(t: TrainingDefaults):
    from chatloop.train.rloo import RlooConfig

    return RlooConfig(learning_rate=t.rloo_learning_rate, steps=t.rloo_steps, prompts_per_step=t.rloo_prompts_per_step,
                      k=t.rloo_k, epochs=t.rloo_epochs, minibatch_size=t.rloo_minibatch_size, beta=t.rloo_beta,
                      max_new_tokens=t.rloo_max_new_tokens, max_prompt_tokens=t.max_prompt_tokens,
                      normalize_advantages=t.rloo_normalize_advantages,
                      relevance_coef=t.rloo_relevance_coef, degenerate_penalty=t.rloo_degenerate_penalty,
                      register_coef=t.rloo_register_coef, document_coef=t.rloo_document_coef,
                      temperature=t.rloo_temperature, seed=t.seed)


def lora_config(t: TrainingDefaults):
    from peft import LoraConfig

    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=list(t.lora_target_modules), task_type="CAUSAL_LM")
