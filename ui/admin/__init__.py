"""The Admin tab: the operator's sign-in, then one sub-tab per job (Overview, Runs, Adapters,
Ratings, Schedules, Feedback, SQL, API keys), each in a module of its own.

Invariants: nothing of the panel is shown, and no handler acts, until the session signed in with
the operator token (the API's check: ``chatloop.operators.OperatorGate``, the same back-off);
the panel refreshes itself every two seconds while signed in.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from chatloop.operators import OperatorGate
from chatloop.ratelimit import RateLimited
from chatloop.service import Service
from ui.admin.adapters import adapters
from ui.admin.console import console
from ui.admin.context import AdminContext
from ui.admin.feedback import feedback
from ui.admin.keys import keys
from ui.admin.overview import overview
from ui.admin.ratings import ratings
from ui.admin.runs import runs
from ui.admin.schedules import schedules as schedules_section
from ui.common import address


def admin_tab(service: Service, admin_token: str, schedules: Any = None) -> None:
    operators = OperatorGate(admin_token, service.signin_backoff)
    ctx = AdminContext(service, schedules, gr.State(False))
    with gr.Row(visible=True) as login_row:
        token = gr.Textbox(label="Operator token", type="password", elem_id="admin-token")
        login = gr.Button("Sign in", elem_id="admin-login")
    login_msg = gr.Markdown("")
    with gr.Column(visible=False) as panel:
        with gr.Tabs():
            sections = []
            for title, build in (("Overview", overview), ("Runs", runs), ("Adapters", adapters),
                                 ("Ratings", ratings)):
                with gr.Tab(title, id=f"admin-{title.lower()}"):
                    sections.append(build(ctx))
            with gr.Tab("Schedules", id="admin-schedules", visible=schedules is not None):
                sections.append(schedules_section(ctx))
            with gr.Tab("Feedback", id="admin-feedback"):
                feedback(ctx)
            with gr.Tab("SQL", id="admin-sql-tab"):
                console(ctx)
            with gr.Tab("API keys", id="admin-keys-tab"):
                sections.append(keys(ctx))
        timer = gr.Timer(2.0, active=False)

    def sign_in(tok, request: gr.Request):
        try:
            ok, wait = operators.matches(tok or "", address(request)), ""
        except RateLimited as exc:
            ok, wait = False, str(exc)
        if not ok:
            msg = ("Admin is disabled: no operator token is configured." if not operators.enabled
                   else wait or "Wrong operator token.")
            return False, msg, gr.update(visible=False), gr.update(visible=True), gr.Timer(active=False)
        return True, "Signed in.", gr.update(visible=True), gr.update(visible=False), gr.Timer(active=True)

    signed = login.click(sign_in, [token], [ctx.signed_in, login_msg, panel, login_row, timer])
    for section in sections:
        signed.then(section.guarded(), [ctx.signed_in], section.outputs)
        if section.periodic:
            timer.tick(section.guarded(), [ctx.signed_in], section.outputs)
