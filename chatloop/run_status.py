"""The states of a training run, as stored in ``training_runs.status``.

Owns: ``RunStatus`` (a ``StrEnum``: members compare equal to, and are stored as, their names).

Invariants: a run starts ``running`` and ends in exactly one of the others; only ``staged``
changes again (to ``promoted`` or ``rejected`` once its live A/B votes are in), and only
``rejected`` to ``overridden`` (an operator's override, with a reason).
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    RUNNING = "running"
    REFUSED = "refused"  # not enough feedback: nothing was trained
    FAILED = "failed"  # training or publishing failed, or the service died during the cycle
    REJECTED = "rejected"  # the gate said no; the candidate is published but serves nobody
    STAGED = "staged"  # the offline checks passed; waiting for live A/B votes against its parent
    PROMOTED = "promoted"  # the gate said yes (or its live A/B votes did): it serves
    OVERRIDDEN = "overridden"  # rejected, then promoted by an operator who said why

    @property
    def finished(self) -> bool:
        return self is not RunStatus.RUNNING
