"""DPO math and training: losses against hand-computed references, reply-only log-probs against a
full-logits computation, and a tiny problem with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from chatloop.train.common import collate, encode_reply, reply_logprobs
from chatloop.train.dpo import DpoConfig, dpo_loss, encode_pairs, fill_reference, train_dpo


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


def test_reply_logprobs_equal_full_logits_reference(tiny_loaded):
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    items = [encode_reply(tok, [{"role": "user", "content": "hello"}], "hi there friend", 64, 16),
             encode_reply(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what?"}],
                          "nothing", 64, 16)]
    batch = collate(items, tok.pad_token_id)
    ours = reply_logprobs(model, batch)
    for i, e in enumerate(items):  # reference: one unpadded sequence, full logits, manual sum
        ids = torch.tensor([e.prompt_ids + e.reply_ids])
        logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)
        n = len(e.prompt_ids)
        ref = sum(logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1]))
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)
    avg = reply_logprobs(model, batch, average=True)
    assert avg[1].item() == pytest.approx(ours[1].item() / len(items[1].reply_ids), abs=1e-5)


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
    cfg = DpoConfig(epochs=4, batch_size=4, learning_rate=5e-3, beta=0.1)
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
