"""DPO math and training: losses against hand-computed references, reply-only log-probs against a
full-logits computation, and a tiny problem with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from chatloop.train.common import HeldOutSelection, collate_groups, encode_reply, fit, grouped_reply_logprobs
from chatloop.train.dpo import (DpoConfig, EncodedThumb, ThumbsTerm, dpo_loss, encode_pairs, evaluate_pairs,
                                fill_reference, train_dpo)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sigmoid_loss_matches_hand_computation():
    pc, pr, rc, rr = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -9.0]), torch.tensor([-4.0, -10.0]), torch.tensor([-4.0, -8.0])
    beta = 0.5
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(2):
        logits = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert losses[i].item() == pytest.approx(-math.log(_sig(beta * logits.item())), abs=1e-6)
        assert cr[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert rj[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())


def test_label_smoothing_and_ipo_match_hand_computation():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0])
    z = 2.0  # (pc-rc)-(pr-rr) = 1 - (-1)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    expected = -0.8 * math.log(_sig(0.1 * z)) - 0.2 * math.log(_sig(-0.1 * z))
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx((z - 1 / (2 * 0.1)) ** 2, abs=1e-5)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="nope")


def _full_logits_reply_logprob(model, e) -> float:
    """The reference: one unpadded sequence, full logits over every position, a manual sum."""
    ids = torch.tensor([e.prompt_ids + e.reply_ids])
    logp = F.log_softmax(model(ids).logits[0].double(), dim=-1)
    n = len(e.prompt_ids)
    return sum(logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1]))


def _groups(tok):
    """Three prompts of different lengths (system prompt, multi-turn), two replies each."""
    contexts = [[{"role": "user", "content": "hello"}],
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the capital of France?"},
                 {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "and of Spain, please?"}],
                [{"role": "user", "content": "x"}]]
    replies = [("hi there friend", "go away"), ("Madrid.", "I do not know what you mean by that at all"),
               ("y", "zzz zz")]
    return [tuple(encode_reply(tok, c, r, 64, 16) for r in rs) for c, rs in zip(contexts, replies)]


@pytest.mark.parametrize("share_prompt", [True, False])
def test_grouped_reply_logprobs_equal_full_logits_reference(tiny_loaded, share_prompt):
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    groups = _groups(tok)
    ours = grouped_reply_logprobs(model, collate_groups(groups, tok.pad_token_id), share_prompt=share_prompt)
    rows = [g[0] for g in groups] + [g[1] for g in groups]  # row k * B + b is reply k of prompt b
    for i, e in enumerate(rows):
        assert ours[i].item() == pytest.approx(_full_logits_reply_logprob(model, e).item(), abs=1e-4)
    avg = grouped_reply_logprobs(model, collate_groups(groups, tok.pad_token_id), average=True, share_prompt=share_prompt)
    assert avg[4].item() == pytest.approx(ours[4].item() / len(rows[4].reply_ids), abs=1e-5)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_shared_prompt_pass_has_the_gradients_of_separate_passes(tiny_model_dir, share_prompt):
    """Both replies continue from one prompt pass (or, unshared, run as rows of one batch); the LoRA
    gradients equal those of running each (prompt, reply) alone, so nothing is lost by sharing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))  # non-zero B: the adapter changes the prompt's states
    groups = _groups(tok)
    rows = [g[0] for g in groups] + [g[1] for g in groups]
    weights = torch.arange(1.0, len(rows) + 1)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    shared = grads((grouped_reply_logprobs(model, collate_groups(groups, tok.pad_token_id), share_prompt=share_prompt)
                    * weights).sum())
    separate = grads(sum(w * _full_logits_reply_logprob(model, e).float() for w, e in zip(weights, rows)))
    assert shared.abs().max() > 1  # the gradient is far from zero, so agreement means something
    torch.testing.assert_close(shared, separate, rtol=1e-4, atol=1e-4)


def test_collate_groups_refuses_replies_of_different_prompts(tiny_loaded):
    tok = tiny_loaded.tokenizer
    a = encode_reply(tok, [{"role": "user", "content": "a"}], "x", 64, 8)
    b = encode_reply(tok, [{"role": "user", "content": "b"}], "y", 64, 8)
    with pytest.raises(ValueError, match="share"):
        collate_groups([(a, b)], tok.pad_token_id)
    with pytest.raises(ValueError, match="same number"):
        collate_groups([(a, a), (b,)], tok.pad_token_id)


def test_encode_reply_uses_template_and_keeps_the_end_of_long_contexts(tiny_loaded):
    tok = tiny_loaded.tokenizer
    e = encode_reply(tok, [{"role": "user", "content": "hello"}], "Paris", 1000, 100)
    assert tok.decode(e.reply_ids) == "Paris<|im_end|>\n"
    long = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "last question"}]
    short = encode_reply(tok, long, "x", 20, 100)
    assert len(short.prompt_ids) == 20
    assert "last question" in tok.decode(short.prompt_ids)


