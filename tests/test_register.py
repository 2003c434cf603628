"""The register gap (train/register.py) against a direct computation, and the judge reporting it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chatloop.models import load_model
from chatloop.train import register
from chatloop.train.register import (FramingTerm, document_penalty, framing_logprobs, plain_prompt_ids,
                                     register_gap, register_penalty, sampled_framing, starting_mean)

CONTEXT = [{"role": "user", "content": "Continue this movie review: The film opens on"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    loaded = load_model(str(tiny_model_dir), tmp_path_factory.mktemp("models"))
    return loaded.model.eval(), loaded.tokenizer


def test_the_plain_prompt_is_the_user_text_as_a_document(tiny):
    _, tok = tiny
    chat = [{"role": "system", "content": "Be brief."}, *CONTEXT, {"role": "assistant", "content": "A street."},
            {"role": "user", "content": "Go on."}]
    ids = plain_prompt_ids(tok, chat, 384)
    assert tok.decode(ids) == "Continue this movie review: The film opens on\n\nGo on.\n\n"  # user turns only
    assert plain_prompt_ids(tok, chat, 3) == ids[-3:]


def test_the_gap_is_chat_minus_plain_log_likelihood_per_reply_token(tiny):
    model, tok = tiny
    chat = list(tok.apply_chat_template(CONTEXT, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])
    plain = plain_prompt_ids(tok, CONTEXT, 384)
    reply = tok("a quiet street at dawn, and a man who", add_special_tokens=False)["input_ids"]

    def direct(prefix: list[int]) -> float:  # the reply's log-likelihood after ``prefix``, token by token
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix + reply])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        return sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(reply))

    got = register_gap(model, tok, [chat, chat], [plain, plain], [reply, [tok.eos_token_id]])
    assert got[1] is None  # an empty reply is left out
    assert got[0] == pytest.approx((direct(chat) - direct(plain)) / len(reply), abs=1e-4)
    assert abs(got[0]) > 1e-3  # the two framings do differ
    framed = framing_logprobs(model, tok, [chat, chat], [plain, plain], [reply, [tok.eos_token_id]])
    assert framed[1] is None
    # (chat, plain) per reply token: the plain one is the reply's document likelihood
    assert framed[0] == pytest.approx((direct(chat) / len(reply), direct(plain) / len(reply)), abs=1e-4)


def test_the_register_hinge_penalises_only_rising_above_the_start():
    gaps = torch.tensor([0.1, 0.3, float("nan"), 0.5, -0.2])
    floor = starting_mean(gaps)  # the measured replies' mean; an empty one (NaN) is left out
    assert floor == pytest.approx(0.175)
    got = register_penalty(gaps, 0.2, 4.0)
    assert got.tolist() == pytest.approx([0.0, -0.4, 0.0, -1.2, 0.0])  # 4 x (0.3 - 0.2), 4 x (0.5 - 0.2)
    assert starting_mean(torch.tensor([float("nan")])) is None  # nothing measured: no start yet


def test_the_document_hinge_penalises_only_falling_below_the_start():
    docs = torch.tensor([-2.0, -2.5, float("nan"), -1.0])
    assert starting_mean(docs) == pytest.approx(-11 / 6)  # the same start rule as the register's
    assert document_penalty(docs, -2.0, 3.0).tolist() == pytest.approx([0.0, -1.5, 0.0, 0.0])  # 3 x 0.5


def test_a_first_rollout_of_empty_replies_leaves_the_starts_to_the_next(monkeypatch):
    nan = float("nan")
    framed = iter([(torch.tensor([nan, nan]), torch.tensor([nan, nan])),
                   (torch.tensor([0.2, 0.4]), torch.tensor([-2.0, -3.0])),
                   (torch.tensor([0.5, 0.1]), torch.tensor([-3.5, -1.0]))])
    monkeypatch.setattr(register, "sampled_framing", lambda *args: next(framed))
    term = FramingTerm(register_coef=2.0, document_coef=1.0)
    penalty, _, _ = term(None, None, [], [], [], "cpu")
    # not a floor of 0 that charges every later reply
    assert term.register_floor is None and term.document_floor is None and penalty.tolist() == [0.0, 0.0]
    penalty, _, _ = term(None, None, [], [], [], "cpu")
    assert term.register_floor == pytest.approx(0.3) and term.document_floor == pytest.approx(-2.5)
    assert penalty.tolist() == pytest.approx([0.0, -0.2 - 0.5])
    penalty, register_gaps, documents = term(None, None, [], [], [], "cpu")
    assert term.register_floor == pytest.approx(0.3) and term.document_floor == pytest.approx(-2.5)
    assert penalty.tolist() == pytest.approx([-0.4 - 1.0, 0.0])
    assert term.logged(register_gaps, documents) == {"mean_register": pytest.approx(0.3), "register_floor": pytest.approx(0.3),
                                                     "mean_document": pytest.approx(-2.25), "document_floor": -2.5}
    off = FramingTerm(register_coef=2.0, document_coef=0.0, register_floor=0.0, document_floor=0.0)
    monkeypatch.setattr(register, "sampled_framing", lambda *args: (torch.tensor([0.5]), torch.tensor([-9.0])))
    assert off(None, None, [], [], [], "cpu")[0].tolist() == [-1.0]  # a coefficient of 0 takes nothing


def test_a_sampled_replys_register_is_the_base_models_not_the_policys(tiny_model_dir, tmp_path):
    """``sampled_framing`` measures with the policy's adapter off: the same figures as
    ``framing_logprobs`` of the bare base model, however far the adapter has moved."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(tiny_model_dir), tmp_path)
    base, tok = loaded.model.eval(), loaded.tokenizer
    chat = list(tok.apply_chat_template(CONTEXT, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])
    plain = plain_prompt_ids(tok, CONTEXT, 384)
    replies = [tok("a quiet street at dawn", add_special_tokens=False)["input_ids"], [tok.eos_token_id]]
    want = framing_logprobs(base, tok, [chat, chat], [plain, plain], replies)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False)).eval()  # a moved adapter
    with torch.no_grad():
        moved = register_gap(policy, tok, [chat, chat], [plain, plain], replies)[0]
    gaps, documents = sampled_framing(policy, tok, [chat, chat], [plain, plain], replies, "cpu")
    assert gaps[0].item() == pytest.approx(want[0][0] - want[0][1], abs=1e-5) and gaps[1].isnan()
    assert documents[0].item() == pytest.approx(want[0][1], abs=1e-5) and documents[1].isnan()
    assert abs(moved - (want[0][0] - want[0][1])) > 1e-3  # the adapter does change it when left on


