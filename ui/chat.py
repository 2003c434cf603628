"""The Chat tab: the user's conversations in a sidebar, streamed replies, stop, retry (the replies
to one message shown as "1 / 2"), edit a sent message and resend, 👍/👎 with reason chips and a
comment after a thumb, markdown with copy buttons.

Invariants:
- The conversation shown is kept in session state as turns (``chatloop.conversations``' shape);
  the Chatbot only displays them (``ui.chat_view``), so a thumb always lands on the stored message
  id of the reply the user saw.
- Everything shown comes back after a reload: the sidebar lists the user's conversations from
  the log, and opening one shows its current branch, its alternatives and the user's thumbs.
- A retry adds an alternative to the same context; an edit starts a new branch; neither removes
  anything from the log. Deleting a chat only hides it (it never trains again).
- A refused message is taken back from view and put back into the input box; every event reports
  its outcome in the status line.
- The endpoints ``/send``, ``/retry``, ``/rate``, ``/new_chat``, ``/open_chat`` and
  ``/delete_chat`` work from ``gradio_client`` (a session keeps its conversation).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from chatloop.conversations import assistant_turn, pick, set_rating, with_alternative
from chatloop.errors import ChatloopError
from chatloop.service import Service
from ui.chat_view import (alternatives_label, conversation_choices, excerpt, feedback_values, messages,
                          turn_index)
from ui.common import address, new_user

REASONS = {"down": ["wrong", "unhelpful", "off topic", "repetitive", "too long", "unsafe or rude", "other"],
           "up": ["helpful", "accurate", "well written", "concise", "other"]}
ALL_REASONS = list(dict.fromkeys(REASONS["down"] + REASONS["up"]))  # what /rate accepts
RATINGS = {"up": 1, "down": -1}
HIDDEN_FROM_CHAT = ("compare",)  # the Compare tab's A/B sessions are not chats to continue


def chat_tab(service: Service, user_id: gr.State) -> tuple[Any, list, list]:
    """Build the tab; returns (fn, inputs, outputs) that fill the sidebar for the page's user
    (the app runs it once the user is known)."""
    g, lim = service.settings.generation, service.settings.limits
    turns = gr.State([])
    conv_id = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1, min_width=220, elem_id="chat-sidebar"):
            new_chat = gr.Button("+ New chat", elem_id="new-chat")
            chats = gr.Radio([], label="Your chats", elem_id="conversations")
            delete = gr.Button("Delete this chat", size="sm", variant="stop", elem_id="delete-chat")
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(label="Chat", height=440, elem_id="chatbot", editable="user",
                                 feedback_options=("Like", "Dislike"), buttons=["copy", "copy_all"],
                                 render_markdown=True)
            with gr.Row(visible=False, elem_id="alternatives") as alt_row:
                prev_alt = gr.Button("◀", size="sm", scale=0, min_width=40, elem_id="prev-reply")
                alt_label = gr.Markdown("", elem_id="alternatives-label")
                next_alt = gr.Button("▶", size="sm", scale=0, min_width=40, elem_id="next-reply")
            with gr.Column(visible=False, elem_id="reason-panel") as panel:
                panel_title = gr.Markdown("", elem_id="reason-title")
                chips = gr.Radio(ALL_REASONS, label="Why? (optional)", elem_id="reason-chips")
                comment = gr.Textbox(label="Anything else? (optional)", lines=1, max_length=lim.max_comment_chars,
                                     elem_id="reason-comment")
                with gr.Row():
                    send_reason = gr.Button("Send feedback", variant="primary", size="sm", elem_id="reason-send")
                    skip_reason = gr.Button("Skip", size="sm", elem_id="reason-skip")
                rate_row = gr.Number(visible=False, precision=0, label="message index")  # which reply
                rate_value = gr.Textbox(visible=False, label="rating (up or down)")
            with gr.Row():
                box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 elem_id="chat-input", max_length=lim.max_message_chars)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                stop = gr.Button("Stop", scale=1, elem_id="stop")
            regen = gr.Button("Retry: another reply to your last message", size="sm", elem_id="regenerate")
            status = gr.Markdown("", elem_id="chat-status")
            with gr.Accordion("Generation settings", open=False):
                temperature = gr.Slider(0.0, 2.0, value=g.temperature, step=0.05, label="Temperature")
                max_tokens = gr.Slider(1, g.max_tokens_limit, value=g.max_tokens, step=1, label="Max tokens")

    # ---- rendering: every event that changes the conversation renders all of it ---------------
    view_out = [turns, conv_id, user_id, chatbot, status, alt_row, alt_label, chats, panel]

    def listing(uid: str | None, selected: str | None) -> Any:
        if not uid:
            return gr.update(choices=[], value=None)
        return gr.update(choices=conversation_choices(service.conversations(uid, HIDDEN_FROM_CHAT)), value=selected)

    def view(turns_v, conv, uid, note="", chats_update: Any = None) -> tuple:
        label = alternatives_label(turns_v)
        return (turns_v, conv, uid, gr.update(value=messages(turns_v), feedback_value=feedback_values(turns_v)),
                note, gr.update(visible=label is not None), label or "",
                gr.skip() if chats_update is None else chats_update, gr.update(visible=False))

    def stream(turns_v, conv, uid, temp, maxt, request, shown_before, retried=None):
        """Reply to ``turns_v`` (ending with the user's message), streaming every piece; a retry
        passes the turn it retries, whose replies the new one joins as an alternative. A refused
        request shows ``shown_before`` again (the conversation as it was before the event)."""
        uid = uid or new_user()
        yield view(turns_v, conv, uid, "Writing a reply…")  # an edit's later turns go at once
        context = [{"role": t["role"], "content": t["content"]} for t in turns_v]
        try:
            service.admit_identity(address(request), uid)
            service.check_rate("chat", uid)
            params = service.params(temperature=float(temp), max_tokens=int(maxt))
            turn = service.chat(context, params, user_id=uid, conversation_id=conv, source="ui")
        except ChatloopError as exc:
            yield view(shown_before, conv, uid, f"⚠️ {exc}")
            return
        earlier = retried.get("alternatives", []) if retried else []
        reply = {"message_id": turn.message_id, "content": "", "adapter": None,
                 "rating": None, "reason": None, "comment": None}
        for piece in turn:
            reply["content"] += piece
            yield view(turns_v + [assistant_turn(earlier + [dict(reply)])], turn.conversation_id, uid)
        c = turn.completion
        reply.update(content=c.text, adapter=c.adapter_version)
        final = turns_v + [with_alternative(retried or {"alternatives": []}, reply)]
        yield view(final, turn.conversation_id, uid, f"model version: {c.adapter_version}",
                   listing(uid, turn.conversation_id))

    # ---- sending, retrying, editing -----------------------------------------------------------
    ins = [turns, conv_id, user_id, temperature, max_tokens]

    def send_message(text, turns_v, conv, uid, temp, maxt, request: gr.Request):
        text = (text or "").strip()
        if not text:
            raise gr.Error("Type a message first.")
        for v in stream(turns_v + [{"role": "user", "content": text}], conv, uid, temp, maxt, request, turns_v):
            refused = v[4].startswith("⚠️")
            yield (text if refused else "", *v)  # a refused message goes back into the box

    def retry(turns_v, conv, uid, temp, maxt, request: gr.Request):
        if not turns_v or turns_v[-1]["role"] != "assistant":
            raise gr.Error("There is no reply to retry.")
        yield from stream(turns_v[:-1], conv, uid, temp, maxt, request, turns_v, retried=turns_v[-1])

    def edit(turns_v, conv, uid, temp, maxt, data: gr.EditData, request: gr.Request):
        try:
            i = turn_index(turns_v, data.index)
        except ValueError as exc:
            raise gr.Error(str(exc))
        text = (data.value if isinstance(data.value, str) else str(data.value or "")).strip()
        if turns_v[i]["role"] != "user" or not text:
            yield view(turns_v, conv, uid, "⚠️ Only your own messages can be edited, and not to nothing.")
            return
        yield from stream(turns_v[:i] + [{"role": "user", "content": text}], conv, uid, temp, maxt, request, turns_v)

    ev_send = box.submit(send_message, [box, *ins], [box, *view_out], api_name="send")
    ev_click = send.click(send_message, [box, *ins], [box, *view_out], api_visibility="private")
    ev_regen = regen.click(retry, ins, view_out, api_name="retry")
    ev_retry = chatbot.retry(retry, ins, view_out, api_visibility="private")
    ev_edit = chatbot.edit(edit, ins, view_out, api_visibility="private")
    stop.click(None, None, None, cancels=[ev_send, ev_click, ev_regen, ev_retry, ev_edit])

    def show_alternative(step):
        def handler(turns_v, conv, uid):
            if not turns_v or not alternatives_label(turns_v):
                raise gr.Error("Your last message has only one reply.")
            last = turns_v[-1]
            turns_v = turns_v[:-1] + [pick(last, (last["pick"] + step) % len(last["alternatives"]))]
            return view(turns_v, conv, uid, "Rate each reply: two replies rated 👍 and 👎 teach the model "
                                            "which one is better.")
        return handler

    prev_alt.click(show_alternative(-1), [turns, conv_id, user_id], view_out, api_visibility="private")
    next_alt.click(show_alternative(1), [turns, conv_id, user_id], view_out, api_visibility="private")

    # ---- the user's chats ----------------------------------------------------------------------
    def open_chat(cid, uid):
        if not cid:
            raise gr.Error("Pick a chat from the list.")
        try:
            turns_v = service.conversation(cid, uid)
        except ChatloopError as exc:
            raise gr.Error(str(exc))
        return view(turns_v, cid, uid, "Continue this chat below.")

    def start_new(uid):
        return view([], None, uid, "", gr.update(value=None))

    def delete_chat(conv, uid):
        if not conv:
            raise gr.Error("Open a chat first: there is nothing to delete.")
        try:
            service.delete_conversation(conv, uid)
        except ChatloopError as exc:
            raise gr.Error(str(exc))
        return view([], None, uid, "Chat deleted: it is gone from your list and will not be used for training.",
                    listing(uid, None))

    chats.input(open_chat, [chats, user_id], view_out, api_name="open_chat")
    new_chat.click(start_new, [user_id], view_out, api_name="new_chat")
    chatbot.clear(start_new, [user_id], view_out, api_visibility="private")  # its own 🗑 button
    delete.click(delete_chat, [conv_id, user_id], view_out, api_name="delete_chat")

    # ---- rating: a thumb is stored at once; then that rating's reason chips and a comment -----
    rating_out = [turns, status, panel, panel_title, rate_row, rate_value, chips, comment]

    def like(turns_v, uid, data: gr.LikeData):
        try:
            i = turn_index(turns_v, data.index)
        except ValueError as exc:
            raise gr.Error(str(exc))
        if "message_id" not in turns_v[i]:
            raise gr.Error("That message cannot be rated.")
        if data.liked is None or data.liked == "":
            return (turns_v, "Rating removed from view (your earlier rating stays until you rate again).",
                    *[gr.skip()] * 6)
        rating = 1 if data.liked is True or data.liked == "Like" else -1
        try:
            service.check_rate("feedback", uid)
            service.feedback(turns_v[i]["message_id"], rating, uid)
        except ChatloopError as exc:
            raise gr.Error(str(exc))
        turns_v = turns_v[:i] + [set_rating(turns_v[i], rating)] + turns_v[i + 1:]
        row = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        word, thumb = ("up", "👍") if rating > 0 else ("down", "👎")
        question = "What was good about it?" if rating > 0 else "What was wrong with it?"
        return (turns_v, f"Thanks! Recorded {thumb}. Say why below, if you like.",
                gr.update(visible=True), f"{thumb} for “{excerpt(turns_v[i]['content'])}”",
                row, word, gr.update(choices=REASONS[word], value=None, label=f"{question} (optional)"), "")

    chatbot.like(like, [turns, user_id], rating_out, api_visibility="private")

    def rate(row, rating, reason, note, turns_v, uid):
        """Rate the reply in chatbot row ``row`` 'up' or 'down', with an optional reason and comment."""
        try:
            i = turn_index(turns_v, int(row) if row is not None else None)
        except (ValueError, TypeError, OverflowError):  # not a row, NaN, infinity
            raise gr.Error("That message is not in this conversation.")
        if "message_id" not in turns_v[i] or rating not in RATINGS:
            raise gr.Error("That message cannot be rated (rating must be 'up' or 'down').")
        reason, note = (reason or "").strip() or None, (note or "").strip() or None
        try:
            service.check_rate("feedback", uid)
            service.feedback(turns_v[i]["message_id"], RATINGS[rating], uid, reason=reason, comment=note)
        except ChatloopError as exc:
            raise gr.Error(str(exc))
        turns_v = turns_v[:i] + [set_rating(turns_v[i], RATINGS[rating], reason, note)] + turns_v[i + 1:]
        said = "".join([f" ({reason})" if reason else "", " with your comment" if note else ""])
        return (turns_v, f"Thanks! Recorded {'👍' if rating == 'up' else '👎'}{said}.", gr.update(visible=False),
                None, "", gr.update(value=messages(turns_v), feedback_value=feedback_values(turns_v)))

    send_reason.click(rate, [rate_row, rate_value, chips, comment, turns, user_id],
                      [turns, status, panel, chips, comment, chatbot], api_name="rate")
    skip_reason.click(lambda: gr.update(visible=False), None, [panel], api_visibility="private")
    return listing, [user_id, conv_id], [chats]
