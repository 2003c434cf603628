"""Differential tests: our preference losses against TRL's own trainer code on identical inputs.

TRL is a test-only dependency. In TRL 1.16 the losses are not standalone functions: they live inside
``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss`` and ``RewardTrainer.compute_loss``. So each
test builds a *real* TRL trainer (real ``__init__``: dataset tokenization, KL-completion rotation,
TRL's collator, TRL's fused LM head) around tiny random models, and calls ``trainer.compute_loss`` on
a batch made by the trainer's own collator from its own prepared dataset. Nothing of TRL's math is
re-typed here.

Our side receives the same token ids: per-sequence log-probs are computed independently from the
same models' full logits (log_softmax in float64, summed -- or averaged, for IPO -- over the
completion tokens that TRL's ``completion_mask`` marks), then passed to ``dpo_loss`` / ``kto_loss``;
reward scores come straight from the sequence-classification model's logits and go to
``bradley_terry_loss``. Policy and reference are two different random initialisations so that
every log-ratio, the KL estimate and the margins are far from zero.

Where TRL only reports a batch mean, losses are also compared pair by pair by running TRL on
single-pair batches, so compensating per-pair errors cannot hide in the mean.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402  (a dependency of trl)
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer  # noqa: E402

from chatloop.train import dpo as our_dpo  # noqa: E402  (module access so a monkeypatch is seen)
from chatloop.train import kto as our_kto  # noqa: E402
from chatloop.train import reward as our_reward  # noqa: E402
from chatloop.train import rloo as our_rloo  # noqa: E402

ATOL = 1e-5

pytestmark = [  # TRL's configs default to the old name of activation checkpointing; nothing to act on here
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _quiet_dataset_maps():
    """TRL's dataset preparation runs ``Dataset.map``; keep its progress bars out of failure output."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    was_enabled = is_progress_bar_enabled()
    disable_progress_bar()
    yield
    if was_enabled:
        enable_progress_bar()

# ---- tiny, deterministic fixtures ------------------------------------------------------------

_WORDS = [f"w{i}" for i in range(60)]
_VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(_WORDS)}}
PAD, EOS = 0, 1

# Prompts and replies of different lengths (so padding and IPO's length normalisation matter).
PAIRS = {
    "prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11"],
    "chosen": [" w12 w13", " w14", " w15 w16 w17 w18", " w19 w20 w21"],
    "rejected": [" w22", " w23 w24 w25 w26", " w27 w28", " w29 w30 w31 w32 w33"],
}
# Unpaired thumbs for KTO: desirable and undesirable mixed in one batch.
THUMBS = {
    "prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11", "w34 w35", "w36 w37 w38"],
    "completion": [" w12 w13", " w23 w24 w25 w26", " w15 w16 w17 w18", " w29 w30 w31", " w39", " w40 w41"],
    "label": [True, False, True, False, False, True],
}


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no download): "w7" is one token, "<eos>" is EOS."""
    tk = Tokenizer(models.WordLevel(vocab=_VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(_VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3,
                       pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, **kw)


def _causal_lm(seed: int) -> LlamaForCausalLM:
    """A fresh tiny LM per trainer (TRL patches ``forward`` in place); same seed, same weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config()).eval()


def _reward_model(seed: int) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_config(num_labels=1)).eval()


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, seed=0,
               logging_strategy="no", save_strategy="no", **kw)


def _dpo_trainer(tmp_path, policy_seed=0, ref_seed=1, **kw) -> DPOTrainer:
    args = _args(DPOConfig, tmp_path, per_device_train_batch_size=len(PAIRS["prompt"]), **kw)
    return DPOTrainer(model=_causal_lm(policy_seed), ref_model=_causal_lm(ref_seed), args=args,
                      train_dataset=Dataset.from_dict(PAIRS), processing_class=_tokenizer())


def _metrics(trainer) -> dict[str, list[float]]:
    return trainer._metrics["train" if trainer.model.training else "eval"]