def _lora(model):
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def test_reference_equals_policy_at_start_so_first_loss_is_log2(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "yes indeed", "rejected": "no way"}
             for i in range(4)]
    metrics = train_dpo(model, tok, pairs, [], DpoConfig(epochs=1, batch_size=4, learning_rate=1e-3))
    assert metrics["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_dpo_learns_the_preferred_pattern_on_a_tiny_problem(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about topic {i}"}],
              "chosen": "Sure, happy to help.", "rejected": "Go away."} for i in range(8)]
    held = [{"prompt": [{"role": "user", "content": "Tell me about something new"}],
             "chosen": "Sure, happy to help.", "rejected": "Go away."}]
    cfg = DpoConfig(epochs=4, batch_size=4, learning_rate=5e-3, beta=0.1, select_best=False)
    enc = encode_pairs(tok, held, cfg)
    fill_reference(model, enc, tok.pad_token_id, cfg, torch.device("cpu"))
    before = enc[0].ref_chosen - enc[0].ref_rejected
    metrics = train_dpo(model, tok, pairs, held, cfg)
    fill_reference(model, enc, tok.pad_token_id, cfg, torch.device("cpu"))
    after = enc[0].ref_chosen - enc[0].ref_rejected
    assert metrics["final_loss"] < metrics["first_loss"]
    assert metrics["held_out"]["accuracy"] == 1.0
    assert after > before + 1.0  # the preferred reply became clearly more likely than the other


def test_batches_cover_every_item_once_per_epoch_and_group_lengths():
    from chatloop.train.common import batches

    lengths = [(i * 37) % 100 for i in range(200)]
    got = list(batches(200, 4, epochs=2, seed=1, lengths=lengths))
    for epoch in (0, 1):
        seen = sorted(j for e, idx in got if e == epoch for j in idx)
        assert seen == list(range(200))
    spread = sum(max(lengths[j] for j in idx) - min(lengths[j] for j in idx) for _, idx in got) / len(got)
    plain = list(batches(200, 4, epochs=2, seed=1))
    plain_spread = sum(max(lengths[j] for j in idx) - min(lengths[j] for j in idx) for _, idx in plain) / len(plain)
    assert spread < plain_spread / 3  # similar lengths share a batch: less padding


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def test_held_out_selection_keeps_the_best_step_and_stops_after_patience():
    """A known answer: loss -w has a constant gradient, so Adam moves w by exactly lr a step
    (w = 0.1 k after k steps); the held-out score (w - 0.32)^2 is lowest at step 3. With patience 2
    training stops after step 5 and w is put back to 0.3."""
    model = _Scalar()
    sel = HeldOutSelection(lambda: {"loss": float((model.w.detach() - 0.32) ** 2)}, every=1, patience=2)
    history = fit(model, n_items=20, batch_size=1, epochs=1, learning_rate=0.1, seed=0,
                  step=lambda idx: (-model.w, {}), selection=sel)
    assert [s for s, _ in sel.scores] == [0, 1, 2, 3, 4, 5]
    assert len(history) == 5 and sel.exhausted
    assert sel.best_step == 3 and sel.best_score == pytest.approx(0.02 ** 2, abs=1e-6)
    assert float(model.w) == pytest.approx(0.3, abs=1e-4)
    assert history[2]["held_out_score"] == pytest.approx(0.0004, abs=1e-6) and "held_out_score" in history[4]


def test_held_out_selection_keeps_the_start_when_no_step_helps():
    model = _Scalar()
    sel = HeldOutSelection(lambda: {"loss": float(model.w.detach() ** 2)}, every=2, patience=0)  # any move hurts
    history = fit(model, n_items=6, batch_size=1, epochs=1, learning_rate=0.1, seed=0,
                  step=lambda idx: (-model.w, {}), selection=sel)
    assert len(history) == 6  # patience 0: no early stop
    assert [s for s, _ in sel.scores] == [0, 2, 4, 6] and sel.best_step == 0
    assert float(model.w) == 0.0


