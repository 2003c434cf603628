"""KTO and the reward model on tiny problems with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from chatloop.train.kto import KtoConfig, balanced_weights, kto_loss, thumb_accuracies, train_kto
from chatloop.train.reward import RewardConfig, RewardModel, bradley_terry_loss, evaluate_pairs, score, train_reward


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_loss_matches_hand_computation():
    pol, ref = torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -4.0])
    des = torch.tensor([True, False])
    kl_p, kl_r = torch.tensor([-6.0, -7.0]), torch.tensor([-6.5, -7.1])  # mean difference 0.3
    losses, rewards, kl = kto_loss(pol, ref, des, kl_p, kl_r, beta=0.5, desirable_weight=1.5, undesirable_weight=0.7)
    assert kl.item() == pytest.approx(0.3)
    assert losses[0].item() == pytest.approx(1.5 * (1 - _sig(0.5 * (1.0 - 0.3))), abs=1e-6)
    assert losses[1].item() == pytest.approx(0.7 * (1 - _sig(0.5 * (0.3 - (-1.0)))), abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.5])
    _, _, kl0 = kto_loss(pol, ref, des, kl_r, kl_p, beta=0.5)  # negative estimate: clamped to 0
    assert kl0.item() == 0.0


def test_kto_balance_weighs_both_kinds_of_thumb_equally():
    # 91 up, 53 down (an efficacy run's split): the ratio 1.72 is outside [1, 4/3], so the
    # undesirable weight rises until w_d * n_d == w_u * n_u
    wd, wu = balanced_weights(91, 53)
    assert wd == 1.0 and wd * 91 == pytest.approx(wu * 53)
    wd, wu = balanced_weights(10, 40, 1.0, 2.0)  # ratio 1/8: the desirable weight rises
    assert wu == 2.0 and wd * 10 == pytest.approx(wu * 40)
    assert balanced_weights(12, 10, 1.0, 1.0) == (1.0, 1.0)  # 1.2 is in range: left alone
    assert balanced_weights(5, 0) == (1.0, 1.0)


def test_kto_gate_accuracy_ranks_up_against_down_and_ignores_a_common_shift():
    rewards = torch.tensor([-0.1, -0.3, -0.5, -0.3])  # every reward pushed below 0, yet ordered
    desirable = torch.tensor([True, True, False, False])
    ranking, sign = thumb_accuracies(rewards, desirable)
    # pairs (up, down): (-0.1,-0.5) (-0.1,-0.3) (-0.3,-0.5) right, (-0.3,-0.3) a tie -> 3.5 / 4
    assert ranking == pytest.approx(3.5 / 4) and sign == pytest.approx(2 / 4)
    assert thumb_accuracies(rewards + 7.0, desirable)[0] == pytest.approx(ranking)
    assert thumb_accuracies(torch.zeros(4), desirable) == (0.5, 0.5)  # the reference
    assert thumb_accuracies(rewards[:2], desirable[:2]) == (0.0, 0.0)  # one kind: the sign decides


def test_kto_training_uses_the_balanced_weights(tiny_model_dir):
    tok, model = _lora_model(tiny_model_dir)
    p = [{"role": "user", "content": "Hi"}]
    rows = [{"prompt": p, "completion": f"yes {i}", "label": True} for i in range(6)] + [
        {"prompt": p, "completion": "no", "label": False}, {"prompt": p, "completion": "nope", "label": False}]
    m = train_kto(model, tok, rows, [], KtoConfig(epochs=1, batch_size=4, learning_rate=1e-4))
    assert (m["desirable_weight"], m["undesirable_weight"]) == (1.0, pytest.approx(3.0))
    m = train_kto(model, tok, rows, [], KtoConfig(epochs=1, batch_size=4, learning_rate=1e-4, balance=False))
    assert (m["desirable_weight"], m["undesirable_weight"]) == (1.0, 1.0)
    # the loss the gate compares with the first step's is weighted alike: with nothing learned
    # (lr 0) every example's loss is w * (1 - sigmoid(0)) = w / 2, so (6 * 1 + 2 * 3) / 2 / 8
    _, fresh = _lora_model(tiny_model_dir)
    m = train_kto(fresh, tok, rows, [], KtoConfig(epochs=1, batch_size=4, learning_rate=0.0))
    assert m["train_eval"]["loss"] == pytest.approx((6 * 1 + 2 * 3) / 2 / 8, abs=1e-5)


def test_kto_selection_starts_from_the_loss_the_untrained_model_scores(tiny_model_dir):
    """The starting held-out score is computed, not measured: with nothing learned (lr 0) every
    measured score must equal it, and the starting weights are handed back (ties keep the earlier)."""
    tok, model = _lora_model(tiny_model_dir)
    p = [{"role": "user", "content": "Hi"}]
    rows = [{"prompt": p, "completion": f"yes {i}", "label": True} for i in range(6)] + [
        {"prompt": p, "completion": "no", "label": False}, {"prompt": p, "completion": "nope", "label": False}]
    held = [{"prompt": p, "completion": "yes again", "label": True},
            {"prompt": p, "completion": "no again", "label": False}, {"prompt": p, "completion": "nah", "label": False}]
    m = train_kto(model, tok, rows, held, KtoConfig(epochs=2, batch_size=4, learning_rate=0.0, patience=0))
    scores = [s["score"] for s in m["selection"]["scores"]]
    assert len(scores) == 5 and scores[0] == pytest.approx((1 * 1 + 2 * 3) / 2 / 3)
    assert scores == pytest.approx([scores[0]] * 5, abs=1e-6)
    assert m["selection"]["best_step"] == 0 and m["held_out"]["loss"] == pytest.approx(scores[0], abs=1e-6)
    # the computed starting metrics are what measuring the untrained model gives
    _, fresh = _lora_model(tiny_model_dir)
    measured = train_kto(fresh, tok, rows, held, KtoConfig(epochs=1, batch_size=4, learning_rate=0.0,
                                                            select_best=False))["held_out"]
    assert measured == pytest.approx(m["held_out"], abs=1e-6)


def test_bradley_terry_loss_matches_hand_computation():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(
        -(math.log(_sig(1.0)) + math.log(_sig(-2.0))) / 2, abs=1e-6)
    assert bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.5])).item() == pytest.approx(
        -(math.log(_sig(0.5)) + math.log(_sig(-2.5))) / 2, abs=1e-6)
    assert bradley_terry_loss(rc, rr, center_coefficient=0.1).item() == pytest.approx(
        -(math.log(_sig(1.0)) + math.log(_sig(-2.0))) / 2 + 0.1 * (1 + 4) / 2, abs=1e-6)


def _lora_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return tok, model


def test_kto_raises_the_desirable_pattern(tiny_model_dir):
    tok, model = _lora_model(tiny_model_dir)
    rows = []
    for i in range(8):
        p = [{"role": "user", "content": f"Tell me about topic {i}"}]
        rows += [{"prompt": p, "completion": "Sure, happy to help.", "label": True},
                 {"prompt": p, "completion": "Go away.", "label": False}]
    held = [{"prompt": [{"role": "user", "content": "Something new"}], "completion": "Sure, happy to help.", "label": True},
            {"prompt": [{"role": "user", "content": "Something new"}], "completion": "Go away.", "label": False}]
    m = train_kto(model, tok, rows, held, KtoConfig(epochs=4, batch_size=4, learning_rate=5e-3))
    assert m["final_loss"] < m["first_loss"]
    assert m["held_out"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="both"):
        train_kto(model, tok, [r for r in rows if r["label"]], [], KtoConfig())


@pytest.mark.parametrize("grid", [(), (0.05, 0.5)])
def test_head_warm_start_solves_the_regularised_logistic_regression(tiny_model_dir, grid):
    """The linear probe's head is the optimum of mean(-log sigmoid(w . d)) + l2 |w|^2 over the
    frozen states' differences d: its gradient vanishes, checked here in closed form, and the
    model's own scores give the same margins. With a grid, at the l2 cross-validation chose."""
    from chatloop.train.common import collate_groups, encode_reply
    from chatloop.train.reward import _features, warm_start_head

    tok, lm = _lora_model(tiny_model_dir)
    rm = RewardModel(lm, lm.get_base_model().config.hidden_size)
    words = ["apple", "river", "stone", "cloud", "ember", "maple", "quartz", "willow"]
    pairs = [(encode_reply(tok, [{"role": "user", "content": f"say something {i}"}], f"{words[i % 8]} {words[(i * 3) % 8]}", 64, 16),
              encode_reply(tok, [{"role": "user", "content": f"say something {i}"}], f"{words[(i + 5) % 8]}!", 64, 16))
             for i in range(10)]
    out = warm_start_head(rm, pairs, tok.pad_token_id, 0.05, batch_size=4, l2_grid=grid, folds=5)
    l2 = out["probe_l2"]
    assert ("probe_cv_loss" in out) == bool(grid) and (l2 in grid if grid else l2 == 0.05)
    feats = _features(rm, pairs, tok.pad_token_id, batch_size=3).double()  # another batching
    d = feats[:, 0] - feats[:, 1]
    w = rm.head.weight.detach().double()[0]
    grad = -(torch.sigmoid(-(d @ w))[:, None] * d).mean(0) + 2 * l2 * w
    assert w.abs().max() > 1e-3 and grad.abs().max() < 1e-4
    assert out["probe_loss"] < math.log(2) and out["probe_accuracy"] == pytest.approx(float(((d @ w) > 0).double().mean()))
    with torch.no_grad():  # the head's margins on the model's own forward, one batch of all pairs
        s = rm(collate_groups(pairs, tok.pad_token_id)).double()
    torch.testing.assert_close(s[:10] - s[10:], d @ w, rtol=1e-4, atol=1e-4)


