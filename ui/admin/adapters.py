"""Admin › Adapters: the published versions, activating one, and rolling back."""

from __future__ import annotations

import gradio as gr

from chatloop.errors import ChatloopError
from ui.admin.context import AdminContext, Section
from ui.common import table

COLUMNS = ["version", "active", "parent", "algo", "run_id", "train_pairs", "verdict"]


def adapters(ctx: AdminContext) -> Section:
    service = ctx.service
    adapters_df = gr.Dataframe(label="Adapters", interactive=False, elem_id="admin-adapters")
    with gr.Row():
        version_box = gr.Textbox(label="Version to activate (e.g. v2, or base)", elem_id="admin-version")
        activate_btn = gr.Button("Activate", elem_id="admin-activate")
        rollback_btn = gr.Button("Roll back", elem_id="admin-rollback")
    action_md = gr.Markdown("", elem_id="admin-adapters-action")

    def refresh(ok):
        return (table(COLUMNS, [[a.get(c) for c in COLUMNS] for a in service.adapters()]),)

    def activate(ok, v):
        ctx.guard(ok)
        try:
            prev = service.activate((v or "").strip(), actor="operator", reason="activated in the UI")
        except ChatloopError as exc:
            return f"⚠️ {exc}", *refresh(ok)
        return f"Activated {v.strip()} (was {prev}).", *refresh(ok)

    def rollback(ok):
        ctx.guard(ok)
        try:
            prev, now_active = service.rollback()
        except ChatloopError as exc:
            return f"⚠️ {exc}", *refresh(ok)
        return f"Rolled back from {prev} to {now_active}.", *refresh(ok)

    activate_btn.click(activate, [ctx.signed_in, version_box], [action_md, adapters_df])
    rollback_btn.click(rollback, [ctx.signed_in], [action_md, adapters_df])
    return Section(refresh, [adapters_df])