@torch.no_grad()
def _seq_logps(model, input_ids, attention_mask, completion_mask, average: bool = False) -> torch.Tensor:
    """Our independent log-probs: full logits, float64 log_softmax, sum over completion targets."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()  # original forward
    token_lp = torch.gather(F.log_softmax(logits[:, :-1], dim=-1), 2, input_ids[:, 1:, None]).squeeze(2)
    mask = completion_mask[:, 1:].double()
    out = (token_lp * mask).sum(1)
    if average:
        out = out / mask.sum(1).clamp(min=1)
    return out


def _trl_loss(trainer, batch) -> torch.Tensor:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).detach().double()


def _ours_dpo(trainer, batch, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Our ``dpo_loss`` on log-probs of TRL's collated [chosen..., rejected...] batch."""
    lp = _seq_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                    average=loss_type == "ipo")
    ref = _seq_logps(trainer.ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                     average=loss_type == "ipo")
    pc, pr = lp.chunk(2)
    rc, rr = ref.chunk(2)
    return our_dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type, label_smoothing=label_smoothing)


def _assert_close(ours, theirs, what: str) -> None:
    """|ours - TRL| <= 1e-5, relative to the value once it exceeds 1.

    TRL computes in float32, whose spacing near IPO's losses of ~30 (beta=0.1) is ~2e-6; a purely
    absolute 1e-5 there would test float32 rounding rather than the loss (measured: 8e-6).
    """
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    diff = (ours - theirs).abs()
    bound = ATOL * theirs.abs().clamp(min=1.0)
    assert bool((diff <= bound).all()), (
        f"{what}: ours {ours.tolist()} vs TRL {theirs.tolist()} (max |diff| {diff.max().item():.3g})")


def _check_dpo(trainer, beta, loss_type, label_smoothing=0.0, compare_rewards=True):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    # batch level: TRL's mean loss and reward metrics
    losses, cr, rj = _ours_dpo(trainer, batch, beta, loss_type, label_smoothing)
    _assert_close(losses.mean(), _trl_loss(trainer, batch), f"{loss_type} batch loss")
    if compare_rewards:
        m = _metrics(trainer)
        _assert_close(cr.mean(), m["rewards/chosen"][-1], "mean chosen reward")
        _assert_close(rj.mean(), m["rewards/rejected"][-1], "mean rejected reward")
        _assert_close((cr - rj).mean(), m["rewards/margins"][-1], "mean reward margin")
    # pair level: TRL on single-pair batches
    trl_per_pair = torch.stack([_trl_loss(trainer, trainer.data_collator([r])) for r in rows])
    _assert_close(losses, trl_per_pair, f"{loss_type} per-pair losses")
    return losses


# ---- DPO -------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl(tmp_path, beta):
    trainer = _dpo_trainer(tmp_path, beta=beta, loss_type=["sigmoid"])
    losses = _check_dpo(trainer, beta, "sigmoid")
    # the inputs are informative: log-ratios far from zero, so the loss is far from log 2
    assert (losses - torch.log(torch.tensor(2.0, dtype=losses.dtype))).abs().max() > 0.05


def test_dpo_label_smoothing_is_cdpo_and_matches_trl_aot_per_pair(tmp_path):
    """Our ``label_smoothing`` is conservative DPO: -(1-e) logsig(b*h) - e logsig(-b*h).

    In TRL 1.16 ``loss_type="sigmoid"`` ignores ``label_smoothing`` (checked below), ``"robust"`` is a
    different estimator, (-(1-e) logsig(b*h) + e logsig(-b*h)) / (1-2e), and ``"exo_pair"`` a KL form.
    The exact cDPO expression survives only in ``"aot"`` / ``"aot_unpaired"``, which apply it to
    batch-*sorted* log-ratio differences; on a one-pair batch sorting is the identity, so TRL's ``aot``
    on each single pair is exactly cDPO on that pair. That is the smallest faithful unit, so the
    comparison is pair by pair (a batch mean would mix in AOT's sorting).
    """
    beta, eps = 0.5, 0.2
    trainer = _dpo_trainer(tmp_path, beta=beta, loss_type=["aot"], label_smoothing=eps)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    ours, _, _ = _ours_dpo(trainer, trainer.data_collator(rows), beta, "sigmoid", label_smoothing=eps)
    trl_per_pair = torch.stack([_trl_loss(trainer, trainer.data_collator([r])) for r in rows])
    _assert_close(ours, trl_per_pair, "cDPO per-pair losses vs TRL aot (batch of 1)")
    unsmoothed, _, _ = _ours_dpo(trainer, trainer.data_collator(rows), beta, "sigmoid")
    assert (ours - unsmoothed).abs().min() > 1e-3  # smoothing really changed every pair's loss

    # Why not TRL's "sigmoid": it drops label_smoothing, so it equals our unsmoothed loss.
    plain = _dpo_trainer(tmp_path, beta=beta, loss_type=["sigmoid"], label_smoothing=eps)
    _assert_close(unsmoothed.mean(), _trl_loss(plain, plain.data_collator(rows)), "TRL sigmoid ignores smoothing")


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_ipo_with_length_averaged_logps_matches_trl(tmp_path, beta):
    """TRL's IPO divides the summed log-ratios by each completion's token count; we take averaged logps.

    Reward metrics are not compared: TRL logs beta * *summed* log-ratios for every loss type, while our
    IPO rewards are beta * averaged log-ratios (what the callers pass in).
    """
    trainer = _dpo_trainer(tmp_path, beta=beta, loss_type=["ipo"])
    _check_dpo(trainer, beta, "ipo", compare_rewards=False)


