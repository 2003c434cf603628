"""Outlier raters: users whose A/B votes disagree with everyone else's far more than chance.

Owns: the test that finds them, after Chatbot Arena's: for each user with enough decisive votes
between replies of two different versions, a Bradley-Terry fit on every *other* user's votes (see
``chatloop.ratings``) says which side of each of this user's votes the consensus favours and how
strongly (p >= 0.5). Under the hypothesis that the user votes like the consensus, the number of
votes that side gets has mean sum(p) and variance sum(p (1 - p)); a user whose count falls more
than ``z`` standard deviations below it is an outlier, and the training snapshot leaves out their
pairs and thumbs (``chatloop.prefs``).

Invariants: votes of a user between replies of one version, ties and "both bad" carry no version
signal and are not counted; a consensus that is indifferent (p = 0.5) cannot make anyone an
outlier; ``z = 0`` turns the test off. Pure: no database, no model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from chatloop.ratings import bradley_terry

UserVote = tuple[str, str, str, str]  # (user, version of A, version of B, choice)


@dataclass(frozen=True)
class RaterCheck:
    user: str
    votes: int  # decisive votes between two versions
    with_consensus: int  # of them, for the side everyone else favours
    expected: float
    z: float


def check_raters(votes: Iterable[UserVote], min_votes: int = 10) -> list[RaterCheck]:
    """One check per user with at least ``min_votes`` decisive votes between two versions."""
    votes = list(votes)
    decisive: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for user, a, b, choice in votes:
        if a != b and choice in ("a", "b"):
            decisive[user].append((a, b, choice))
    out = []
    for user, own in decisive.items():
        if len(own) < min_votes:
            continue
        strength = bradley_terry([(a, b, c) for u, a, b, c in votes if u != user])
        agree, mean, var = 0, 0.0, 0.0
        for a, b, choice in own:
            pa, pb = strength.get(a, 1.0), strength.get(b, 1.0)
            favoured, p = ("a", pa / (pa + pb)) if pa >= pb else ("b", pb / (pa + pb))
            agree += choice == favoured
            mean += p
            var += p * (1 - p)
        z = (agree - mean) / math.sqrt(var) if var > 0 else 0.0
        out.append(RaterCheck(user, len(own), agree, round(mean, 2), round(z, 2)))
    return out


def outlier_users(votes: Iterable[UserVote], z: float = 3.0, min_votes: int = 10) -> set[str]:
    """Users who side with the consensus more than ``z`` standard deviations less than expected."""
    if z <= 0:
        return set()
    return {c.user for c in check_raters(votes, min_votes) if c.z < -z}
