"""The promotion gate: decide whether a trained candidate adapter replaces the active one.

Owns: the verdict (promote or reject, with one reason per check) from a candidate's metrics.
The measurements come from the training child: the training loop's held-out metrics and the
judge's behaviour on held-out prompts (``chatloop.train.judge``).

A candidate is promoted only when every check passes:
1. its training loss is finite;
2. preference accuracy on held-out data is not worse than the active adapter's.
   - DPO/KTO: the implicit reward. The active adapter is the reference, whose implicit reward is
     0 on every pair, so its accuracy is 0.5 with ties counting half. KTO uses the share of
     (thumbs-up, thumbs-down) reply pairs whose implicit rewards are in the thumbs' order.
   - PPO/RLOO: the reward model's held-out pair accuracy, which must beat chance.
   - With too little data for a held-out set, the training loss must have fallen instead.
   - DPO/KTO hand back the checkpoint with the lowest held-out loss, so this check reads the set
     the checkpoint was chosen on (an optimistic figure); a candidate whose best checkpoint is
     its starting point (no update lowered the held-out loss) is the active adapter unchanged
     and is rejected. The reward model's win rate below is measured on fresh replies.
3. the reward model prefers the candidate's replies to the active adapter's on held-out prompts
   at least ``gate_win_rate`` of the time (ties count half), *and* its mean score of the
   candidate's replies is above its mean score of the reference's. A candidate no better than
   the active adapter wins about half the prompts by chance, so the win rate alone at 0.5 lets it
   through (it did: docs/LOG.md); an unchanged adapter ties everywhere and has the same mean. The check is skipped, and says so, when no reward model could be trained or no prompts
   were held out;
4. KL to the base model on the candidate's own replies is at most ``gate_max_kl`` nats per token;
5. its share of degenerate replies (empty, repetitive or echoing the prompt) exceeds the reference's by at most
   ``gate_max_degenerate_increase``;
6. task relevance (``chatloop.train.relevance``: how much likelier the base model finds each reply
   after its own prompt than after another held-out prompt, in nats per token) falls at most
   ``gate_max_relevance_drop`` below the base model's own replies' and keeps at least
   ``gate_min_relevance`` of it (the floor that matters where the base figure is small). Anchored
   to base, as KL is, so that drift cannot compound over rounds. Replies that drift off their
   prompts lose it however well the reward model likes them;
7. register (``chatloop.train.register``: how much likelier the base model finds each reply as a
   chat assistant's turn than as the continuation of the user's own text, in nats per token) rises
   at most ``gate_max_register_shift`` above the base model's own replies' on the same prompts:
   drift into assistant talk. With the limit at 0 the figure is reported, not checked;
8. document likelihood (the base model's log-likelihood per token of each reply as the plain
   continuation of the user's text, ``chatloop.train.register``) falls at most
   ``gate_max_document_drop`` below the base model's own replies' on the same prompts: talk (or
   drift) the base model finds unlikely as a chat turn too keeps its register but loses this.
   With the limit at 0 (the default: at 32 prompts it judged two real candidates the wrong way
   round) the figure is reported, not checked.

Invariant: the verdict (structured checks, see ``Verdict``) is returned for the caller to store;
nothing here activates anything, and nobody parses its text back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from chatloop.algorithms import Algorithm
from chatloop.config import TrainingDefaults

REFERENCE_ACCURACY = 0.5


@dataclass(frozen=True)
class Check:
    """One check of the gate: passed (True), failed (False) or not measured (None), the figure it
    read and the threshold it compared with (where it has them), and the reason in words."""
    name: str
    passed: bool | None
    reason: str
    figure: float | None = None
    threshold: float | None = None

    def render(self) -> str:
        return ("✓ " if self.passed else "✗ " if self.passed is False else "– ") + self.reason

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "reason": self.reason,
                "figure": self.figure, "threshold": self.threshold}


@dataclass
class Verdict:
    """The checks in order; the candidate is promoted when none failed. Stored as JSON
    (``as_dict``, read back with ``from_dict``) and rendered to text in one place (``summary``)."""
    results: list[Check] = field(default_factory=list)

    @property
    def promote(self) -> bool:
        return all(c.passed is not False for c in self.results)

    @property
    def checks(self) -> dict[str, bool | None]:
        return {c.name: c.passed for c in self.results}

    @property
    def reasons(self) -> list[str]:
        return [c.render() for c in self.results]

    def add(self, check: Check) -> "Verdict":
        self.results.append(check)
        return self

    def without(self, name: str) -> "Verdict":
        return Verdict([c for c in self.results if c.name != name])

    def line(self, status: str | None = None) -> str:
        """The verdict as one line: its status (promoted or rejected unless given), then every reason."""
        return f"{status or ('promoted' if self.promote else 'rejected')}: " + "; ".join(self.reasons)

    @property
    def summary(self) -> str:
        return self.line()

    def as_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reasons": self.reasons, "checks": self.checks,
                "results": [c.as_dict() for c in self.results]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Verdict":
        return cls([Check(**c) for c in d.get("results", [])])


def gate(metrics: dict[str, Any], t: TrainingDefaults | None = None) -> Verdict:
    t = t or TrainingDefaults()
    final = metrics.get("final_loss")
    if final is None or not math.isfinite(final):
        return Verdict([Check("finite_loss", False, f"training loss is not finite ({final})")])
    verdict = Verdict([_accuracy(metrics)])
    judged = metrics.get("judge") or {}
    if not judged.get("prompts"):
        why = judged.get("skipped", "no behavioural evaluation")
        return verdict.add(Check("win_rate", None, f"reward-model win rate not measured ({why})")).add(
            Check("kl", None, "KL to base not measured")).add(
            Check("degenerate", None, "degenerate replies not measured")).add(
            Check("relevance", None, "task relevance not measured")).add(
            Check("register", None, "register not measured")).add(
            Check("document", None, "document likelihood not measured"))
    n = judged["prompts"]
    reward = judged.get("reward")
    if reward:
        wins = reward["win_rate"] >= t.gate_win_rate
        higher = reward["candidate"] > reward["reference"]
        verdict.add(Check(
            "win_rate", wins and higher,
            f"reward model prefers the candidate on {reward['win_rate']:.2f} of {n} held-out "
            f"prompts ({'>=' if wins else '<'} {t.gate_win_rate:.2f}) with a mean score "
            f"{reward['candidate']:.3f} {'above' if higher else 'not above'} the reference's "
            f"{reward['reference']:.3f}", reward["win_rate"], t.gate_win_rate))
    else:
        rm = judged.get("reward_model")
        verdict.add(Check("win_rate", None, "reward-model win rate not measured "
                                            f"({rm if isinstance(rm, str) else 'no reward model'})"))
    kl = judged["kl_to_base"]
    ok = math.isfinite(kl) and kl <= t.gate_max_kl
    verdict.add(Check("kl", ok, f"KL to base {kl:.3f} nats/token ({'<=' if ok else '>'} {t.gate_max_kl:g})",
                      kl, t.gate_max_kl))
    deg = judged["degenerate"]
    ok = deg["candidate"] <= deg["reference"] + t.gate_max_degenerate_increase
    verdict.add(Check("degenerate", ok, f"degenerate replies (empty, repetitive or echoing the prompt) "
                                        f"{deg['candidate']:.2f} vs reference {deg['reference']:.2f} "
                                        f"({'within' if ok else 'beyond'} +{t.gate_max_degenerate_increase:g})",
                      deg["candidate"] - deg["reference"], t.gate_max_degenerate_increase))
    return verdict.add(relevance_check(judged.get("relevance"), t)).add(register_check(judged.get("register"), t)).add(
        document_check(judged.get("document"), t))


def _paired_shift_check(name: str, label: str, paired: dict[str, Any], framing: str, limit: float, setting: str,
                        upward: bool, held: str, lost: str) -> Check:
    """A candidate-minus-base figure over the same prompts (``paired``: mean, se, replies) against
    ``limit``: at most that far above base (``upward``) or below it; reported without a verdict when
    the limit is 0. ``held``/``lost`` say what passing or failing means for the replies."""
    shift, se = paired.get("mean"), paired.get("se")
    if shift is None:
        return Check(name, None, f"{label} not measured (no non-empty replies)")
    figure = (f"{label} {shift:+.3f} ± {se or 0.0:.3f} nats/token against the base model's replies over "
              f"{paired.get('replies')} prompts ({framing}")
    if limit <= 0:
        return Check(name, None, f"{figure}; not checked: {setting} = 0)", shift)
    ok = shift <= limit if upward else shift >= -limit
    bound = f"{'<=' if ok else '>'} {limit:g}" if upward else f"{'>=' if ok else '<'} -{limit:g}"
    return Check(name, ok, f"{figure}, {bound}; replies {held if ok else lost})", shift, limit if upward else -limit)


def document_check(doc: dict[str, Any] | None, t: TrainingDefaults) -> Check:
    """The candidate's document likelihood against the base model's replies to the same prompts
    (paired): at most ``gate_max_document_drop`` below it; reported without a verdict when the limit
    is 0, and not measured for a judge that did not report it."""
    return _paired_shift_check("document", "document likelihood", (doc or {}).get("paired_difference") or {},
                               "each reply as the plain continuation of the user's text", t.gate_max_document_drop,
                               "gate_max_document_drop", False, "read as well as the base model's as a continuation",
                               "do not read as well as the base model's as a continuation")


def register_check(reg: dict[str, Any] | None, t: TrainingDefaults) -> Check:
    """The candidate's register against the base model's replies to the same prompts (paired): at
    most ``gate_max_register_shift`` above it; reported without a verdict when the limit is 0."""
    return _paired_shift_check("register", "register", (reg or {}).get("paired_difference") or {},
                               "chat over plain-document likelihood", t.gate_max_register_shift,
                               "gate_max_register_shift", True, "keep the base model's register",
                               "drift from the base model's register")


def relevance_check(rel: dict[str, Any] | None, t: TrainingDefaults) -> Check:
    """The candidate's mean relevance against the base model's (its replies to the same prompts):
    at least ``base - gate_max_relevance_drop`` and ``gate_min_relevance * base`` (a base figure at
    or below zero asks for at least zero)."""
    if t.gate_min_relevance <= 0 and t.gate_max_relevance_drop <= 0:
        return Check("relevance", None, "task relevance check off (gate_min_relevance = gate_max_relevance_drop = 0)")
    cand = ((rel or {}).get("candidate") or {}).get("mean")
    base = ((rel or {}).get("base") or {}).get("mean")
    if cand is None or base is None:
        return Check("relevance", None, "task relevance not measured (no non-empty replies)")
    floors = [t.gate_min_relevance * max(base, 0.0)] if t.gate_min_relevance > 0 else []
    if t.gate_max_relevance_drop > 0:
        floors.append(base - t.gate_max_relevance_drop)
    need = max(floors)
    ok = cand >= need
    paired = (rel or {}).get("paired_difference") or {}
    noise = (f", paired difference {paired['mean']:+.3f} ± {paired['se']:.3f} over {paired['replies']} prompts"
             if paired.get("mean") is not None and paired.get("se") is not None else "")
    return Check("relevance", ok, f"task relevance {cand:.3f} nats/token vs the base model's {base:.3f} "
                                  f"({'>=' if ok else '<'} {need:.3f}: at most {t.gate_max_relevance_drop:g} "
                                  f"below and at least {t.gate_min_relevance:g}x{noise}; replies "
                                  f"{'fit' if ok else 'do not fit'} their own prompts)", cand, need)


def _accuracy(metrics: dict[str, Any]) -> Check:
    if metrics.get("algo") in (Algorithm.PPO, Algorithm.RLOO):
        rm = metrics.get("reward_model") or {}
        held = rm.get("held_out") or {}
        if held.get("pairs"):
            ok = held["accuracy"] >= REFERENCE_ACCURACY
            return Check("accuracy", ok, f"reward model held-out pair accuracy {held['accuracy']:.3f} on "
                                         f"{held['pairs']} pairs ({'>=' if ok else '<'} chance {REFERENCE_ACCURACY})",
                         held["accuracy"], REFERENCE_ACCURACY)
        return Check("accuracy", True, "reward model has no held-out pairs (too little feedback); its win rate decides")
    held = metrics.get("held_out") or {}
    n = held.get("pairs") or held.get("examples")
    selection = metrics.get("selection") or {}
    if n and selection.get("best_step") == 0:
        return Check("accuracy", False, f"no training step lowered the held-out loss ({selection['best_score']:.4f} "
                                        "at the start); the candidate is the active adapter unchanged")
    if n:
        acc = held["accuracy"]
        ok = acc >= REFERENCE_ACCURACY
        what = "preference" if held.get("pairs") else "thumb ranking"
        unit = "pairs" if held.get("pairs") else "replies"
        return Check("accuracy", ok, f"held-out {what} accuracy {acc:.3f} on {n} {unit} "
                                     f"({'>=' if ok else '<'} active adapter's {REFERENCE_ACCURACY})", acc, REFERENCE_ACCURACY)
    train = metrics.get("train_eval") or {}
    first = metrics.get("first_loss")
    if not train or first is None:
        return Check("accuracy", False, "no evaluation metrics")
    ok = train["loss"] < first
    return Check("accuracy", ok, f"no held-out data (too little feedback); training loss {train['loss']:.4f} "
                                 f"{'<' if ok else '>='} starting loss {first:.4f}", train["loss"], first)