def test_dpo_hands_back_the_checkpoint_with_the_lowest_held_out_loss(tiny_model_dir):
    """Held-out pairs that contradict the training pairs: every update raises their loss, so the
    weights handed back are the starting ones (log-ratios 0, loss exactly log 2). With agreeing
    held-out pairs training moves on, and the held-out loss reported is the best one scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about topic {i}"}],
              "chosen": "Sure, happy to help.", "rejected": "Go away."} for i in range(8)]
    flipped = [{"prompt": [{"role": "user", "content": f"Tell me about thing {i}"}],
                "chosen": "Go away.", "rejected": "Sure, happy to help."} for i in range(2)]
    agreeing = [{**p, "prompt": [{"role": "user", "content": f"Tell me about thing {i}"}]}
                for i, p in enumerate(pairs[:2])]
    cfg = DpoConfig(epochs=3, batch_size=4, learning_rate=5e-3, beta=0.1, evals_per_epoch=2, patience=3)

    def train_and_remeasure(held):
        """Train, then score the held-out pairs again on the weights handed back (references from
        the untrained model), independently of what training reported."""
        model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
        enc = encode_pairs(tok, held, cfg)
        fill_reference(model, enc, tok.pad_token_id, cfg, torch.device("cpu"))
        m = train_dpo(model, tok, pairs, held, cfg)
        return m, evaluate_pairs(model, enc, tok.pad_token_id, cfg, torch.device("cpu"))

    m, again = train_and_remeasure(flipped)
    sel = m["selection"]
    assert sel["best_step"] == 0 and sel["stopped_early"] and m["steps"] == 3
    assert [s["step"] for s in sel["scores"]] == [0, 1, 2, 3]
    assert sel["scores"][0]["score"] == pytest.approx(math.log(2))  # the reference's loss, computed
    assert m["final_loss"] < m["first_loss"]  # it did train on the pairs ...
    assert m["held_out"]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # ... and handed back the start
    assert again["loss"] == pytest.approx(math.log(2), abs=1e-5) and again["accuracy"] == 0.5
    assert m["held_out"]["accuracy"] == 0.5

    m, again = train_and_remeasure(agreeing)
    sel = m["selection"]
    assert sel["best_step"] > 0
    assert m["held_out"]["loss"] == pytest.approx(min(s["score"] for s in sel["scores"]), abs=1e-5)
    assert again["loss"] == pytest.approx(m["held_out"]["loss"], abs=1e-5)  # the best weights were restored
    assert again["accuracy"] == m["held_out"]["accuracy"]
    assert m["held_out"]["loss"] < math.log(2) - 0.05


def _thumb_rows(n_up: int, n_down: int, up: str = "Absolutely, gladly.", down: str = "Never.") -> list[dict]:
    return ([{"prompt": [{"role": "user", "content": f"Could you help with chore {i}?"}], "completion": up,
              "label": True} for i in range(n_up)]
            + [{"prompt": [{"role": "user", "content": f"Could you help with errand {i}?"}], "completion": down,
                "label": False} for i in range(n_down)])


def test_dpo_thumbs_term_is_zero_anchored_kto(tiny_model_dir):
    """Known answer at learning rate 0: every log-ratio stays 0, so each thumb's loss is
    1 - sigmoid(0) = 0.5 for an up and sigmoid(0) = 0.5 for a down; the thumbs' term is 0.5 and a
    step's loss log 2 + weight * 0.5, while first_loss (what the gate reads) stays the pairs' own
    log 2. Every step holds both kinds (the rewards of each are reported)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about topic {i}"}],
              "chosen": "Sure, happy to help.", "rejected": "Go away."} for i in range(4)]
    cfg = DpoConfig(epochs=2, batch_size=4, learning_rate=0.0, thumbs_weight=2.0, thumbs_per_step=2)
    m = train_dpo(_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), tok, pairs, [], cfg,
                  thumbs=_thumb_rows(1, 5))
    assert m["train_thumbs"] == 6 and m["thumbs_up_down"] == [1, 5] and m["thumbs_stratified"]
    for h in m["history"]:
        assert h["pairs_loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert h["thumbs_loss"] == pytest.approx(0.5, abs=1e-5)
        assert h["loss"] == pytest.approx(math.log(2) + 2.0 * 0.5, abs=1e-5)
        assert h["thumbs_up_reward"] == pytest.approx(0.0, abs=1e-6)
        assert h["thumbs_down_reward"] == pytest.approx(0.0, abs=1e-6)
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    # weight 0 (the default): the thumbs are not even encoded
    m = train_dpo(_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), tok, pairs, [],
                  DpoConfig(epochs=1, batch_size=4, learning_rate=0.0), thumbs=_thumb_rows(3, 1))
    assert m["train_thumbs"] == 0 and "thumbs_loss" not in m["history"][0]