@pytest.fixture(scope="module")
def fixture_gaps(tmp_path_factory):
    """The register gaps and document likelihoods of the base model's and each stored candidate's
    held-out replies (tests/fixtures/register, made with ``benchmarks/efficacy.py --replies``), on the
    prompts they answered, under the real default model: {fixture name: (data, {side: gaps},
    {side: document likelihoods})}."""
    import json

    from chatloop.oracles import load_oracle, load_prompts
    from conftest import REPO, SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (the fixtures' prompts)")
    loaded = load_model("default", tmp_path_factory.mktemp("models"))
    model, tok = loaded.model.eval(), loaded.tokenizer
    out = {}
    for name in ("sentiment_kto", "sentiment_rloo_register", "sentiment_dpo"):
        data = json.loads((REPO / "tests" / "fixtures" / "register" / f"{name}.json").read_text())
        contexts = load_prompts(load_oracle(data["oracle"]), data["split"])[:len(data["base"])]
        chat = [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]) for c in contexts]
        plain = [plain_prompt_ids(tok, c, 384) for c in contexts]
        framed = {side: framing_logprobs(model, tok, chat, plain,
                                         [tok(t, add_special_tokens=False)["input_ids"][:48] or [tok.eos_token_id]
                                          for t in data[side]])
                  for side in ("base", "candidate")}
        out[name] = (data, {side: [None if f is None else f[0] - f[1] for f in fs] for side, fs in framed.items()},
                     {side: [None if f is None else f[1] for f in fs] for side, fs in framed.items()})
    return out


def _paired(gaps: dict, first: int | None = None) -> dict:
    from chatloop.train.relevance import summary

    pairs = list(zip(gaps["candidate"], gaps["base"]))[:first]
    return summary([c - b for c, b in pairs if c is not None and b is not None])


