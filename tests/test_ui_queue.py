"""The Gradio event queue of the served UI polls calmly when idle (see ``ui.app.calm_idle_queue``)."""

from __future__ import annotations

import gradio as gr

from ui.app import IDLE_POLL_S, PROGRESS_POLL_S, calm_idle_queue


def test_idle_polling_is_slowed_and_never_sped_up():
    with gr.Blocks() as demo:
        gr.Markdown("x")
    q = demo._queue
    # the private attributes this relies on: a Gradio that renames them fails here, not silently
    assert q.sleep_when_free < IDLE_POLL_S and q.progress_update_sleep_when_free < PROGRESS_POLL_S
    calm_idle_queue(demo)
    assert (q.sleep_when_free, q.progress_update_sleep_when_free) == (IDLE_POLL_S, PROGRESS_POLL_S)
    q.sleep_when_free = 0.5  # slower than ours already: left alone
    calm_idle_queue(demo)
    assert q.sleep_when_free == 0.5