def test_thumbs_term_takes_as_many_ups_as_downs_every_step():
    """1 up against 9 downs: every step of 2 holds the up and one down, and the downs come in a
    seeded cycle (each once per pass); 3 a step alternate 2 ups + 1 down and 1 up + 2 downs.
    Unbalanced, or with one kind only, it is one cycle through all the thumbs."""
    thumbs = [EncodedThumb(None, True)] + [EncodedThumb(None, False) for _ in range(9)]
    term = ThumbsTerm(thumbs, DpoConfig(thumbs_per_step=2))
    downs = []
    for _ in range(9):
        chunk = term._next()
        assert [t.desirable for t in chunk] == [True, False]
        downs.append(id(chunk[1]))
    assert len(set(downs)) == 9  # one pass covers every down once
    term = ThumbsTerm(thumbs, DpoConfig(thumbs_per_step=3))
    assert [sum(t.desirable for t in term._next()) for _ in range(4)] == [2, 1, 2, 1]
    for cfg, items in ((DpoConfig(thumbs_per_step=1, thumbs_balance=False), thumbs), (DpoConfig(thumbs_per_step=3), thumbs[1:])):
        term = ThumbsTerm(items, cfg)
        assert not term.stratified
        seen = [id(t) for _ in range(len(items) // cfg.thumbs_per_step) for t in term._next()]
        assert sorted(seen) == sorted(id(t) for t in items)


def test_dpo_thumbs_term_teaches_what_the_thumbs_say(tiny_model_dir):
    """Pairs about one thing, thumbs about another: only with the thumbs' term does the policy
    move a liked reply above a disliked one (their log pi/ref on a new prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about topic {i}"}],
              "chosen": "Sure, happy to help.", "rejected": "Go away."} for i in range(8)]
    probe = [{"prompt": [{"role": "user", "content": "Could you help with chore 99?"}],
              "chosen": "Absolutely, gladly.", "rejected": "Never."}]

    def liked_minus_disliked(weight: float) -> float:
        model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
        cfg = DpoConfig(epochs=3, batch_size=4, learning_rate=5e-3, thumbs_weight=weight)
        enc = encode_pairs(tok, probe, cfg)
        fill_reference(model, enc, tok.pad_token_id, cfg, torch.device("cpu"))
        train_dpo(model, tok, pairs, [], cfg, thumbs=_thumb_rows(6, 6))
        return evaluate_pairs(model, enc, tok.pad_token_id, cfg, torch.device("cpu"))["margin"]

    without, with_thumbs = liked_minus_disliked(0.0), liked_minus_disliked(1.0)
    # margins are beta * (log-ratio gap): 0.2 is 2 nats (measured: 0.04 without, 0.34 with)
    assert with_thumbs > 0.2 and with_thumbs > without + 0.2, (without, with_thumbs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_nll_is_the_chosen_replies_per_token_cross_entropy(tiny_model_dir, loss_type):
    """Known answer at learning rate 0: the NLL term equals the chosen replies' token-weighted mean
    cross-entropy, computed here by the model's own loss on prompt + reply with the prompt masked
    (for IPO too, whose log-probs are per-token averages), and a step's loss is the pairs' loss plus
    nll_weight times it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about topic {i}"}],
              "chosen": "Sure, happy to help." + " More detail." * i, "rejected": "Go away."} for i in range(4)]
    cfg = DpoConfig(epochs=1, batch_size=4, learning_rate=0.0, loss_type=loss_type, nll_weight=0.5)
    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    m = train_dpo(model, tok, pairs, [], cfg)
    (h,) = m["history"]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in encode_pairs(tok, pairs, cfg):
            ids = torch.tensor([e.chosen.prompt_ids + e.chosen.reply_ids])
            labels = torch.tensor([[-100] * len(e.chosen.prompt_ids) + e.chosen.reply_ids])
            n = len(e.chosen.reply_ids)
            total += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    assert h["nll"] == pytest.approx(total / tokens, rel=1e-4)
    assert h["loss"] == pytest.approx(h["pairs_loss"] + 0.5 * h["nll"], rel=1e-5)
    assert "nll" not in train_dpo(model, tok, pairs, [], DpoConfig(epochs=1, batch_size=4, learning_rate=0.0))["history"][0]


def test_too_few_held_out_pairs_do_not_choose_the_checkpoint(tiny_model_dir):
    """With fewer held-out pairs than ``select_min_heldout`` the held-out loss is noise: no early
    stop, every epoch is trained, and the held-out figures are those of the weights handed back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about topic {i}"}],
              "chosen": "Sure, happy to help.", "rejected": "Go away."} for i in range(8)]
    flipped = [{"prompt": [{"role": "user", "content": f"Tell me about thing {i}"}],
                "chosen": "Go away.", "rejected": "Sure, happy to help."} for i in range(2)]
    cfg = DpoConfig(epochs=3, batch_size=4, learning_rate=5e-3, beta=0.1, evals_per_epoch=2, patience=1,
                    select_min_heldout=3)
    m = train_dpo(_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), tok, pairs, flipped, cfg)
    assert m["selection"] is None and m["steps"] == 6  # 3 epochs of 2 batches, no early stop
    assert m["held_out"]["pairs"] == 2 and m["held_out"]["loss"] > math.log(2)  # the trained weights, scored