def test_dpo_sigmoid_with_trl_peft_reference_adapter(tmp_path):
    """The LoRA set-up: TRL snapshots the adapter as a frozen "ref" adapter; we snapshot the model.

    The policy adapter is then moved (as training would), so policy and reference differ.
    """
    from peft import LoraConfig, get_peft_model

    beta = 0.1
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config()).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                      init_lora_weights=False)
    policy = get_peft_model(base, lora)
    reference = copy.deepcopy(policy).eval()  # our reference: the model as it was at the snapshot
    args = _args(DPOConfig, tmp_path, per_device_train_batch_size=len(PAIRS["prompt"]), beta=beta,
                 loss_type=["sigmoid"])
    trainer = DPOTrainer(model=policy, ref_model=None, args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=_tokenizer())
    assert "ref" in trainer.model.peft_config  # TRL's frozen copy of the adapter is the reference
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for name, p in trainer.model.named_parameters():
            if ".default." in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))

    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    cols = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    pc, pr = _seq_logps(trainer.model, *cols).chunk(2)
    rc, rr = _seq_logps(reference, *cols).chunk(2)
    losses, cr, rj = our_dpo.dpo_loss(pc, pr, rc, rr, beta)
    assert (pc - rc).abs().min() > 1e-3  # the adapter really moved
    _assert_close(losses.mean(), _trl_loss(trainer, batch), "sigmoid loss, PEFT reference adapter")
    _assert_close(cr.mean(), _metrics(trainer)["rewards/chosen"][-1], "mean chosen reward, PEFT")
    _assert_close(rj.mean(), _metrics(trainer)["rewards/rejected"][-1], "mean rejected reward, PEFT")


