"""PPO: each piece against a hand computation, per-token log-probs against full logits, a PPO
update that moves probability towards the rewarded reply, and the whole loop with a reward model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from chatloop.train.common import Encoded, collate
from chatloop.train.ppo import (AdaptiveKLController, PpoConfig, Rollout, clipped_policy_loss,
                                clipped_value_loss, gae, kl_penalized_rewards, masked_mean, ppo_update,
                                token_forward, train_ppo, whiten)


def test_gae_matches_a_hand_computed_example():
    # one row of 3 reply tokens and a padded row of 2; gamma 0.9, lambda 0.8
    r = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 0.0]])
    v = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.3, 9.9]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - 0.6 = 0.4; d1 = 0 + 0.9*0.6 - 0.4 = 0.14; d0 = 0 + 0.9*0.4 - 0.2 = 0.16
    a2 = 0.4
    a1 = 0.14 + 0.72 * a2
    a0 = 0.16 + 0.72 * a1
    # row 1 (the 9.9 is padding and must not leak): d1 = -1 - 0.3 = -1.3; d0 = 0.5 + 0.9*0.3 - 0.1 = 0.67
    b1 = -1.3
    b0 = 0.67 + 0.72 * b1
    assert adv.flatten().tolist() == pytest.approx([a0, a1, a2, b0, b1, 0.0], abs=1e-6)
    assert ret.flatten().tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, a2 + 0.6, b0 + 0.1, b1 + 0.3, 0.0], abs=1e-6)


def test_kl_penalty_and_score_placement():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -0.5, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(logp, ref, m, torch.tensor([2.0, -1.0]), kl_coef=0.1)
    assert kl.flatten().tolist() == pytest.approx([0.5, 0.0, -1.0, 1.0, -0.5, 0.0])
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.0, 0.1 + 2.0, -0.1, 0.05 - 1.0, 0.0])


def test_clipped_policy_and_value_losses_exactly():
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.9]]))  # ratios 1.5, 1.5, 0.9
    m = torch.ones(1, 3)
    loss, clipfrac = clipped_policy_loss(new, old, adv, m, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(1.5, 1.2) = 1.5; token 2: max(-1.8, -1.8) = -1.8
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 1.8) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)
    v = torch.tensor([[1.0, 0.0]])
    v_old = torch.tensor([[0.5, 0.0]])
    ret = torch.tensor([[0.0, 1.0]])
    vl = clipped_value_loss(v, v_old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: max((1-0)^2, (0.7-0)^2) = 1; token 1: max(1, 1) = 1
    assert vl.item() == pytest.approx(0.5 * (1 + 1) / 2)


def test_whiten_and_adaptive_kl_controller():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, :3].std().item() == pytest.approx(1.0, abs=1e-4) and w[0, 3] == 0
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    assert ctl.update(5.4, 10) == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))


def test_token_forward_equals_full_logits(tiny_loaded):
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    items = [Encoded([1, 5, 9, 14], [20, 21, 2]), Encoded([1, 7], [30, 2])]
    lp, ent, _, m = token_forward(model, None, collate(items, tok.pad_token_id), temperature=0.7)
    for i, e in enumerate(items):
        ids = torch.tensor([e.prompt_ids + e.reply_ids])
        logp = F.log_softmax(model(ids).logits[0].float() / 0.7, dim=-1)
        n = len(e.prompt_ids)
        expected = [logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1])]
        assert lp[i, : len(expected)].tolist() == pytest.approx(expected, abs=1e-4)
        assert m[i].sum() == len(expected)
        ent_ref = -(logp[n - 1].exp() * logp[n - 1]).sum().item()
        assert ent[i, 0].item() == pytest.approx(ent_ref, abs=1e-3)


def _policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                     task_type="CAUSAL_LM"))


def test_ppo_update_moves_probability_to_the_rewarded_reply(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    policy = _policy(tiny_model_dir)
    prompt = list(tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"])
    good, bad = (tok(t, add_special_tokens=False)["input_ids"] for t in ("good", "bad"))
    batch = collate([Encoded(prompt, good), Encoded(prompt, bad)] * 4, tok.pad_token_id)
    cfg = PpoConfig(learning_rate=1e-2, minibatch_size=4, ppo_epochs=4)
    head = torch.nn.Linear(policy.get_base_model().config.hidden_size, 1)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    with torch.no_grad():
        lp, _, v, m = token_forward(policy, head, batch)
    start = [(lp[i] * m[i]).sum().item() for i in (0, 1)]
    for _ in range(3):  # three rollouts on the same two replies: +1 for 'good', -1 for 'bad'
        with torch.no_grad():
            lp, _, v, m = token_forward(policy, head, batch)
            rewards, _ = kl_penalized_rewards(lp, lp, m, torch.tensor([1.0, -1.0] * 4), 0.0)
            adv, ret = gae(rewards, v, m, 1.0, 0.95)
        ppo_update(policy, head, opt, params, Rollout(batch, m, lp, v, whiten(adv, m), ret), cfg,
                   torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp, _, _, m = token_forward(policy, head, batch)
    end = [(lp[i] * m[i]).sum().item() for i in (0, 1)]
    assert end[0] > start[0] + 1.0 and end[1] < start[1] - 1.0


def test_train_ppo_runs_with_kl_tracking_and_reports_metrics(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = _policy(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    seen = []
    cfg = PpoConfig(rollout_batch_size=4, minibatch_size=2, ppo_epochs=2, rollouts=3, max_new_tokens=6,
                    learning_rate=1e-3)
    m = train_ppo(policy, reference, tok, prompts, lambda items: [float(len(t)) / 10 for _, t in items], cfg,
                  on_step=seen.append)
    assert [h["rollout"] for h in seen] == [0, 1, 2] and seen[-1]["step"] == seen[-1]["total"] == 12
    for key in ("mean_reward", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "kl_coef"):
        assert all(math.isfinite(h[key]) for h in seen), key
    assert seen[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts equal to the reference
    assert m["final_kl"] != 0.0


def test_relevance_in_the_reward_is_the_gates_pmi(tiny_model_dir):
    """The relevance PPO adds to a reply's score is ``relevance.pmi_per_token`` of the base model
    (the policy with its adapter off), reusing the reference pass or not, and 0 for an empty reply."""
    from transformers import AutoTokenizer

    from chatloop.train.ppo import _relevance
    from chatloop.train.relevance import pmi_per_token

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = _policy(tiny_model_dir)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # the adapter must not leak into the base's figure
    policy.eval()
    g = torch.Generator().manual_seed(3)
    eos = tok.eos_token_id
    prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (6, 4, 6, 8)]
    prompts[2] = prompts[0]  # a prompt drawn twice: compared with another prompt, not itself
    replies = [torch.randint(3, 60, (n,), generator=g).tolist() + [eos] for n in (3, 5, 2)] + [[eos]]
    cpu = torch.device("cpu")
    with torch.no_grad():
        with policy.disable_adapter():
            base_lp, _, _, mask = token_forward(policy, None, collate([Encoded(p, y) for p, y in zip(prompts, replies)],
                                                                      tok.pad_token_id))
        got = _relevance(policy, None, prompts, replies, mask, tok, cpu)
        reused = _relevance(policy, base_lp, prompts, replies, mask, tok, cpu)
        with policy.disable_adapter():
            want = pmi_per_token(policy, tok, prompts, replies)
    assert want[-1] is None and float(got[-1]) == 0.0
    torch.testing.assert_close(got[:-1], torch.tensor(want[:-1]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reused, got)
    assert got[:-1].abs().max() > 1e-3


def _scores_reaching_rewards(monkeypatch) -> list[torch.Tensor]:
    """The sequence scores PPO turns into per-token rewards, each rollout's as it is passed on."""
    from chatloop.train import ppo

    seen: list[torch.Tensor] = []
    real = ppo.kl_penalized_rewards
    monkeypatch.setattr(ppo, "kl_penalized_rewards",
                        lambda logp, ref, mask, scores, coef: (seen.append(scores.clone()),
                                                               real(logp, ref, mask, scores, coef))[1])
    return seen


