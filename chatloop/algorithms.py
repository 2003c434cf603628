"""The training algorithms a cycle can run, by name, and what feedback each one learns from.

Owns: ``Algorithm`` (a ``StrEnum``: its members compare equal to, and serialise as, the names
stored in runs and schedules) and the facts about each that the cycle, the gate and the UI read.

Invariants: every place that accepts or lists an algorithm takes it from here, so adding one is
one line here plus its trainer in ``chatloop.train.runner``.
"""

from __future__ import annotations

from enum import StrEnum

from chatloop.errors import ChatloopError


class Algorithm(StrEnum):
    DPO = "dpo"  # preference pairs (A/B votes, and up/down thumbs on replies to one prompt)
    KTO = "kto"  # unpaired thumbs
    PPO = "ppo"  # a reward model fitted on pairs, then on-policy rollouts from training prompts
    RLOO = "rloo"  # the same reward model; k rollouts per prompt, a leave-one-out baseline, no critic

    @property
    def learns_from_thumbs_alone(self) -> bool:
        return self is Algorithm.KTO

    @property
    def samples_rollouts(self) -> bool:
        """Trains on its own sampled replies, scored by a reward model it fits on the snapshot first."""
        return self in (Algorithm.PPO, Algorithm.RLOO)


NAMES = tuple(a.value for a in Algorithm)


class UnknownAlgorithm(ChatloopError, ValueError):
    pass


def parse(name: str) -> Algorithm:
    """The algorithm called ``name`` (UnknownAlgorithm, with the choices, for anything else)."""
    try:
        return Algorithm(name)
    except ValueError:
        raise UnknownAlgorithm(f"unknown algorithm {name!r}; available: {', '.join(NAMES)}") from None