def test_the_probe_l2_is_chosen_by_cross_validation_over_prompt_folds():
    """Pairs of one prompt share a fold. On features that are noise, probes fitted with a small
    l2 learn their folds by heart and lose on the others: the largest l2 wins; on a clean signal
    in a few features the smallest does. (Scored on the folds they were fitted on, the smallest
    would always win.)"""
    from chatloop.train.common import Encoded
    from chatloop.train.reward import _fit_probe, choose_probe_l2, prompt_folds

    enc = [(Encoded([p, 7], [1]), Encoded([p, 7], [2])) for p in [3, 3, 4, 5, 5, 5, 6, 3]]
    assert prompt_folds(enc, 3).tolist() == [0, 0, 1, 2, 2, 2, 0, 0]
    gen = torch.Generator().manual_seed(0)
    grid = (0.001, 0.1, 10.0)
    noise = torch.randn(60, 200, generator=gen, dtype=torch.float64)
    assert choose_probe_l2(noise, torch.arange(60) % 5, grid)[0] == 10.0
    signal = torch.randn(400, 4, generator=gen, dtype=torch.float64)
    signal[:, 0] = 3.0 + 0.5 * signal[:, 0]  # the chosen reply is ahead on feature 0, always
    chosen, losses = choose_probe_l2(signal, torch.arange(400) % 5, grid)
    assert chosen == 0.001 and losses[0.001] < losses[10.0]
    # the pooled fold loss, recomputed by hand for one l2
    fold = torch.arange(400) % 5
    by_hand = torch.cat([-F.logsigmoid(signal[fold == k] @ _fit_probe(signal[fold != k], 0.1)) for k in range(5)]).mean()
    assert losses[0.1] == pytest.approx(float(by_hand))


