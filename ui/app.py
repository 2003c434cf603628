"""The Gradio UI: Chat (stream, thumbs with a reason, regenerate), Compare (A/B) and Admin.

Owns: the browser-facing Blocks; it calls ``chatloop.service.Service`` only.

Invariants:
- The conversation shown is kept in session state as plain {role, content} turns with the
  stored message id of every assistant reply; the Chatbot component only displays it, so a
  thumb always lands on the message id the user saw.
- Each browser session gets an anonymous user id; every reply, thumb and A/B choice carries it.
- Compare shows the two replies in random order (blind); the choice is stored by message id.
- The Admin tab shows nothing until the operator token is entered.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
import uuid
from typing import Any

import gradio as gr

from chatloop.algorithms import NAMES as ALGORITHMS
from chatloop.algorithms import Algorithm
from chatloop.errors import ChatloopError
from chatloop.identity import CookieSigner
from chatloop.operators import OperatorGate
from chatloop.ratelimit import RateLimited
from chatloop.run_status import RunStatus
from chatloop.service import Service
from chatloop.store import NotFound

NOTICE = ("**Your ratings improve this bot.** Replies you rate (👍/👎, with an optional reason) and "
          "A/B choices are logged and used to retrain the model. Do not share personal information.")
REASONS = ["", "helpful", "accurate", "well written", "wrong", "unhelpful", "repetitive",
           "too long", "unsafe or rude"]


def _new_user() -> str:
    """A user for a session that came without the identity cookie (cookies blocked)."""
    return "ui:" + uuid.uuid4().hex[:16]


def _browser_user(request: gr.Request | None, signer: CookieSigner) -> str:
    """The browser's anonymous user from its signed ``chatloop_uid`` cookie (see chatloop.identity)."""
    uid = signer.uid_from_cookies(getattr(request, "cookies", None)) if request is not None else None
    return f"ui:{uid}" if uid else _new_user()


def _address(request: gr.Request | None) -> str:
    return getattr(getattr(request, "client", None), "host", None) or "?"


