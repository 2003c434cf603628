"""The one typed mapping from ``[training]`` settings to each trainer's config (chatloop.train.configs):
a job's settings read back equal, every trainer field shared with the settings comes from them,
and the mapping's own rules hold."""

from __future__ import annotations

import dataclasses
import json

from chatloop.config import TrainingDefaults
from chatloop.train import configs


def test_a_jobs_settings_read_back_as_the_same_typed_settings():
    t = TrainingDefaults(beta=0.3, lora_target_modules=("q_proj",), kto_balance=False)
    job_settings = json.loads(json.dumps(dataclasses.asdict(t)))  # as job.json holds them
    assert configs.training_settings(job_settings) == t
    assert configs.training_settings({**job_settings, "a_setting_of_an_older_release": 1}) == t


def test_each_config_takes_its_fields_from_the_settings_and_applies_the_rules():
    t = TrainingDefaults(learning_rate=3e-4, epochs=5, batch_size=3, max_prompt_tokens=100, max_reply_tokens=50,
                         seed=7, select_best=False, evals_per_epoch=3, early_stop_patience=4, beta=0.2,
                         kto_balance=False, dpo_thumbs_weight=0.5, reward_learning_rate=2e-4, reward_epochs=1,
                         reward_evals_per_epoch=6, ppo_learning_rate=5e-5, ppo_rollouts=9,
                         rloo_learning_rate=2e-5, rloo_k=6, rloo_steps=3, rloo_beta=0.2, ppo_relevance_coef=2.0,
                         ppo_temperature=0.7, rloo_relevance_coef=3.0, rloo_temperature=0.8,
                         ppo_degenerate_penalty=1.5, rloo_degenerate_penalty=2.5)
    dpo, kto, rm, ppo = configs.dpo_config(t), configs.kto_config(t), configs.reward_config(t), configs.ppo_config(t)
    for cfg in (dpo, kto, rm):
        assert (cfg.max_prompt_tokens, cfg.max_reply_tokens, cfg.seed, cfg.select_best, cfg.patience) == (
            100, 50, 7, False, 4)
    assert (dpo.learning_rate, dpo.epochs, dpo.batch_size, dpo.beta, dpo.evals_per_epoch) == (3e-4, 5, 3, 0.2, 3)
    assert dpo.thumbs_weight == 0.5 and dpo.thumbs_balance is False  # kto_balance decides for DPO's thumbs too
    assert kto.batch_size == 6 and kto.balance is False  # twice the pairs' batch: the same replies per step
    assert configs.kto_config(dataclasses.replace(t, batch_size=0)).batch_size == 2
    assert (rm.learning_rate, rm.epochs, rm.evals_per_epoch, rm.batch_size) == (2e-4, 1, 6, 3)
    assert (ppo.learning_rate, ppo.rollouts, ppo.max_prompt_tokens, ppo.seed) == (5e-5, 9, 100, 7)
    assert (ppo.relevance_coef, ppo.temperature, ppo.degenerate_penalty) == (2.0, 0.7, 1.5)
    rloo = configs.rloo_config(t)
    assert (rloo.learning_rate, rloo.k, rloo.steps, rloo.beta, rloo.max_prompt_tokens, rloo.seed) == (
        2e-5, 6, 3, 0.2, 100, 7)
    assert (rloo.relevance_coef, rloo.temperature, rloo.degenerate_penalty) == (3.0, 0.8, 2.5)
    lora = configs.lora_config(t)
    assert lora.r == t.lora_r and set(lora.target_modules) == set(t.lora_target_modules)
