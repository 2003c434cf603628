"""The Admin tab's figures, drawn from hand-made histories."""

from __future__ import annotations

import pytest

from ui.plots import training_curve


def test_training_curve_draws_the_held_out_loss_on_the_steps_it_was_scored():
    history = [{"step": 1, "loss": 0.70, "reward_margin": 0.0},
               {"step": 2, "loss": 0.60, "reward_margin": 0.1, "held_out_score": 0.68},
               {"step": 3, "loss": 0.50, "reward_margin": 0.2},
               {"step": 4, "loss": 0.40, "reward_margin": 0.3, "held_out_score": 0.69}]
    lines = {line.get_label(): line for line in training_curve(history, "run 1").axes[0].get_lines()}
    assert set(lines) == {"loss", "reward margin", "held-out loss"}
    assert list(lines["held-out loss"].get_xdata()) == [2, 4]
    assert list(lines["held-out loss"].get_ydata()) == [0.68, 0.69]
    assert list(lines["loss"].get_ydata()) == [0.70, 0.60, 0.50, 0.40]
    assert "held-out loss" not in {ln.get_label() for ln in training_curve(history[:1], "t").axes[0].get_lines()}


def test_training_curve_splits_a_dpo_loss_with_thumbs_and_nll_into_its_parts():
    history = [{"step": 1, "loss": 1.2, "pairs_loss": 0.69, "thumbs_loss": 0.51, "nll": 2.5, "reward_margin": 0.0},
               {"step": 2, "loss": 1.0, "pairs_loss": 0.6, "thumbs_loss": 0.4, "nll": 2.4, "reward_margin": 0.1,
                "held_out_score": 0.66}]
    lines = {line.get_label(): line for line in training_curve(history, "run 2").axes[0].get_lines()}
    assert set(lines) == {"loss", "pairs' loss", "thumbs' loss", "chosen NLL", "reward margin", "held-out loss"}
    assert list(lines["chosen NLL"].get_ydata()) == [2.5, 2.4]
    assert list(lines["pairs' loss"].get_ydata()) == [0.69, 0.6]


def test_training_curve_of_a_policy_gradient_run_shows_reward_kl_and_entropy():
    history = [{"step": 1, "loss": 0.1, "mean_reward": 0.2, "kl": 0.0, "entropy": 3.1},
               {"step": 2, "loss": 0.0, "mean_reward": 0.4, "kl": 0.02, "entropy": 3.0}]
    lines = {line.get_label(): line for line in training_curve(history, "rloo").axes[0].get_lines()}
    assert set(lines) == {"loss", "mean reward", "KL", "entropy"}
    assert list(lines["entropy"].get_ydata()) == [3.1, 3.0]


def test_training_curve_of_a_shaped_policy_gradient_run_shows_its_reward_terms():
    history = [{"step": 1, "loss": 0.1, "mean_reward": 0.3, "kl": 0.0, "entropy": 3.4, "mean_shaped_reward": -0.3,
                "mean_relevance": 0.28, "relevance_floor": 0.28, "mean_register": 0.48, "register_floor": 0.48,
                "mean_document": -2.5, "document_floor": -2.5},
               {"step": 2, "loss": 0.0, "mean_reward": 0.5, "kl": 0.1, "entropy": 3.2, "mean_shaped_reward": 0.1,
                "mean_relevance": 0.31, "relevance_floor": 0.28, "mean_register": 0.40, "register_floor": 0.48,
                "mean_document": -2.6, "document_floor": -2.5}]
    lines = {line.get_label(): line for line in training_curve(history, "rloo").axes[0].get_lines()}
    assert set(lines) == {"loss", "mean reward", "KL", "entropy", "shaped reward", "relevance", "register",
                          "document likelihood vs start"}
    assert list(lines["register"].get_ydata()) == [0.48, 0.40]
    assert list(lines["document likelihood vs start"].get_ydata()) == pytest.approx([0.0, -0.1])