def test_tolerance_catches_a_one_percent_beta_error(tmp_path):
    """The inputs are sensitive enough that a 1% error in beta is well outside the tolerance."""
    beta = 0.1
    trainer = _dpo_trainer(tmp_path, beta=beta, loss_type=["sigmoid"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    wrong, _, _ = _ours_dpo(trainer, batch, beta * 1.01)
    assert (wrong.mean() - _trl_loss(trainer, batch)).abs().item() > 10 * ATOL


# ---- KTO -------------------------------------------------------------------------------------

def _kto_case(tmp_path, policy_seed, ref_seed, beta, desirable_weight=1.0, undesirable_weight=1.0):
    n = len(THUMBS["prompt"])
    args = _args(KTOConfig, tmp_path, per_device_train_batch_size=n, beta=beta,
                 desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    trainer = KTOTrainer(model=_causal_lm(policy_seed), ref_model=_causal_lm(ref_seed), args=args,
                         train_dataset=Dataset.from_dict(THUMBS), processing_class=_tokenizer())
    # TRL's own KL pairing: completions rotated by one inside the batch, (x1, yn), (x2, y1), ...
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    cols = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    kl_cols = batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
    policy, ref = _seq_logps(trainer.model, *cols), _seq_logps(trainer.ref_model, *cols)
    policy_kl, ref_kl = _seq_logps(trainer.model, *kl_cols), _seq_logps(trainer.ref_model, *kl_cols)
    desirable = batch["label"].bool()
    assert desirable.any() and (~desirable).any()
    losses, rewards, kl = our_kto.kto_loss(policy, ref, desirable, policy_kl, ref_kl, beta,
                                           desirable_weight, undesirable_weight)
    theirs = _trl_loss(trainer, batch)
    m = _metrics(trainer)
    _assert_close(losses.mean(), theirs, "KTO loss")
    _assert_close(kl, m["kl"][-1], "KTO KL estimate")
    _assert_close(rewards[desirable].mean(), m["rewards/chosen"][-1], "KTO mean desirable reward")
    _assert_close(rewards[~desirable].mean(), m["rewards/rejected"][-1], "KTO mean undesirable reward")
    raw_kl = (policy_kl - ref_kl).mean().item()
    return raw_kl, kl.item()


@pytest.mark.parametrize("beta,desirable_weight,undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33)])
def test_kto_matches_trl_with_positive_kl(tmp_path, beta, desirable_weight, undesirable_weight):
    raw_kl, kl = _kto_case(tmp_path, 1, 0, beta, desirable_weight, undesirable_weight)
    assert raw_kl > 0.1 and kl == pytest.approx(raw_kl)  # the KL term is live, not clamped


def test_kto_matches_trl_with_kl_clamped_at_zero(tmp_path):
    # Swapping policy and reference flips the sign of the KL estimate: here it is negative, so clamped.
    raw_kl, kl = _kto_case(tmp_path, 0, 1, beta=0.5)
    assert raw_kl < -0.1 and kl == 0.0


# ---- reward model (Bradley-Terry) ------------------------------------------------------------

@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (True, 0.01), (False, 0.1)])
def test_bradley_terry_matches_trl_reward_trainer(tmp_path, margin, center):
    tok = _tokenizer()
    data = {
        "chosen_ids": [tok(p + c + "<eos>")["input_ids"] for p, c in zip(PAIRS["prompt"], PAIRS["chosen"])],
        "rejected_ids": [tok(p + r + "<eos>")["input_ids"] for p, r in zip(PAIRS["prompt"], PAIRS["rejected"])],
    }
    if margin:
        data["margin"] = [0.5, -0.25, 1.0, 0.0]
    n = len(data["chosen_ids"])
    args = _args(RewardConfig, tmp_path, per_device_train_batch_size=n, center_rewards_coefficient=center)
    trainer = RewardTrainer(model=_reward_model(3), args=args, train_dataset=Dataset.from_dict(data),
                            processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    with torch.no_grad():
        scores = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    r_chosen, r_rejected = scores.squeeze(-1).double().chunk(2)
    assert (r_chosen - r_rejected).abs().min() > 1e-3
    ours = our_reward.bradley_terry_loss(r_chosen, r_rejected,
                                         margin=batch["margin"].double() if margin else None,
                                         center_coefficient=center or 0.0)
    _assert_close(ours, _trl_loss(trainer, batch), f"Bradley-Terry loss (margin={margin}, center={center})")
    _assert_close((r_chosen - r_rejected).mean(), _metrics(trainer)["margin"][-1], "mean reward margin")


# ---- RLOO ------------------------------------------------------------------------------------
# TRL's RLOO advantages live inside ``RLOOTrainer._generate_and_score_completions`` (which samples
# the completions itself) and its loss in ``_compute_loss``. So TRL samples, scores and computes
# its advantages; our code gets the same token ids and TRL's scores, computes its own log-probs
# (policy and reference, through ``token_forward`` on our own right-padded batch), KL penalty and
# leave-one-out advantages; then the policy is perturbed (so ratios leave the clip range) and
# both losses are computed on it.

RLOO_PROMPTS = {"prompt": ["w1 w2 w3", "w4 w5 w6", "w7 w8 w9"]}  # equal lengths: no left padding
RLOO_K = 4


def _rloo_reward(prompts, completions, **kwargs):
    return [float(c.count("w3") + c.count("w5")) + 0.1 * len(c.split()) for c in completions]


def _rloo_case(tmp_path, beta, normalize, epsilon_high=None, temperature=1.0):
    from trl import RLOOConfig, RLOOTrainer

    from chatloop.train.common import Encoded, collate
    from chatloop.train.ppo import token_forward

    policy_dir = tmp_path / "policy"
    _causal_lm(0).save_pretrained(policy_dir)
    n = len(RLOO_PROMPTS["prompt"]) * RLOO_K
    args = _args(RLOOConfig, tmp_path, per_device_train_batch_size=n, num_generations=RLOO_K,
                 max_completion_length=6, beta=beta, normalize_advantages=normalize, temperature=temperature,
                 epsilon=0.2, epsilon_high=epsilon_high)
    trainer = RLOOTrainer(model=str(policy_dir), reward_funcs=_rloo_reward, args=args,
                          train_dataset=Dataset.from_dict(RLOO_PROMPTS), processing_class=_tokenizer())
    if beta:
        # a different reference, so the KL penalty is far from zero (weights loaded into TRL's own
        # reference, whose forward it patched)
        trainer.ref_model.load_state_dict(_causal_lm(1).state_dict())
    model = trainer.model
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in RLOO_PROMPTS["prompt"]
                                                   for _ in range(RLOO_K)])
    scores = torch.tensor(list(trainer._logs["rewards"]["_rloo_reward"])[-n:], dtype=torch.float)
    items = [Encoded(out["prompt_ids"][i][out["prompt_mask"][i].bool()].tolist(),
                     out["completion_ids"][i][out["completion_mask"][i].bool()].tolist()) for i in range(n)]
    batch = collate(items, PAD)
    with torch.no_grad():
        lp, _, _, mask = token_forward(model, None, batch, temperature)
        seq_kl = torch.zeros(n)
        if beta:
            ref, _, _, _ = token_forward(trainer.ref_model, None, batch, temperature)
            seq_kl = ((lp - ref) * mask).sum(1)
    old_seq = (lp * mask).sum(1)
    adv, _ = our_rloo.rloo_advantages(scores, seq_kl, RLOO_K, beta, normalize)
    _assert_close(old_seq, out["old_logps"], "old sequence log-probs")
    _assert_close(adv, out["advantages"], "leave-one-out advantages")
    # perturb the policy: ratios now spread beyond the clip range
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=g))
    with torch.no_grad():
        theirs = trainer._compute_loss(model, out)
        new, _, _, m = token_forward(model, None, batch, temperature)
        ours, frac = our_rloo.rloo_loss((new * m).sum(1), old_seq, adv, 0.2, epsilon_high)
    _assert_close(ours, theirs, "clipped sequence loss")
    _assert_close(frac, _metrics(trainer)["clip_ratio/region_mean"][-1], "clipped share")
    return frac, adv


