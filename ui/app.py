"""The Gradio UI: Chat (your chats, stream, retry, edit, thumbs with reasons), Compare (A/B) and Admin.

Owns: assembling the Blocks from one module per tab (``ui.chat``, ``ui.compare``, ``ui.admin``)
and the event queue's idle polling; every tab calls ``chatloop.service.Service`` only.

Invariants:
- Each browser is one anonymous user, named by its signed identity cookie; every reply, thumb
  and A/B choice carries it (``ui.common``).
- The Admin tab shows nothing until the operator token is entered.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from chatloop.service import Service
from ui.admin import admin_tab
from ui.chat import chat_tab
from ui.common import browser_user
from ui.compare import compare_tab

NOTICE = ("**Your ratings improve this bot.** Replies you rate (👍/👎, with an optional reason) and "
          "A/B choices are logged and used to retrain the model. Do not share personal information.")


def build_ui(service: Service, admin_token: str, schedules: Any = None) -> gr.Blocks:
    """The Gradio app. ``schedules`` is the process's ``jobs.scheduler.RetrainScheduler``
    (the Admin tab's Schedules sub-tab is hidden without one)."""
    with gr.Blocks(title="chatloop") as demo:
        user_id = gr.State(None)
        gr.Markdown("# chatloop")
        gr.Markdown(NOTICE, elem_id="notice")
        with gr.Tab("Chat", id="chat"):
            fill_sidebar, sidebar_in, sidebar_out = chat_tab(service, user_id)
        with gr.Tab("Compare", id="compare"):
            compare_tab(service, user_id)
        with gr.Tab("Admin", id="admin"):
            admin_tab(service, admin_token, schedules)
        def user_of(request: gr.Request) -> str:  # the same browser is the same user across reloads
            return browser_user(request, service.cookie_user)

        demo.load(user_of, None, [user_id]).then(fill_sidebar, sidebar_in, sidebar_out)
    calm_idle_queue(demo)
    return demo


# Gradio's event queue polls for work every 1 ms and for progress every 10 ms, also when idle;
# these slower polls cut an idle service's CPU use to about a third of that and add at most
# 10 ms to a queued event (docs/LOG.md, 2026-11-23).
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
