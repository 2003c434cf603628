"""Admin › Schedules: retraining by cron line, interval or after N new feedback events."""

from __future__ import annotations

import gradio as gr

from chatloop.algorithms import NAMES as ALGORITHMS
from chatloop.algorithms import Algorithm
from chatloop.errors import ChatloopError
from ui.admin.context import AdminContext, Section
from ui.common import table

COLUMNS = ["id", "kind", "spec", "algo", "source", "next_run", "events_until_next", "last_fired_at", "last_run_id"]


def schedules(ctx: AdminContext) -> Section:
    jobs_df = gr.Dataframe(label="Schedules", interactive=False, elem_id="admin-jobs")
    with gr.Row():
        kind = gr.Dropdown(["cron", "interval", "feedback"], value="feedback", label="Trigger", elem_id="admin-job-kind")
        spec = gr.Textbox(label="crontab (UTC) | minutes | new feedback events", value="50", elem_id="admin-job-spec")
        algo = gr.Dropdown(list(ALGORITHMS), value=Algorithm.DPO.value, label="Algorithm")
        add = gr.Button("Add schedule", elem_id="admin-job-add")
    with gr.Row():
        job_id = gr.Number(label="Schedule id", precision=0, value=None, elem_id="admin-job-id")
        run = gr.Button("Run now", elem_id="admin-job-run")
        remove = gr.Button("Remove", variant="stop", elem_id="admin-job-remove")
    msg = gr.Markdown("", elem_id="admin-jobs-msg")

    def refresh(ok):
        jobs = ctx.schedules.list() if ctx.schedules else []
        return (table(COLUMNS, [[j.get(c) for c in COLUMNS] for j in jobs]),)

    def add_job(ok, kind_v, spec_v, algo_v):
        ctx.guard(ok)
        try:
            job = ctx.schedules.add(kind_v, spec_v, algo_v, created_by="ui")
        except ChatloopError as exc:
            return f"⚠️ {exc}", *refresh(ok)
        return f"Added schedule {job['id']}: {kind_v} {spec_v} → {algo_v}.", *refresh(ok)

    def job_action(action):
        def handler(ok, jid):
            ctx.guard(ok)
            if jid is None:
                return "⚠️ Enter a schedule id first.", *refresh(ok)
            try:
                if action == "remove":
                    ctx.schedules.remove(int(jid))
                    return f"Removed schedule {int(jid)}.", *refresh(ok)
                run_id = ctx.schedules.run_now(int(jid))
                return f"Started retraining run {run_id} for schedule {int(jid)}.", *refresh(ok)
            except ChatloopError as exc:
                return f"⚠️ {exc}", *refresh(ok)
        return handler

    add.click(add_job, [ctx.signed_in, kind, spec, algo], [msg, jobs_df])
    remove.click(job_action("remove"), [ctx.signed_in, job_id], [msg, jobs_df])
    run.click(job_action("run"), [ctx.signed_in, job_id], [msg, jobs_df])
    return Section(refresh, [jobs_df])
