"""The Compare tab: one message, two answers side by side, and the user picks the better one.

Invariants: the two answers are shown in random order (blind): the active version and the
candidate an operator put into live comparison, or two samples of the active version when there
is none; the choice is stored by message id.
"""

from __future__ import annotations

import random

import gradio as gr

from chatloop.errors import ChatloopError
from chatloop.service import Service
from ui.common import address, new_user

CHOICES = (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("both_bad", "Both are bad"))
RECORDED = {"a": "A is better", "b": "B is better", "tie": "a tie", "both_bad": "both are bad"}


def compare_tab(service: Service, user_id: gr.State) -> None:
    gr.Markdown("Ask once, get two answers, pick the better one. Which model wrote which answer is hidden.")
    pair = gr.State(None)  # {"a": msg_id, "b": msg_id}
    cprompt = gr.Textbox(label="Your message", elem_id="compare-input")
    ask = gr.Button("Get two answers", variant="primary", elem_id="compare-ask")
    with gr.Row():
        out_a = gr.Textbox(label="Answer A", lines=8, interactive=False, elem_id="answer-a")
        out_b = gr.Textbox(label="Answer B", lines=8, interactive=False, elem_id="answer-b")
    with gr.Row():
        btns = {c: gr.Button(label, elem_id=f"choose-{c}", interactive=False) for c, label in CHOICES}
    cstatus = gr.Markdown("", elem_id="compare-status")

    def sides() -> list[str | None]:
        both = [None, service.live_comparison()]  # None = the active version
        random.shuffle(both)
        return both

    def ask_both(text, uid, request: gr.Request):
        uid = uid or new_user()
        text = (text or "").strip()
        disabled = [gr.update(interactive=False)] * 4
        if not text:
            raise gr.Error("Type a message first.")
        context = [{"role": "user", "content": text}]
        answers, ids, conv = ["", ""], [None, None], None
        try:
            service.admit_identity(address(request), uid)
            service.check_rate("chat", uid)
            for i, adapter in enumerate(sides()):
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

    ask.click(ask_both, [cprompt, user_id], [out_a, out_b, pair, user_id, cstatus, *btns.values()])

    def choose(choice):
        def handler(pair_v, uid):
            if not pair_v:
                raise gr.Error("Ask for two answers first.")
            try:
                service.check_rate("feedback", uid)
                service.compare(pair_v["a"], pair_v["b"], choice, uid)
            except ChatloopError as exc:
                raise gr.Error(str(exc))
            return f"Thanks! Recorded: {RECORDED[choice]}.", *[gr.update(interactive=False)] * 4
        return handler

    for c, b in btns.items():
        b.click(choose(c), [pair, user_id], [cstatus, *btns.values()])
