"""RLOO on a tiny model: the leave-one-out baseline against known answers, and the loop moves the
policy toward what the reward function likes, with its KL and per-step figures logged. (Its math
against TRL's own RLOOTrainer code: tests/test_trl_reference.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from chatloop.train.rloo import RlooConfig, rloo_advantages, rloo_loss, train_rloo


def test_the_baseline_leaves_each_reply_out():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    adv, rewards = rloo_advantages(scores, torch.zeros(8), k=4, beta=0.1)
    # reply 0: 1 - mean(2, 3, 6) = -8/3; reply 3: 6 - mean(1, 2, 3) = 4
    assert adv[:4].tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    assert adv[4:].tolist() == pytest.approx([-4 / 3, -4 / 3, -4 / 3, 4.0])
    assert float(adv.view(-1, 4).sum(dim=1).abs().max()) < 1e-6  # zero-sum within each prompt
    # the KL penalty is taken from the reward before the baseline
    adv2, r2 = rloo_advantages(scores, torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 0]), k=4, beta=0.1)
    assert r2[0] == pytest.approx(0.0) and adv2[0] == pytest.approx(0 - 11 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(scores, torch.zeros(8), k=1, beta=0.1)


def test_the_loss_clips_the_sequence_ratio():
    adv = torch.tensor([1.0, -1.0])
    old = torch.tensor([0.0, 0.0])
    loss, frac = rloo_loss(torch.log(torch.tensor([1.5, 0.5])), old, adv, 0.2)
    # ratio 1.5 with A = +1 is clipped to 1.2; ratio 0.5 with A = -1 is clipped to 0.8
    assert float(loss) == pytest.approx(-(1.2 * 1 + 0.8 * -1) / 2) and float(frac) == 1.0
    loss, frac = rloo_loss(torch.log(torch.tensor([1.1, 1.1])), old, adv, 0.2)
    assert float(loss) == pytest.approx(-(1.1 - 1.1) / 2) and float(frac) == 0.0


def _policy(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                     task_type="CAUSAL_LM"))


def _word_model():
    """A 1-layer Llama over 40 words, peaked enough (initializer 0.3) that what it samples varies
    with its weights; its chat template joins the messages' text."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(40)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         initializer_range=0.3, pad_token_id=0, eos_token_id=1, bos_token_id=None))
    policy = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                              task_type="CAUSAL_LM"))
    return policy, tok