@pytest.mark.parametrize("pooling", ["last", "last_mean"])
def test_reward_features_are_the_last_reply_state_and_the_mean_over_the_reply(tiny_model_dir, pooling):
    """The head's inputs, against a plain forward pass of each (prompt, reply) alone: the final
    state at the reply's last token, and (last_mean) the mean of the final states over its tokens;
    replies of different lengths share a padded batch."""
    from chatloop.train.common import collate_groups, encode_reply

    tok, lm = _lora_model(tiny_model_dir)
    rm = RewardModel(lm, lm.get_base_model().config.hidden_size, pooling)
    items = [(encode_reply(tok, [{"role": "user", "content": "Tell me about owls"}], "They hunt at night.", 64, 32),
              encode_reply(tok, [{"role": "user", "content": "Tell me about owls"}], "Owls are birds of prey with soft feathers.", 64, 32)),
             (encode_reply(tok, [{"role": "user", "content": "Hi"}], "Hello!", 64, 32),
              encode_reply(tok, [{"role": "user", "content": "Hi"}], "Hello there, how can I help you today?", 64, 32))]
    with torch.no_grad():
        got = rm.features(collate_groups(items, tok.pad_token_id))  # rows k * B + b
        assert got.shape[-1] == lm.get_base_model().config.hidden_size * (2 if pooling == "last_mean" else 1)
        for b, group in enumerate(items):
            for k, e in enumerate(group):
                ids = torch.tensor([e.prompt_ids + e.reply_ids])
                states = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, len(e.prompt_ids):]
                want = states[-1] if pooling == "last" else torch.cat([states[-1], states.mean(dim=0)])
                torch.testing.assert_close(got[k * len(items) + b], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="pooling"):
        RewardModel(lm, 8, "first")


