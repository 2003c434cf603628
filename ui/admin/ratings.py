"""Admin › Ratings: is the bot getting better? Each served version's liked share from real users'
thumbs next to the gate's verdicts; the live comparison of a candidate in the Compare tab; and
every version's Bradley-Terry rating from blind A/B votes, as a table and over time."""

from __future__ import annotations

import gradio as gr

from chatloop.errors import ChatloopError
from chatloop.ratings import history
from ui.admin.context import AdminContext, Section
from ui.common import table
from ui.plots import liked_plot, ratings_plot

COLUMNS = ["version", "rating", "low", "high", "votes", "wins"]
LIKED_COLUMNS = ["version", "served_from", "thumbs", "liked_pct", "low_pct", "high_pct", "gate", "run_id", "why"]


def ratings(ctx: AdminContext) -> Section:
    service = ctx.service
    with gr.Row():
        live_version = gr.Textbox(label="Candidate for the Compare tab (e.g. v3)", elem_id="admin-live-version")
        live_start = gr.Button("Start live comparison", elem_id="admin-live-start")
        live_stop = gr.Button("Stop", elem_id="admin-live-stop")
        ratings_btn = gr.Button("Refresh ratings", elem_id="admin-ratings-refresh")
    liked_fig = gr.Plot(label="Liked share of each served version", elem_id="admin-liked-plot")
    liked_df = gr.Dataframe(label="Liked share (real users' latest 👍/👎, 95% Wilson interval) and the gate's verdict",
                            interactive=False, elem_id="admin-liked")
    live_md = gr.Markdown("", elem_id="admin-live-msg")
    ratings_df = gr.Dataframe(label="Ratings (Bradley-Terry, 95% bootstrap interval)", interactive=False,
                              elem_id="admin-ratings")
    ratings_fig = gr.Plot(label="Ratings over time", elem_id="admin-ratings-plot")

    def refresh(ok, msg=""):
        ctx.guard(ok)
        rows = [[r[c] if not isinstance(r[c], float) else round(r[c], 1) for c in COLUMNS] for r in service.ratings()]
        live = service.live_comparison()
        note = msg or (f"Live comparison: **{live}** against the active version in the Compare tab."
                       if live else "No live comparison: the Compare tab shows two samples of the active version.")
        liked = service.liked_by_version()
        liked_rows = [[str(r[c])[:19] if c == "served_from" and r[c] is not None else r[c] for c in LIKED_COLUMNS]
                      for r in liked]
        return (liked_plot(liked), table(LIKED_COLUMNS, liked_rows), note, table(COLUMNS, rows),
                ratings_plot(history(service.version_votes())))

    def live(start):
        def handler(ok, v):
            ctx.guard(ok)
            try:
                service.set_live_comparison((v or "").strip() if start else None)
            except ChatloopError as exc:
                return refresh(ok, f"⚠️ {exc}")
            return refresh(ok)
        return handler

    outs = [liked_fig, liked_df, live_md, ratings_df, ratings_fig]
    ratings_btn.click(refresh, [ctx.signed_in], outs)
    live_start.click(live(True), [ctx.signed_in, live_version], outs)
    live_stop.click(live(False), [ctx.signed_in, live_version], outs)
    return Section(refresh, outs, periodic=False)
