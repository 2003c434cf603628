"""Admin › Runs: every training run with its verdict, and the override of a rejected one."""

from __future__ import annotations

import gradio as gr

from chatloop.errors import ChatloopError
from ui.admin.context import AdminContext, Section
from ui.common import table

COLUMNS = ["id", "algo", "trigger", "status", "started_at", "parent_version", "candidate_version", "n_pairs",
           "verdict", "override", "error"]


def runs(ctx: AdminContext) -> Section:
    service = ctx.service
    runs_df = gr.Dataframe(label="Training runs", interactive=False, elem_id="admin-runs")
    with gr.Row():
        override_run = gr.Number(label="Rejected run to promote anyway", precision=0, value=None,
                                 elem_id="admin-override-run")
        override_reason = gr.Textbox(label="Why (recorded)", elem_id="admin-override-reason")
        override_btn = gr.Button("Override the gate", variant="stop", elem_id="admin-override")
    action_md = gr.Markdown("", elem_id="admin-runs-action")

    def refresh(ok):
        return (table(COLUMNS, [[r.get(c) for c in COLUMNS] for r in service.runs(20)]),)

    def override(ok, run_id, why):
        ctx.guard(ok)
        if run_id is None:
            return "⚠️ Enter the id of a rejected run.", *refresh(ok)
        try:
            prev = service.override(int(run_id), why or "", actor="operator (UI)")
        except ChatloopError as exc:
            return f"⚠️ {exc}", *refresh(ok)
        return f"Run {int(run_id)} promoted by override (was {prev}); the reason is recorded.", *refresh(ok)

    override_btn.click(override, [ctx.signed_in, override_run, override_reason], [action_md, runs_df])
    return Section(refresh, [runs_df])