def test_the_relevance_term_only_penalises_falling_below_the_start(tiny_model_dir, monkeypatch):
    """With ``relevance_coef`` each score loses coef x (relevance - the first rollout's mean) where
    that is negative, and gains nothing above it; with no reference model the base (the policy's
    adapter off) is the reference, so the first rollout's KL is 0."""
    from transformers import AutoTokenizer

    from chatloop.train import ppo

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = _policy(tiny_model_dir)
    relevances = iter([torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([-1.0, 1.5, 5.0, 1.5])])
    monkeypatch.setattr(ppo, "_relevance", lambda *a, **k: next(relevances))
    seen_scores = _scores_reaching_rewards(monkeypatch)
    cfg = PpoConfig(rollout_batch_size=4, minibatch_size=4, ppo_epochs=1, rollouts=2, max_new_tokens=4,
                    learning_rate=1e-3, relevance_coef=2.0)
    seen = []
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    train_ppo(policy, None, tok, prompts, lambda items: [1.0] * len(items), cfg, on_step=seen.append)
    assert [h["relevance_floor"] for h in seen] == [1.5, 1.5]  # the first rollout's mean, kept
    assert [h["mean_relevance"] for h in seen] == [1.5, 1.75]
    assert [h["mean_reward"] for h in seen] == [1.0, 1.0]  # the reward model's, as logged
    assert [h["mean_shaped_reward"] for h in seen] == [0.0, -0.25]
    assert seen_scores[0].tolist() == [1 - 3.0, 1 - 1.0, 1.0, 1.0]
    assert seen_scores[1].tolist() == [1 - 5.0, 1.0, 1.0, 1.0]
    assert seen[0]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_the_register_term_reaches_the_score_above_the_start(tiny_model_dir, monkeypatch):
    """With ``register_coef`` each score loses coef x (register gap - the first rollout's mean)
    where that is positive; the floor and the mean register are logged."""
    from transformers import AutoTokenizer

    from chatloop.train import register

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = _policy(tiny_model_dir)
    gaps = iter([torch.tensor([0.0, 0.5, 1.0, 0.5]), torch.tensor([2.0, 0.0, 0.5, 1.0])])
    monkeypatch.setattr(register, "sampled_framing", lambda *a, **k: (next(gaps), torch.zeros(4)))
    seen_scores = _scores_reaching_rewards(monkeypatch)
    cfg = PpoConfig(rollout_batch_size=4, minibatch_size=4, ppo_epochs=1, rollouts=2, max_new_tokens=4,
                    learning_rate=1e-3, register_coef=3.0)
    seen = []
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    train_ppo(policy, None, tok, prompts, lambda items: [1.0] * len(items), cfg, on_step=seen.append)
    assert [h["register_floor"] for h in seen] == [0.5, 0.5]
    assert [h["mean_register"] for h in seen] == [0.5, 0.875]
    assert seen_scores[0].tolist() == [1.0, 1.0, 1 - 1.5, 1.0]
    assert seen_scores[1].tolist() == [1 - 4.5, 1.0, 1.0, 1 - 1.5]


def test_a_degenerate_reply_loses_the_penalty_in_its_score(tiny_model_dir, monkeypatch):
    """``degenerate_penalty`` reaches PPO's per-token rewards through the scores (rows the rule
    flags lose it) and its share is logged."""
    from transformers import AutoTokenizer

    from chatloop.train import ppo

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = _policy(tiny_model_dir)
    flagged = torch.tensor([0.0, 1.0, 0.0, 0.0])
    monkeypatch.setattr(ppo, "degenerate_penalty",
                        lambda p, r, eos, coef, device=None: (-coef * flagged, float(flagged.mean())))
    seen_scores = _scores_reaching_rewards(monkeypatch)
    cfg = PpoConfig(rollout_batch_size=4, minibatch_size=4, ppo_epochs=1, rollouts=1, max_new_tokens=4,
                    learning_rate=1e-3, degenerate_penalty=2.0)
    seen = []
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    train_ppo(policy, None, tok, prompts, lambda items: [1.0] * len(items), cfg, on_step=seen.append)
    assert seen_scores[0].tolist() == [1.0, -1.0, 1.0, 1.0]
    assert seen[0]["degenerate_share"] == 0.25 and seen[0]["mean_shaped_reward"] == 0.5