def _display(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def training_curve(history: list[dict[str, Any]], title: str):
    """A matplotlib figure of loss and reward margin per training step (DPO with thumbs or NLL: also
    the parts of the loss, since the held-out loss is the pairs' alone), and the held-out loss on the
    steps it was scored (the checkpoint selection's curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.8))
    steps = [h["step"] for h in history]
    for key, label in (("loss", "loss"), ("pairs_loss", "pairs' loss"), ("thumbs_loss", "thumbs' loss"),
                       ("nll", "chosen NLL"), ("reward_margin", "reward margin"), ("mean_reward", "mean reward"),
                       ("kl", "KL")):
        if history and key in history[0]:
            ax.plot(steps, [h[key] for h in history], marker="." if len(steps) < 30 else None, label=label)
    scored = [h for h in history if isinstance(h.get("held_out_score"), (int, float))]
    if scored:
        ax.plot([h["step"] for h in scored], [h["held_out_score"] for h in scored], marker="o", linestyle="--",
                label="held-out loss")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if history:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def ratings_plot(points: list[tuple[Any, dict[str, float]]]):
    """Ratings of adapter versions (Elo scale) as the A/B votes came in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.8))
    versions = sorted({v for _, r in points for v in r})
    for v in versions:
        xs = [t for t, r in points if v in r]
        ax.plot(xs, [r[v] for t, r in points if v in r], marker=".", label=v)
    ax.set_ylabel("rating (Elo scale)")
    ax.set_title("Adapter ratings from A/B votes over time" if points else "no A/B votes between versions yet",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if versions:
        ax.legend(loc="best", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    plt.close(fig)
    return fig


def build_ui(service: Service, admin_token: str, schedules: Any = None) -> gr.Blocks:
    """The Gradio app. ``schedules`` is the process's ``jobs.scheduler.RetrainScheduler``
    (the Admin tab's schedule editor is hidden without one)."""
    g = service.settings.generation
    operators = OperatorGate(admin_token, service.signin_backoff)  # the admin API's check, the same back-off

    with gr.Blocks(title="chatloop") as demo:
        user_id = gr.State(None)
        gr.Markdown("# chatloop")
        gr.Markdown(NOTICE, elem_id="notice")

        # ---- Chat ----------------------------------------------------------------------------
        with gr.Tab("Chat", id="chat"):
            turns = gr.State([])  # [{role, content, message_id?, adapter?}]
            conv_id = gr.State(None)
            chatbot = gr.Chatbot(label="Chat", height=420, feedback_options=("Like", "Dislike"),
                                 elem_id="chatbot")
            with gr.Row():
                box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                 scale=6, elem_id="chat-input", max_length=service.settings.limits.max_message_chars)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                stop = gr.Button("Stop", scale=1, elem_id="stop")
            with gr.Row():
                regen = gr.Button("Regenerate", elem_id="regenerate")
                clear = gr.Button("New chat", elem_id="new-chat")
                reason = gr.Dropdown(REASONS, value="", allow_custom_value=True, elem_id="reason",
                                     label="Reason for your next 👍/👎 (optional)")
            status = gr.Markdown("", elem_id="chat-status")
            with gr.Accordion("Generation settings", open=False):
                temperature = gr.Slider(0.0, 2.0, value=g.temperature, step=0.05, label="Temperature")
                max_tokens = gr.Slider(1, g.max_tokens_limit, value=g.max_tokens, step=1, label="Max tokens")

            def _respond(turns_v, conv, uid, temp, maxt, request: gr.Request):
                uid = uid or _new_user()
                context = [{"role": t["role"], "content": t["content"]} for t in turns_v]
                try:
                    service.new_identities.admit(_address(request), uid)
                    service.check_rate("chat", uid)
                    params = service.params(temperature=float(temp), max_tokens=int(maxt))
                    turn = service.chat(context, params, user_id=uid, conversation_id=conv, source="ui")
                except NotFound as exc:
                    raise gr.Error(str(exc))
                except ChatloopError as exc:
                    turns_v = turns_v[:-1] if turns_v and turns_v[-1]["role"] == "user" else turns_v
                    yield turns_v, conv, uid, _display(turns_v), f"⚠️ {exc}"
                    return
                reply = {"role": "assistant", "content": "", "message_id": turn.message_id}
                shown = turns_v + [reply]
                for piece in turn:
                    reply["content"] += piece
                    yield shown, turn.conversation_id, uid, _display(shown), ""
                c = turn.completion
                reply["content"], reply["adapter"] = c.text, c.adapter_version
                yield shown, turn.conversation_id, uid, _display(shown), f"model version: {c.adapter_version}"

            def _add_user(text, turns_v):
                text = (text or "").strip()
                if not text:
                    raise gr.Error("Type a message first.")
                turns_v = turns_v + [{"role": "user", "content": text}]
                return "", turns_v, _display(turns_v)

            outputs = [turns, conv_id, user_id, chatbot, status]
            ins = [turns, conv_id, user_id, temperature, max_tokens]
            ev1 = box.submit(_add_user, [box, turns], [box, turns, chatbot]).then(_respond, ins, outputs)
            ev2 = send.click(_add_user, [box, turns], [box, turns, chatbot]).then(_respond, ins, outputs)

            def _drop_last_reply(turns_v):
                if not turns_v or turns_v[-1]["role"] != "assistant":
                    raise gr.Error("There is no reply to regenerate.")
                turns_v = turns_v[:-1]
                return turns_v, _display(turns_v)

            ev3 = regen.click(_drop_last_reply, [turns], [turns, chatbot]).then(_respond, ins, outputs)
            stop.click(None, None, None, cancels=[ev1, ev2, ev3])
            clear.click(lambda: ([], None, [], ""), None, [turns, conv_id, chatbot, status])

            def _like(turns_v, uid, why, data: gr.LikeData):
                idx = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
                if not isinstance(idx, int) or not 0 <= idx < len(turns_v) or "message_id" not in turns_v[idx]:
                    raise gr.Error("That message cannot be rated.")
                if data.liked is None or data.liked == "":
                    return "Rating removed from view (your earlier rating stays until you rate again).", gr.skip()
                rating = 1 if data.liked is True or data.liked == "Like" else -1
                try:
                    service.check_rate("feedback", uid)
                    service.feedback(turns_v[idx]["message_id"], rating, uid, reason=why or None)
                except ChatloopError as exc:
                    raise gr.Error(str(exc))
                # the reason was for this rating only: clear it for the next one
                return f"Thanks! Recorded {'👍' if rating > 0 else '👎'}" + (f" ({why})" if why else "") + ".", ""

            chatbot.like(_like, [turns, user_id, reason], [status, reason])

        # ---- Compare -------------------------------------------------------------------------
        with gr.Tab("Compare", id="compare"):
            gr.Markdown("Ask once, get two answers, pick the better one. Which model wrote which "
                        "answer is hidden.")
            pair = gr.State(None)  # {"a": msg_id, "b": msg_id}
            cprompt = gr.Textbox(label="Your message", elem_id="compare-input")
            ask = gr.Button("Get two answers", variant="primary", elem_id="compare-ask")
            with gr.Row():
                out_a = gr.Textbox(label="Answer A", lines=8, interactive=False, elem_id="answer-a")
                out_b = gr.Textbox(label="Answer B", lines=8, interactive=False, elem_id="answer-b")
            with gr.Row():
                btns = {c: gr.Button(label, elem_id=f"choose-{c}", interactive=False)
                        for c, label in (("a", "A is better"), ("b", "B is better"),
                                         ("tie", "Tie"), ("both_bad", "Both are bad"))}
            cstatus = gr.Markdown("", elem_id="compare-status")

            def _sides() -> list[str | None]:
                """The active version and the candidate an operator put into live comparison, in
                random order (two samples of the active version when there is none)."""
                sides = [None, service.live_comparison()]  # None = the active version
                random.shuffle(sides)
                return sides

            def _ask(text, uid, request: gr.Request):
                uid = uid or _new_user()
                text = (text or "").strip()
                disabled = [gr.update(interactive=False)] * 4
                if not text:
                    raise gr.Error("Type a message first.")
                context = [{"role": "user", "content": text}]
                answers, ids, conv = ["", ""], [None, None], None
                try:
                    service.new_identities.admit(_address(request), uid)
                    service.check_rate("chat", uid)
                    for i, adapter in enumerate(_sides()):
                        turn = service.chat(context, service.params(), user_id=uid, conversation_id=conv,
                                            source="compare", adapter=adapter)
                        conv = turn.conversation_id
                        for piece in turn:
                            answers[i] += piece
                            yield answers[0], answers[1], None, uid, "", *disabled
                        answers[i] = turn.completion.text
                        ids[i] = turn.message_id
                except ChatloopError as exc:
                    yield answers[0], answers[1], None, uid, f"⚠️ {exc}", *disabled
                    return
                enabled = [gr.update(interactive=True)] * 4
                yield answers[0], answers[1], {"a": ids[0], "b": ids[1]}, uid, "Which answer is better?", *enabled

            ask.click(_ask, [cprompt, user_id], [out_a, out_b, pair, user_id, cstatus, *btns.values()])

            def _choose(choice):
                def handler(pair_v, uid):
                    if not pair_v:
                        raise gr.Error("Ask for two answers first.")
                    try:
                        service.check_rate("feedback", uid)
                        service.compare(pair_v["a"], pair_v["b"], choice, uid)
                    except ChatloopError as exc:
                        raise gr.Error(str(exc))
                    label = {"a": "A is better", "b": "B is better", "tie": "a tie", "both_bad": "both are bad"}[choice]
                    return f"Thanks! Recorded: {label}.", *[gr.update(interactive=False)] * 4
                return handler

            for c, b in btns.items():
                b.click(_choose(c), [pair, user_id], [cstatus, *btns.values()])

        # ---- Admin ---------------------------------------------------------------------------
        with gr.Tab("Admin", id="admin"):
            signed_in = gr.State(False)
            with gr.Row(visible=True) as login_row:
                token = gr.Textbox(label="Operator token", type="password", elem_id="admin-token")
                login = gr.Button("Sign in", elem_id="admin-login")
            login_msg = gr.Markdown("")
            with gr.Column(visible=False) as panel:
                status_md = gr.Markdown("", elem_id="admin-status")
                with gr.Row():
                    algo = gr.Dropdown(list(ALGORITHMS), value=Algorithm.DPO.value, label="Algorithm")
                    retrain_btn = gr.Button("Retrain now", variant="primary", elem_id="admin-retrain")
                    cancel_btn = gr.Button("Cancel cycle", elem_id="admin-cancel")
                cycle_md = gr.Markdown("", elem_id="admin-cycle")
                runs_df = gr.Dataframe(label="Training runs", interactive=False, elem_id="admin-runs")
                curve = gr.Plot(label="Latest run: loss and reward margin", elem_id="admin-curve")
                adapters_df = gr.Dataframe(label="Adapters", interactive=False, elem_id="admin-adapters")
                with gr.Row():
                    version_box = gr.Textbox(label="Version to activate (e.g. v2, or base)", elem_id="admin-version")
                    activate_btn = gr.Button("Activate", elem_id="admin-activate")
                    rollback_btn = gr.Button("Roll back", elem_id="admin-rollback")
                with gr.Row():
                    override_run = gr.Number(label="Rejected run to promote anyway", precision=0, value=None,
                                             elem_id="admin-override-run")
                    override_reason = gr.Textbox(label="Why (recorded)", elem_id="admin-override-reason")
                    override_btn = gr.Button("Override the gate", variant="stop", elem_id="admin-override")
                action_md = gr.Markdown("", elem_id="admin-action")
                with gr.Accordion("Retraining schedules", open=False, visible=schedules is not None):
                    jobs_df = gr.Dataframe(label="Schedules", interactive=False, elem_id="admin-jobs")
                    with gr.Row():
                        job_kind = gr.Dropdown(["cron", "interval", "feedback"], value="feedback", label="Trigger",
                                               elem_id="admin-job-kind")
                        job_spec = gr.Textbox(label="crontab (UTC) | minutes | new feedback events", value="50",
                                              elem_id="admin-job-spec")
                        job_algo = gr.Dropdown(list(ALGORITHMS), value=Algorithm.DPO.value, label="Algorithm")
                        job_add = gr.Button("Add schedule", elem_id="admin-job-add")
                    with gr.Row():
                        job_id = gr.Number(label="Schedule id", precision=0, value=None, elem_id="admin-job-id")
                        job_run = gr.Button("Run now", elem_id="admin-job-run")
                        job_remove = gr.Button("Remove", variant="stop", elem_id="admin-job-remove")
                    jobs_md = gr.Markdown("", elem_id="admin-jobs-msg")
                with gr.Accordion("Live comparison and ratings", open=False):
                    with gr.Row():
                        live_version = gr.Textbox(label="Candidate for the Compare tab (e.g. v3)",
                                                  elem_id="admin-live-version")
                        live_start = gr.Button("Start live comparison", elem_id="admin-live-start")
                        live_stop = gr.Button("Stop", elem_id="admin-live-stop")
                        ratings_btn = gr.Button("Refresh ratings", elem_id="admin-ratings-refresh")
                    live_md = gr.Markdown("", elem_id="admin-live-msg")
                    ratings_df = gr.Dataframe(label="Ratings (Bradley-Terry, 95% bootstrap interval)",
                                              interactive=False, elem_id="admin-ratings")
                    ratings_fig = gr.Plot(label="Ratings over time", elem_id="admin-ratings-plot")
                with gr.Accordion("API keys", open=False):
                    gr.Markdown("A key is its holder's identity on the API (`Authorization: Bearer clk_...`), with "
                                "its own limits and training cap; empty limits keep the service's.")
                    with gr.Row():
                        key_name = gr.Textbox(label="Who the key is for", elem_id="admin-key-name")
                        key_chat = gr.Number(label="Chats a minute", precision=0, value=None)
                        key_fb = gr.Number(label="Ratings a minute", precision=0, value=None)
                        key_pairs = gr.Number(label="Max training items", precision=0, value=None,
                                              elem_id="admin-key-pairs")
                        key_create = gr.Button("Create key", elem_id="admin-key-create")
                    with gr.Row():
                        key_id = gr.Textbox(label="Key id to revoke", elem_id="admin-key-id")
                        key_revoke = gr.Button("Revoke", variant="stop", elem_id="admin-key-revoke")
                    keys_md = gr.Markdown("", elem_id="admin-keys-msg")
                    keys_df = gr.Dataframe(label="Keys", interactive=False, elem_id="admin-keys")
                with gr.Accordion("Feedback browser", open=False):
                    with gr.Row():
                        fb_rating = gr.Dropdown(["all", "up", "down", "A/B"], value="all", label="Kind")
                        fb_version = gr.Textbox(label="Adapter version", elem_id="admin-fb-version")
                        fb_user = gr.Textbox(label="User id")
                        fb_since = gr.Textbox(label="Since (YYYY-MM-DD)")
                        fb_btn = gr.Button("Show", elem_id="admin-fb-show")
                    fb_df = gr.Dataframe(label="Feedback (newest first)", interactive=False, elem_id="admin-fb")
                sql_box = gr.Textbox(label="SQL (read-only)", lines=3,
                                     value="SELECT adapter_version, count(*) AS replies FROM generations GROUP BY 1",
                                     elem_id="admin-sql")
                sql_btn = gr.Button("Run query", elem_id="admin-sql-run")
                sql_df = gr.Dataframe(label="Result", interactive=False, visible=False, elem_id="admin-sql-result")
                sql_csv = gr.File(label="Download CSV", visible=False, elem_id="admin-sql-csv")
                sql_msg = gr.Markdown("")
                timer = gr.Timer(2.0, active=False)

            def _jobs_table():
                jcols = ["id", "kind", "spec", "algo", "source", "next_run", "events_until_next",
                         "last_fired_at", "last_run_id"]
                rows = [[j.get(c) for c in jcols] for j in (schedules.list() if schedules else [])]
                return {"headers": jcols, "data": rows or [[None] * len(jcols)]}

            def _refresh(ok):
                if not ok:
                    return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                st = service.status()
                cyc = st.pop("cycle")
                status_text = " · ".join(f"**{k}**: {v}" for k, v in st.items())
                if cyc:
                    phase = f" ({cyc['phase']})" if cyc.get("phase") and cyc["phase"] != cyc["algo"] else ""
                    cycle_text = (f"Cycle run {cyc['run_id']} ({cyc['algo']}): {cyc['stage']}{phase}, step "
                                  f"{cyc['step']}/{cyc['total'] or '?'}"
                                  + (f", loss {cyc['last'].get('loss', 0):.4f}" if cyc["last"] else ""))
                else:
                    cycle_text = "No cycle running."
                runs = service.runs(20)
                cols = ["id", "algo", "trigger", "status", "started_at", "parent_version",
                        "candidate_version", "n_pairs", "verdict", "override", "error"]
                runs_rows = [[r.get(c) for c in cols] for r in runs]
                ad = service.adapters()
                acols = ["version", "active", "parent", "algo", "run_id", "train_pairs", "verdict"]
                ad_rows = [[a.get(c) for c in acols] for a in ad]
                return (status_text, cycle_text, {"headers": cols, "data": runs_rows or [[None] * len(cols)]},
                        {"headers": acols, "data": ad_rows or [[None] * len(acols)]}, _curve(runs, cyc),
                        _jobs_table())

            def _curve(runs, cyc):
                """Per-step loss and reward margin of the running cycle, else of the latest finished one."""
                if cyc and cyc.get("history"):  # the current phase's steps (each phase counts its own)
                    history = [h for h in cyc["history"] if h.get("phase", "") == cyc.get("phase", "")]
                    title = f"run {cyc['run_id']} (running{', ' + cyc['phase'] if cyc.get('phase') else ''})"
                else:
                    done = next((r for r in runs if r["status"] in (RunStatus.PROMOTED, RunStatus.REJECTED)), None)
                    history = ((service.run(done["id"]).get("metrics") or {}).get("history", [])
                               if done else [])
                    title = f"run {done['id']} ({done['status']})" if done else "no finished run yet"
                return training_curve(history, title)

            refresh_outs = [status_md, cycle_md, runs_df, adapters_df, curve, jobs_df]

            def _login(tok, request: gr.Request):
                try:
                    ok, wait = operators.matches(tok or "", _address(request)), ""
                except RateLimited as exc:
                    ok, wait = False, str(exc)
                if not ok:
                    msg = ("Admin is disabled: no operator token is configured." if not operators.enabled
                           else wait or "Wrong operator token.")
                    return False, msg, gr.update(visible=False), gr.update(visible=True), gr.Timer(active=False)
                return True, "Signed in.", gr.update(visible=True), gr.update(visible=False), gr.Timer(active=True)

            signin = login.click(_login, [token], [signed_in, login_msg, panel, login_row, timer]).then(
                _refresh, [signed_in], refresh_outs)
            timer.tick(_refresh, [signed_in], refresh_outs)

            def _guard(ok):
                if not ok:
                    raise gr.Error("Sign in as an operator first.")

            def _retrain(ok, algo_v):
                _guard(ok)
                try:
                    run_id = service.retrain(algo_v, trigger="ui")
                except ChatloopError as exc:
                    return f"⚠️ {exc}"
                return f"Started retraining run {run_id}."

            retrain_btn.click(_retrain, [signed_in, algo], [action_md])
            cancel_btn.click(lambda ok: (_guard(ok), "Cancelling…" if service.cancel_retraining()
                                         else "No cycle is running.")[1], [signed_in], [action_md])

            def _activate(ok, v):
                _guard(ok)
                try:
                    prev = service.activate((v or "").strip(), actor="operator", reason="activated in the UI")
                except ChatloopError as exc:
                    return f"⚠️ {exc}"
                return f"Activated {v.strip()} (was {prev})."

            def _rollback(ok):
                _guard(ok)
                try:
                    prev, now_active = service.rollback()
                except ChatloopError as exc:
                    return f"⚠️ {exc}"
                return f"Rolled back from {prev} to {now_active}."

            def _override(ok, run_id, why):
                _guard(ok)
                if run_id is None:
                    return "⚠️ Enter the id of a rejected run."
                try:
                    prev = service.override(int(run_id), why or "", actor="operator (UI)")
                except ChatloopError as exc:
                    return f"⚠️ {exc}"
                return f"Run {int(run_id)} promoted by override (was {prev}); the reason is recorded."

            override_btn.click(_override, [signed_in, override_run, override_reason], [action_md]).then(
                _refresh, [signed_in], refresh_outs)
            activate_btn.click(_activate, [signed_in, version_box], [action_md]).then(_refresh, [signed_in], refresh_outs)
            rollback_btn.click(_rollback, [signed_in], [action_md]).then(_refresh, [signed_in], refresh_outs)

            def _add_job(ok, kind, spec, algo_v):
                _guard(ok)
                try:
                    job = schedules.add(kind, spec, algo_v, created_by="ui")
                except ValueError as exc:
                    return f"⚠️ {exc}", _jobs_table()
                return f"Added schedule {job['id']}: {kind} {spec} → {algo_v}.", _jobs_table()

            def _job_action(action):
                def handler(ok, jid):
                    _guard(ok)
                    if jid is None:
                        return "⚠️ Enter a schedule id first.", _jobs_table()
                    try:
                        if action == "remove":
                            schedules.remove(int(jid))
                            return f"Removed schedule {int(jid)}.", _jobs_table()
                        run_id = schedules.run_now(int(jid))
                        return f"Started retraining run {run_id} for schedule {int(jid)}.", _jobs_table()
                    except ChatloopError as exc:
                        return f"⚠️ {exc}", _jobs_table()
                return handler

            job_add.click(_add_job, [signed_in, job_kind, job_spec, job_algo], [jobs_md, jobs_df])
            job_remove.click(_job_action("remove"), [signed_in, job_id], [jobs_md, jobs_df])
            job_run.click(_job_action("run"), [signed_in, job_id], [jobs_md, jobs_df])

            def _keys_table():
                import pandas as pd

                cols = ["id", "name", "user", "revoked", "chat_per_minute", "feedback_per_minute", "max_pairs",
                        "created_at", "revoked_at"]
                return pd.DataFrame(service.keys.list(), columns=cols)

            def _create_key(ok, name, chat_pm, fb_pm, pairs):
                _guard(ok)

                def whole(v):
                    return None if v is None else int(v)

                try:
                    listing, token = service.keys.create(name, whole(chat_pm), whole(fb_pm), whole(pairs))
                except ChatloopError as exc:
                    return f"⚠️ {exc}", _keys_table()
                return (f"Created key `{listing['id']}` for {listing['name']}. Copy it now, it is not shown again:"
                        f"\n\n`{token}`"), _keys_table()

            def _revoke_key(ok, kid):
                _guard(ok)
                try:
                    service.keys.revoke((kid or "").strip())
                except ChatloopError as exc:
                    return f"⚠️ {exc}", _keys_table()
                return f"Revoked key `{kid.strip()}`.", _keys_table()

            def _show_keys(ok):
                return _keys_table() if ok else None

            signin.then(_show_keys, [signed_in], [keys_df])
            key_create.click(_create_key, [signed_in, key_name, key_chat, key_fb, key_pairs], [keys_md, keys_df])
            key_revoke.click(_revoke_key, [signed_in, key_id], [keys_md, keys_df])

            def _ratings(ok, msg=""):
                _guard(ok)
                from chatloop.ratings import history

                rcols = ["version", "rating", "low", "high", "votes", "wins"]
                rows = [[r[c] if not isinstance(r[c], float) else round(r[c], 1) for c in rcols]
                        for r in service.ratings()]
                live = service.live_comparison()
                note = msg or (f"Live comparison: **{live}** against the active version in the Compare tab."
                               if live else "No live comparison: the Compare tab shows two samples of the active version.")
                return (note, {"headers": rcols, "data": rows or [[None] * len(rcols)]},
                        ratings_plot(history(service.version_votes())))

            def _live(start):
                def handler(ok, v):
                    _guard(ok)
                    try:
                        service.set_live_comparison((v or "").strip() if start else None)
                    except ChatloopError as exc:
                        return _ratings(ok, f"⚠️ {exc}")
                    return _ratings(ok)
                return handler

            ratings_outs = [live_md, ratings_df, ratings_fig]
            ratings_btn.click(_ratings, [signed_in], ratings_outs)
            live_start.click(_live(True), [signed_in, live_version], ratings_outs)
            live_stop.click(_live(False), [signed_in, live_version], ratings_outs)

            def _browse(ok, kind, version, user, since):
                _guard(ok)
                try:
                    found = service.browse_feedback(kind=kind, version=(version or "").strip() or None,
                                                    user=(user or "").strip() or None,
                                                    since=(since or "").strip() or None)
                except ChatloopError as exc:
                    raise gr.Error(str(exc))
                fcols = ["kind", "id", "created_at", "user_id", "rating", "choice", "reason", "adapter_version",
                         "prompt", "reply"]
                rows = [[str(r.get(c)) if c == "created_at" else r.get(c) for c in fcols] for r in found]
                return {"headers": fcols, "data": rows or [[None] * len(fcols)]}

            fb_btn.click(_browse, [signed_in, fb_rating, fb_version, fb_user, fb_since], [fb_df])

            def _sql(ok, q):
                _guard(ok)
                try:
                    res = service.sql(q)
                except ChatloopError as exc:
                    return gr.update(visible=False), f"⚠️ {exc}", gr.update(visible=False)
                # the service's JSON values; a LIST or STRUCT shows as its JSON text in a cell
                rows = [[json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for v in r]
                        for r in res["rows"]]
                note = f"{len(rows)} row(s)" + (" (truncated)" if res["truncated"] else "")
                table = {"headers": res["columns"], "data": rows or [[None] * len(res["columns"])]}
                fd, path = tempfile.mkstemp(prefix="chatloop-query-", suffix=".csv")
                with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
                    writer = csv.writer(fh)
                    writer.writerow(res["columns"])
                    writer.writerows(rows)
                return gr.update(value=table, visible=True), note, gr.update(value=path, visible=True)

            sql_btn.click(_sql, [signed_in, sql_box], [sql_df, sql_msg, sql_csv])

        # the same browser is the same user across reloads: its identity cookie names it
        def _user(request: gr.Request) -> str:
            return _browser_user(request, service.signer)

        demo.load(_user, None, [user_id])

    calm_idle_queue(demo)
    return demo


# Gradio's event queue polls for work every 1 ms and for progress every 10 ms, also when idle:
# about 7 % of a core here. At 10 ms and 50 ms an idle service uses about 2.4 %, and a queued
# event waits at most 10 ms more. (A training step beside an idle service did not get measurably
# faster: the A/B differences were within this machine's noise of about 15 %.)
IDLE_POLL_S, PROGRESS_POLL_S = 0.01, 0.05


def calm_idle_queue(demo: gr.Blocks) -> None:
    """Slow the idle polling of ``demo``'s event queue (private Gradio attributes, so only those
    that exist are set; a Gradio without them keeps its own timing)."""
    q = getattr(demo, "_queue", None)
    if q is None:
        return
    if hasattr(q, "sleep_when_free"):
        q.sleep_when_free = max(q.sleep_when_free, IDLE_POLL_S)
    if hasattr(q, "progress_update_sleep_when_free"):
        q.progress_update_sleep_when_free = max(q.progress_update_sleep_when_free, PROGRESS_POLL_S)
