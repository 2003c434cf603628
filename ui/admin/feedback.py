"""Admin › Feedback: every thumb and A/B vote with its reply, filtered by kind, version, user, date."""

from __future__ import annotations

import gradio as gr

from chatloop.errors import ChatloopError
from ui.admin.context import AdminContext
from ui.common import table

COLUMNS = ["kind", "id", "created_at", "user_id", "rating", "choice", "reason", "adapter_version", "prompt", "reply"]


def feedback(ctx: AdminContext) -> None:
    with gr.Row():
        kind = gr.Dropdown(["all", "up", "down", "A/B"], value="all", label="Kind")
        version = gr.Textbox(label="Adapter version", elem_id="admin-fb-version")
        user = gr.Textbox(label="User id")
        since = gr.Textbox(label="Since (YYYY-MM-DD)")
        show = gr.Button("Show", elem_id="admin-fb-show")
    found_df = gr.Dataframe(label="Feedback (newest first)", interactive=False, elem_id="admin-fb")

    def browse(ok, kind_v, version_v, user_v, since_v):
        ctx.guard(ok)
        try:
            found = ctx.service.browse_feedback(kind=kind_v, version=(version_v or "").strip() or None,
                                                user=(user_v or "").strip() or None,
                                                since=(since_v or "").strip() or None)
        except ChatloopError as exc:
            raise gr.Error(str(exc))
        return table(COLUMNS, [[str(r.get(c)) if c == "created_at" else r.get(c) for c in COLUMNS] for r in found])

    show.click(browse, [ctx.signed_in, kind, version, user, since], [found_df])
