"""Admin › Overview: the service's status, the running cycle, starting and cancelling one, and
the latest run's training curves."""

from __future__ import annotations

import gradio as gr

from chatloop.algorithms import NAMES as ALGORITHMS
from chatloop.algorithms import Algorithm
from chatloop.errors import ChatloopError
from chatloop.run_status import RunStatus
from ui.admin.context import AdminContext, Section
from ui.plots import training_curve


def cycle_line(cyc: dict | None) -> str:
    if not cyc:
        return "No cycle running."
    phase = f" ({cyc['phase']})" if cyc.get("phase") and cyc["phase"] != cyc["algo"] else ""
    return (f"Cycle run {cyc['run_id']} ({cyc['algo']}): {cyc['stage']}{phase}, step {cyc['step']}/"
            f"{cyc['total'] or '?'}" + (f", loss {cyc['last'].get('loss', 0):.4f}" if cyc["last"] else ""))


def overview(ctx: AdminContext) -> Section:
    service = ctx.service
    status_md = gr.Markdown("", elem_id="admin-status")
    with gr.Row():
        algo = gr.Dropdown(list(ALGORITHMS), value=Algorithm.DPO.value, label="Algorithm")
        retrain_btn = gr.Button("Retrain now", variant="primary", elem_id="admin-retrain")
        cancel_btn = gr.Button("Cancel cycle", elem_id="admin-cancel")
    action_md = gr.Markdown("", elem_id="admin-action")
    cycle_md = gr.Markdown("", elem_id="admin-cycle")
    curve = gr.Plot(label="Latest run: loss and reward margin", elem_id="admin-curve")

    def curve_of(cyc):
        """Per-step curves of the running cycle's phase, else of the latest finished run."""
        if cyc and cyc.get("history"):
            history = [h for h in cyc["history"] if h.get("phase", "") == cyc.get("phase", "")]
            title = f"run {cyc['run_id']} (running{', ' + cyc['phase'] if cyc.get('phase') else ''})"
            return training_curve(history, title)
        done = next((r for r in service.runs(20) if r["status"] in (RunStatus.PROMOTED, RunStatus.REJECTED)), None)
        history = (service.run(done["id"]).get("metrics") or {}).get("history", []) if done else []
        return training_curve(history, f"run {done['id']} ({done['status']})" if done else "no finished run yet")

    def refresh(ok):
        st = service.status()
        cyc = st.pop("cycle")
        return " · ".join(f"**{k}**: {v}" for k, v in st.items()), cycle_line(cyc), curve_of(cyc)

    def retrain(ok, algo_v):
        ctx.guard(ok)
        try:
            return f"Started retraining run {service.retrain(algo_v, trigger='ui')}."
        except ChatloopError as exc:
            return f"⚠️ {exc}"

    def cancel(ok):
        ctx.guard(ok)
        return "Cancelling…" if service.cancel_retraining() else "No cycle is running."

    retrain_btn.click(retrain, [ctx.signed_in, algo], [action_md])
    cancel_btn.click(cancel, [ctx.signed_in], [action_md])
    return Section(refresh, [status_md, cycle_md, curve])