def test_train_rloo_moves_the_policy_toward_the_reward():
    """The reward is the share of a reply's words that are "w5": the share rises well above where
    it started, the KL to the reference grows from zero, and every per-step figure is logged."""
    policy, tok = _word_model()
    prompts = [[{"role": "user", "content": f"w{i} w{i + 1}"}] for i in range(10, 18)]

    def reward(items):
        return [t.split().count("w5") / max(len(t.split()), 1) for _, t in items]

    seen = []
    cfg = RlooConfig(learning_rate=3e-2, prompts_per_step=4, k=4, steps=24, minibatch_size=8, max_new_tokens=6,
                     beta=0.01)
    m = train_rloo(policy, None, tok, prompts, reward, cfg, on_step=seen.append)
    assert [h["step"] for h in seen] == list(range(1, 25)) and seen[-1]["total"] == 24
    assert m["replies_seen"] == 24 * 16 == seen[-1]["replies_seen"]
    for key in ("mean_reward", "kl", "entropy", "grad_norm", "advantage_std", "loss", "clip_fraction"):
        assert all(math.isfinite(h[key]) for h in seen), key
    assert seen[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its reference (base)
    first = sum(h["mean_reward"] for h in seen[:3]) / 3
    last = sum(h["mean_reward"] for h in seen[-3:]) / 3
    assert last > first + 0.4 and m["final_kl"] > 0  # measured: about 0.01 -> 0.9


def test_train_rloo_refuses_without_prompts(tiny_model_dir):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="prompts"):
        train_rloo(_policy(tiny_model_dir), None, AutoTokenizer.from_pretrained(tiny_model_dir), [],
                   lambda items: [], RlooConfig())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_group_logps_equal_each_reply_on_its_own(tiny_model_dir, temperature):
    """RLOO's prompt-once passes give, row for row in RLOO's order (``p * k + j``), the per-token
    log-probs and entropies of running every (prompt, reply) alone, and the reference under
    ``disable_adapter`` too; a wrong row order or a shifted position fails."""
    from chatloop.train.common import Encoded, collate
    from chatloop.train.ppo import token_forward
    from chatloop.train.rloo import _group_logps

    policy = _policy(tiny_model_dir)
    with torch.no_grad():  # a LoRA that changes the outputs, so the adapter's on/off shows
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    policy.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (5, 9, 3)]
    k = 3
    replies = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (4, 7, 1, 6, 2, 5, 3, 7, 4)]
    rows = [Encoded(prompts[i // k], r) for i, r in enumerate(replies)]
    with torch.no_grad():
        lp, ent, mask = _group_logps(policy, prompts, replies, k, 0, temperature, torch.device("cpu"))
        ref_lp, _, _ = _group_logps(policy, prompts, replies, k, 0, temperature, torch.device("cpu"),
                                    policy.disable_adapter())
        want_lp, want_ent, _, want_mask = token_forward(policy, None, collate(rows, 0), temperature)
        with policy.disable_adapter():
            want_ref, _, _, _ = token_forward(policy, None, collate(rows, 0), temperature)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_lp, want_ref, atol=1e-5, rtol=1e-5)
    assert (lp - ref_lp).abs().max() > 1e-2  # the adapter mattered


def test_relevance_in_the_reward_is_the_gates_pmi(tiny_model_dir):
    """The relevance RLOO adds to a reply's reward is ``relevance.pmi_per_token`` of the base model
    (the policy with its adapter off), reusing the reference pass or not, and 0 for an empty reply."""
    from transformers import AutoTokenizer

    from chatloop.train.relevance import pmi_per_token
    from chatloop.train.rloo import _group_logps, _relevance

    policy = _policy(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # the adapter must not leak into the base's figure
    policy.eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (6, 4, 8)]
    k, eos = 2, tok.eos_token_id
    replies = [torch.randint(3, 60, (n,), generator=g).tolist() + [eos] for n in (3, 5, 2, 4, 6)] + [[eos]]
    cpu = torch.device("cpu")
    with torch.no_grad():
        base_lp, _, mask = _group_logps(policy, prompts, replies, k, tok.pad_token_id, 1.0, cpu, policy.disable_adapter())
        got = _relevance(policy, None, prompts, replies, mask, tok, k, cpu)
        reused = _relevance(policy, base_lp, prompts, replies, mask, tok, k, cpu)
        with policy.disable_adapter():
            want = pmi_per_token(policy, tok, [prompts[i // k] for i in range(len(replies))], replies)
    assert want[-1] is None and float(got[-1]) == 0.0
    torch.testing.assert_close(got[:-1], torch.tensor(want[:-1]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reused, got)
    assert got[:-1].abs().max() > 1e-3


def _scores_reaching_advantages(monkeypatch) -> list[torch.Tensor]:
    """The reward scores RLOO turns into advantages, each step's as it is passed on."""
    from chatloop.train import rloo

    seen: list[torch.Tensor] = []
    real = rloo.rloo_advantages
    monkeypatch.setattr(rloo, "rloo_advantages", lambda scores, *a, **k: (seen.append(scores.clone()),
                                                                          real(scores, *a, **k))[1])
    return seen


def test_the_relevance_term_only_penalises_falling_below_the_start(monkeypatch):
    """With ``relevance_coef`` each reward loses coef x (relevance - the first step's mean) where
    that is negative, and gains nothing above it; the floor and the mean relevance are logged."""
    from chatloop.train import rloo

    policy, tok = _word_model()
    prompts = [[{"role": "user", "content": f"w{i} w{i + 1}"}] for i in range(10, 14)]
    relevances = iter([torch.tensor([0.0, 1.0, 2.0, 3.0] * 2), torch.tensor([-1.0, 1.5, 5.0, 1.5] * 2)])
    monkeypatch.setattr(rloo, "_relevance", lambda *a, **k: next(relevances))
    seen_scores = _scores_reaching_advantages(monkeypatch)
    cfg = RlooConfig(learning_rate=1e-3, prompts_per_step=2, k=4, steps=2, minibatch_size=8, max_new_tokens=4,
                     relevance_coef=2.0)
    seen = []
    train_rloo(policy, None, tok, prompts, lambda items: [1.0] * len(items), cfg, on_step=seen.append)
    assert [h["relevance_floor"] for h in seen] == [1.5, 1.5]  # the first step's mean, kept
    assert [h["mean_relevance"] for h in seen] == [1.5, 1.75]
    assert [h["mean_reward"] for h in seen] == [1.0, 1.0]  # the reward model's, as logged
    assert [h["mean_shaped_reward"] for h in seen] == [0.0, -0.25]  # what the advantages came from
    assert seen_scores[0].tolist() == [1 - 3.0, 1 - 1.0, 1.0, 1.0] * 2
    assert seen_scores[1].tolist() == [1 - 5.0, 1.0, 1.0, 1.0] * 2


def test_the_register_term_only_penalises_rising_above_the_start(monkeypatch):
    """With ``register_coef`` each reward loses coef x (register gap - the first step's mean) where
    that is positive, nothing below it or for an empty reply; the floor and the mean are logged."""
    from chatloop.train import register

    policy, tok = _word_model()
    prompts = [[{"role": "user", "content": f"w{i} w{i + 1}"}] for i in range(10, 14)]
    nan = float("nan")
    gaps = iter([torch.tensor([0.0, 1.0, 2.0, nan] * 2), torch.tensor([3.0, 0.5, nan, 1.5] * 2)])
    monkeypatch.setattr(register, "sampled_framing", lambda *a, **k: (next(gaps), torch.zeros(8)))
    seen_scores = _scores_reaching_advantages(monkeypatch)
    cfg = RlooConfig(learning_rate=1e-3, prompts_per_step=2, k=4, steps=2, minibatch_size=8, max_new_tokens=4,
                     register_coef=2.0)
    seen = []
    train_rloo(policy, None, tok, prompts, lambda items: [1.0] * len(items), cfg, on_step=seen.append)
    assert [h["register_floor"] for h in seen] == [1.0, 1.0]  # the first step's measured mean, kept
    assert [h["mean_register"] for h in seen] == [1.0, pytest.approx(5 / 3)]
    assert [h["mean_reward"] for h in seen] == [1.0, 1.0]  # the reward model's, as logged
    assert seen_scores[0].tolist() == [1.0, 1.0, 1 - 2.0, 1.0] * 2
    assert seen_scores[1].tolist() == [1 - 4.0, 1.0, 1.0, 1 - 1.0] * 2


def test_the_document_term_only_penalises_falling_below_the_start(monkeypatch):
    """With ``document_coef`` each reward loses coef x (the first step's mean document likelihood -
    the reply's) where that is positive, nothing above it or for an empty reply; both hinges add up
    when both are on, and the floors and means are logged."""
    from chatloop.train import register

    policy, tok = _word_model()
    prompts = [[{"role": "user", "content": f"w{i} w{i + 1}"}] for i in range(10, 14)]
    nan = float("nan")
    docs = iter([torch.tensor([-2.0, -3.0, -1.0, nan] * 2), torch.tensor([-4.0, -2.0, nan, -2.5] * 2)])
    gaps = iter([torch.tensor([0.5] * 8), torch.tensor([0.5, 0.5, 0.5, 1.0] * 2)])
    monkeypatch.setattr(register, "sampled_framing", lambda *a, **k: (next(gaps), next(docs)))
    seen_scores = _scores_reaching_advantages(monkeypatch)
    cfg = RlooConfig(learning_rate=1e-3, prompts_per_step=2, k=4, steps=2, minibatch_size=8, max_new_tokens=4,
                     register_coef=1.0, document_coef=2.0)
    seen = []
    train_rloo(policy, None, tok, prompts, lambda items: [1.0] * len(items), cfg, on_step=seen.append)
    assert [h["document_floor"] for h in seen] == [-2.0, -2.0]  # the first step's measured mean, kept
    assert [h["mean_document"] for h in seen] == [-2.0, pytest.approx(-17 / 6)]
    assert [h["register_floor"] for h in seen] == [0.5, 0.5]
    assert seen_scores[0].tolist() == [1.0, 1 - 2.0, 1.0, 1.0] * 2
    # 2 x (-2 - (-4)); nothing at the floor or for the empty one; 2 x 0.5 + 1 x (1.0 - 0.5)
    assert seen_scores[1].tolist() == [1 - 4.0, 1.0, 1.0, 1 - 1.0 - 0.5] * 2


def test_a_degenerate_reply_loses_the_penalty_in_its_reward(monkeypatch):
    """``degenerate_penalty`` reaches the advantages through the scores (rows the rule flags lose
    it) and its share is logged; the reward model's own mean is logged unshaped."""
    from chatloop.train import rloo

    policy, tok = _word_model()
    prompts = [[{"role": "user", "content": f"w{i} w{i + 1}"}] for i in range(10, 14)]
    flagged = torch.tensor([1.0, 0.0, 0.0, 1.0] * 2)
    monkeypatch.setattr(rloo, "degenerate_penalty",
                        lambda p, r, eos, coef, device=None: (-coef * flagged, float(flagged.mean())))
    seen_scores = _scores_reaching_advantages(monkeypatch)
    cfg = RlooConfig(learning_rate=1e-3, prompts_per_step=2, k=4, steps=1, minibatch_size=8, max_new_tokens=4,
                     degenerate_penalty=3.0)
    seen = []
    train_rloo(policy, None, tok, prompts, lambda items: [1.0] * len(items), cfg, on_step=seen.append)
    assert seen_scores[0].tolist() == [-2.0, 1.0, 1.0, -2.0] * 2
    assert seen[0]["degenerate_share"] == 0.5 and seen[0]["mean_reward"] == 1.0
    assert seen[0]["mean_shaped_reward"] == -0.5
