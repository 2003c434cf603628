"""The Chat tab: stream a reply, stop it, regenerate it, rate it with 👍/👎 and a reason.

Invariants: the conversation shown is kept in session state as plain {role, content} turns with
the stored message id of every assistant reply; the Chatbot component only displays it, so a
thumb always lands on the message id the user saw. A refused message is taken back from view.
"""

from __future__ import annotations

import gradio as gr

from chatloop.errors import ChatloopError
from chatloop.service import Service
from chatloop.store import NotFound
from ui.common import address, display, new_user

REASONS = ["", "helpful", "accurate", "well written", "wrong", "unhelpful", "repetitive",
           "too long", "unsafe or rude"]


def chat_tab(service: Service, user_id: gr.State) -> None:
    g = service.settings.generation
    turns = gr.State([])  # [{role, content, message_id?, adapter?}]
    conv_id = gr.State(None)
    chatbot = gr.Chatbot(label="Chat", height=420, feedback_options=("Like", "Dislike"), elem_id="chatbot")
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

    def respond(turns_v, conv, uid, temp, maxt, request: gr.Request):
        uid = uid or new_user()
        context = [{"role": t["role"], "content": t["content"]} for t in turns_v]
        try:
            service.admit_identity(address(request), uid)
            service.check_rate("chat", uid)
            params = service.params(temperature=float(temp), max_tokens=int(maxt))
            turn = service.chat(context, params, user_id=uid, conversation_id=conv, source="ui")
        except NotFound as exc:
            raise gr.Error(str(exc))
        except ChatloopError as exc:
            turns_v = turns_v[:-1] if turns_v and turns_v[-1]["role"] == "user" else turns_v
            yield turns_v, conv, uid, display(turns_v), f"⚠️ {exc}"
            return
        reply = {"role": "assistant", "content": "", "message_id": turn.message_id}
        shown = turns_v + [reply]
        for piece in turn:
            reply["content"] += piece
            yield shown, turn.conversation_id, uid, display(shown), ""
        c = turn.completion
        reply["content"], reply["adapter"] = c.text, c.adapter_version
        yield shown, turn.conversation_id, uid, display(shown), f"model version: {c.adapter_version}"

    def add_user(text, turns_v):
        text = (text or "").strip()
        if not text:
            raise gr.Error("Type a message first.")
        turns_v = turns_v + [{"role": "user", "content": text}]
        return "", turns_v, display(turns_v)

    outputs = [turns, conv_id, user_id, chatbot, status]
    ins = [turns, conv_id, user_id, temperature, max_tokens]
    ev1 = box.submit(add_user, [box, turns], [box, turns, chatbot]).then(respond, ins, outputs)
    ev2 = send.click(add_user, [box, turns], [box, turns, chatbot]).then(respond, ins, outputs)

    def drop_last_reply(turns_v):
        if not turns_v or turns_v[-1]["role"] != "assistant":
            raise gr.Error("There is no reply to regenerate.")
        turns_v = turns_v[:-1]
        return turns_v, display(turns_v)

    ev3 = regen.click(drop_last_reply, [turns], [turns, chatbot]).then(respond, ins, outputs)
    stop.click(None, None, None, cancels=[ev1, ev2, ev3])
    clear.click(lambda: ([], None, [], ""), None, [turns, conv_id, chatbot, status])

    def like(turns_v, uid, why, data: gr.LikeData):
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

    chatbot.like(like, [turns, user_id, reason], [status, reason])
