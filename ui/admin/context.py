"""What every Admin section is given and gives back.

Owns: ``AdminContext`` (the service, the scheduler, the signed-in state and the guard every
handler calls first) and ``Section`` (a sub-tab's refresh function and the components it fills).

Invariants: every handler of an Admin section refuses to act unless the session signed in with
the operator token (``guard``); a refresh of a session that has not signed in changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from chatloop.service import Service


@dataclass
class AdminContext:
    service: Service
    schedules: Any  # jobs.scheduler.RetrainScheduler, or None in a process without one
    signed_in: gr.State

    @staticmethod
    def guard(ok: bool) -> None:
        if not ok:
            raise gr.Error("Sign in as an operator first.")


@dataclass
class Section:
    """A sub-tab's ``refresh(ok)`` and the components it returns values for, in order;
    ``periodic`` ones refresh every few seconds while signed in, the others on sign-in only."""
    refresh: Callable[[bool], tuple]
    outputs: list
    periodic: bool = True

    def guarded(self) -> Callable[[bool], tuple]:
        def refresh(ok: bool):
            values = tuple(gr.skip() for _ in self.outputs) if not ok else self.refresh(ok)
            return values[0] if len(self.outputs) == 1 else values  # Gradio takes one output's value bare
        return refresh