@pytest.mark.parametrize("beta, normalize", [(0.0, False), (0.05, False), (0.2, True)])
def test_rloo_advantages_and_loss_match_trl(tmp_path, beta, normalize):
    frac, adv = _rloo_case(tmp_path, beta, normalize)
    assert 0 < float(frac) < 1 and float(adv.abs().max()) > 0.05  # clipping and advantages both exercised


def test_rloo_with_an_asymmetric_clip_and_temperature_matches_trl(tmp_path):
    _rloo_case(tmp_path, 0.05, False, epsilon_high=0.28, temperature=0.7)


def test_rloo_tolerance_catches_a_plain_mean_baseline(tmp_path, monkeypatch):
    """The baseline *including* the reply itself (a common slip) is off by a factor k/(k-1)."""
    real = our_rloo.rloo_advantages

    def with_own_reply(scores, seq_kl, k, beta, normalize=False):
        rewards = scores - beta * seq_kl
        g = rewards.view(-1, k)
        return (g - g.mean(dim=1, keepdim=True)).reshape(-1), rewards

    monkeypatch.setattr(our_rloo, "rloo_advantages", with_own_reply)
    with pytest.raises(AssertionError, match="leave-one-out advantages"):
        _rloo_case(tmp_path, 0.05, False)
    monkeypatch.setattr(our_rloo, "rloo_advantages", real)