@pytest.mark.slow
def test_a_real_candidate_that_learned_assistant_talk_shows_it_in_its_register(fixture_gaps):
    """The KTO candidate of a real simulated-feedback log: its replies moved toward assistant talk
    ("I'm glad to continue exploring your favorite films...") at a KL of only 0.078, and the
    prompt-reply relevance let it through. Its register stands above the base model's replies' on
    the same prompts, well beyond the paired SE, and talk-like replies sit higher than the others."""
    import re

    data, gaps, _ = fixture_gaps["sentiment_kto"]
    paired = _paired(gaps)
    print(f"register shift {paired}")
    assert paired["mean"] > 0.05 and paired["mean"] > 2 * paired["se"], paired
    talk = re.compile(r"\s*(\(|I'm|I am|I'd|I'll|Hey|Hi\b|Hello|Thank|Sure|Absolutely|Wow|Oh\b)")
    marked = [(g, bool(talk.match(t))) for side in gaps for g, t in zip(gaps[side], data[side]) if g is not None]
    on, off = sorted(g for g, m in marked if m), sorted(g for g, m in marked if not m)
    assert len(on) >= 10 and on[len(on) // 2] > off[len(off) // 2] + 0.1, (len(on), len(off))


@pytest.mark.slow
def test_the_gates_register_limit_passes_review_text_and_rejects_talk(fixture_gaps):
    """The default ``gate_max_register_shift`` against two real candidates of one sentiment log:
    the KTO one that learned assistant talk is rejected, the RLOO one trained with the register
    hinge (review text, as many replies addressing the reader as the base's) passes; on all 60
    stored prompts and on the first 32 (the gate's own count)."""
    from chatloop.config import Settings
    from chatloop.evaluate import register_check

    t = Settings().training
    assert t.gate_max_register_shift > 0  # checked by default
    for first in (None, 32):
        talk = register_check({"paired_difference": _paired(fixture_gaps["sentiment_kto"][1], first)}, t)
        text = register_check({"paired_difference": _paired(fixture_gaps["sentiment_rloo_register"][1], first)}, t)
        print(first, talk.reason, text.reason)
        assert talk.passed is False and text.passed is True, (first, talk.reason, text.reason)


@pytest.mark.slow
def test_a_document_limit_rejects_the_talk_the_register_let_through(fixture_gaps):
    """A DPO candidate of the same log learned upbeat assistant talk (79 of 150 replies address the
    reader) that the base model finds unlikely in both framings: its register stays within the
    limit, its document likelihood falls far below the base's replies'. A
    ``gate_max_document_drop`` of 0.15 rejects it and passes the RLOO candidate's review text, on all 60
    stored prompts and on the first 32; with both checks, both talk candidates are rejected. (Off by
    default: in real cycles at the gate's 32 prompts it passed this DPO talk and failed an RLOO
    candidate's review text; docs/LOG.md 2026-12-05, evening.)"""
    from chatloop.config import Settings
    from chatloop.evaluate import document_check, register_check

    assert Settings().training.gate_max_document_drop == 0  # reported, not checked, by default
    t = dataclasses.replace(Settings().training, gate_max_document_drop=0.15)
    for first in (None, 32):
        checks = {name: (register_check({"paired_difference": _paired(fixture_gaps[name][1], first)}, t),
                         document_check({"paired_difference": _paired(fixture_gaps[name][2], first)}, t))
                  for name in ("sentiment_dpo", "sentiment_kto", "sentiment_rloo_register")}
        for name, (reg, doc) in checks.items():
            print(first, name, reg.reason, doc.reason)
        assert checks["sentiment_dpo"][0].passed is True, "the register alone lets the DPO talk through"
        assert checks["sentiment_dpo"][1].passed is False
        assert checks["sentiment_rloo_register"][1].passed is True and checks["sentiment_rloo_register"][0].passed
        assert checks["sentiment_kto"][0].passed is False  # caught by its register


def test_kto_leaves_out_liked_replies_far_more_assistant_like_than_the_disliked():
    from chatloop.train.register import unassuming_thumbs

    values = [0.9, 0.5, None, 0.62, 0.4, 0.6, 0.7, 2.0]
    liked = [True, True, True, True, False, False, False, False]
    keep, summary = unassuming_thumbs(values, liked, 0.05)
    assert summary["disliked_median"] == pytest.approx(0.65) and summary["threshold"] == pytest.approx(0.70)
    assert keep == [False, True, True, True, True, True, True, True]  # every disliked one stays
    assert summary["liked_kept"] == 3
    held, _ = unassuming_thumbs([0.69, 0.71], [True, True], 0.05, threshold=summary["threshold"])
    assert held == [True, False]  # a held-out list uses the training list's threshold
    assert unassuming_thumbs([0.9, 0.1], [True, True], 0.05)[0] == [True, True]  # no disliked: all kept