def test_a_reward_model_saved_before_the_pooling_choice_loads_as_last_token(tiny_model_dir, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    tok, lm = _lora_model(tiny_model_dir)
    rm = RewardModel(lm, lm.get_base_model().config.hidden_size, "last")
    rm.save(tmp_path / "rm", {})
    meta = json.loads((tmp_path / "rm" / "reward.json").read_text())
    assert meta.pop("pooling") == "last"
    (tmp_path / "rm" / "reward.json").write_text(json.dumps(meta))  # as artifacts were written before
    again = RewardModel.load(tmp_path / "rm", AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert again.pooling == "last" and again.head.in_features == rm.head.in_features


@pytest.mark.parametrize("pooling", ["last", "last_mean"])
@pytest.mark.parametrize("warm_start", [True, False])
def test_reward_model_ranks_held_out_pairs_and_round_trips(tiny_model_dir, tmp_path, warm_start, pooling):
    from transformers import AutoModelForCausalLM

    tok, lm = _lora_model(tiny_model_dir)
    torch.manual_seed(0)
    rm = RewardModel(lm, lm.get_base_model().config.hidden_size, pooling)
    good, bad = "Sure, happy to help.", "Go away."
    pairs = [{"prompt": [{"role": "user", "content": f"Question number {i}"}], "chosen": good, "rejected": bad}
             for i in range(12)]
    held = [{"prompt": [{"role": "user", "content": f"A new question {i}"}], "chosen": good, "rejected": bad}
            for i in range(4)]
    thumbs = [{"prompt": p["prompt"], "completion": good, "label": True} for p in pairs[:4]]
    cfg = RewardConfig(epochs=3, batch_size=4, learning_rate=3e-3, pointwise_weight=0.1, head_warm_start=warm_start)
    seen: list[dict] = []
    m = train_reward(rm, tok, pairs, held, cfg, thumbs, on_step=seen.append)
    assert ("probe_accuracy" in m) == warm_start
    # the warm start's forward pass over the pairs shows progress as its own phase, before training's steps
    probe = [(x["step"], x["total"]) for x in seen if x.get("phase") == "reward probe"]
    assert probe == ([(4, 12), (8, 12), (12, 12)] if warm_start else [])
    assert [x["step"] for x in seen if "phase" not in x] == list(range(1, m["steps"] + 1))
    assert m["held_out"]["accuracy"] == 1.0 and m["held_out"]["margin"] > 0
    rm.save(tmp_path / "rm", {"test": True})
    again = RewardModel.load(tmp_path / "rm", AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert again.pooling == pooling
    items = [(held[0]["prompt"], good), (held[0]["prompt"], bad)]
    assert score(again, tok, items, cfg) == pytest.approx(score(rm, tok, items, cfg), abs=1e-5)


def test_a_reward_model_of_zero_epochs_is_its_probed_head(tiny_model_dir):
    """``epochs = 0``: no LoRA step, the head the probe fitted is the model (its held-out figures
    are that head's), and without the warm start there is nothing to train: a clear error."""
    good, bad = "Sure, happy to help.", "Go away."
    pairs = [{"prompt": [{"role": "user", "content": f"Question number {i}"}], "chosen": good, "rejected": bad}
             for i in range(12)]
    held = [{"prompt": [{"role": "user", "content": f"A new question {i}"}], "chosen": good, "rejected": bad}
            for i in range(4)]
    tok, lm = _lora_model(tiny_model_dir)
    rm = RewardModel(lm, lm.get_base_model().config.hidden_size)
    seen: list[dict] = []
    m = train_reward(rm, tok, pairs, held, RewardConfig(epochs=0, batch_size=4), on_step=seen.append)
    assert m["steps"] == 0 and m["history"] == [] and all(x.get("phase") == "reward probe" for x in seen)
    assert all(not p.any() for n, p in rm.lm.named_parameters() if "lora_B" in n)  # the LoRA untouched
    assert rm.head.weight.abs().max() > 0 and m["final_loss"] == m["probe_loss"] < math.log(2)
    assert m["held_out"] == evaluate_pairs(rm, tok, held, RewardConfig()) and m["held_out"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="warm_start"):
        train_reward(rm, tok, pairs, held, RewardConfig(epochs=0, head_warm_start=False))


def test_reward_model_hands_back_its_best_checkpoint_head_included(tiny_model_dir):
    """Held-out pairs that contradict the training pairs: every update raises their loss, so the
    checkpoint handed back is the start. Without the warm start that is a zero head (every score
    exactly 0, held-out loss log 2) on an untouched LoRA (its B matrices still zero), which fails
    if the head, which lives outside the LoRA model, were not part of the checkpoint. With
    agreeing held-out pairs training moves on and the held-out figures are the best ones scored."""
    good, bad = "Sure, happy to help.", "Go away."
    pairs = [{"prompt": [{"role": "user", "content": f"Question number {i}"}], "chosen": good, "rejected": bad}
             for i in range(8)]
    flipped = [{"prompt": [{"role": "user", "content": f"A new question {i}"}], "chosen": bad, "rejected": good}
               for i in range(2)]
    cfg = RewardConfig(epochs=3, batch_size=4, learning_rate=3e-3, head_warm_start=False, evals_per_epoch=2,
                       patience=3)

    tok, lm = _lora_model(tiny_model_dir)
    torch.manual_seed(0)
    rm = RewardModel(lm, lm.get_base_model().config.hidden_size)
    m = train_reward(rm, tok, pairs, flipped, cfg)
    sel = m["selection"]
    assert m["final_loss"] < m["first_loss"]  # it did learn the training pairs ...
    assert sel["best_step"] == 0 and sel["stopped_early"] and m["steps"] == 3  # ... and stopped after patience
    assert sel["scores"][0]["score"] == pytest.approx(math.log(2))  # scored, not assumed
    assert m["held_out"] == {"accuracy": 0.5, "margin": 0.0, "loss": pytest.approx(math.log(2)), "pairs": 2}
    assert not rm.head.weight.any() and not rm.head.bias.any()
    assert all(not p.any() for n, p in rm.lm.named_parameters() if "lora_B" in n)
    assert score(rm, tok, [(p["prompt"], p["chosen"]) for p in pairs[:3]], cfg) == [0.0, 0.0, 0.0]

    tok, lm = _lora_model(tiny_model_dir)
    torch.manual_seed(0)
    rm = RewardModel(lm, lm.get_base_model().config.hidden_size)
    agreeing = [{**p, "chosen": good, "rejected": bad} for p in flipped]
    m = train_reward(rm, tok, pairs, agreeing, cfg)
    sel = m["selection"]
    assert sel["best_step"] > 0 and m["held_out"]["loss"] == pytest.approx(sel["best_score"])
    assert m["held_out"]["loss"] == pytest.approx(min(s["score"] for s in sel["scores"]))
    assert m["held_out"]["accuracy"] == 1.0
