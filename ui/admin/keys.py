"""Admin › API keys: issue a key (shown once) with its own limits and training cap, revoke one."""

from __future__ import annotations

import gradio as gr

from chatloop.errors import ChatloopError
from ui.admin.context import AdminContext, Section

COLUMNS = ["id", "name", "user", "revoked", "chat_per_minute", "feedback_per_minute", "max_pairs", "created_at",
           "revoked_at"]


def keys(ctx: AdminContext) -> Section:
    service = ctx.service
    gr.Markdown("A key is its holder's identity on the API (`Authorization: Bearer clk_...`), with its own limits "
                "and training cap; empty limits keep the service's, 0 means none.")
    with gr.Row():
        name = gr.Textbox(label="Who the key is for", elem_id="admin-key-name")
        # text, not gr.Number: an empty Number shows and sends 0, which would mean "no limit"
        chat_pm = gr.Textbox(label="Chats a minute", placeholder="the service's", elem_id="admin-key-chat")
        fb_pm = gr.Textbox(label="Ratings a minute", placeholder="the service's", elem_id="admin-key-feedback")
        pairs = gr.Textbox(label="Max training items", placeholder="the service's", elem_id="admin-key-pairs")
        create = gr.Button("Create key", elem_id="admin-key-create")
    with gr.Row():
        key_id = gr.Textbox(label="Key id to revoke", elem_id="admin-key-id")
        revoke = gr.Button("Revoke", variant="stop", elem_id="admin-key-revoke")
    msg = gr.Markdown("", elem_id="admin-keys-msg")
    keys_df = gr.Dataframe(label="Keys", interactive=False, elem_id="admin-keys")

    def refresh(ok):
        import pandas as pd

        return (pd.DataFrame(service.api_keys(), columns=COLUMNS),)

    def limit(text: str | None, what: str) -> int | None:
        """Empty: the service's own limit; else a whole number (0 = no limit)."""
        text = (text or "").strip()
        if not text:
            return None
        if not text.isdigit():
            raise ValueError(f"{what} must be a whole number, or empty for the service's")
        return int(text)

    def create_key(ok, name_v, chat_v, fb_v, pairs_v):
        ctx.guard(ok)
        try:
            listing, token = service.create_api_key(name_v, limit(chat_v, "Chats a minute"),
                                                 limit(fb_v, "Ratings a minute"), limit(pairs_v, "Max training items"))
        except (ChatloopError, ValueError) as exc:
            return f"⚠️ {exc}", *refresh(ok)
        return (f"Created key `{listing['id']}` for {listing['name']}. Copy it now, it is not shown again:"
                f"\n\n`{token}`"), *refresh(ok)

    def revoke_key(ok, kid):
        ctx.guard(ok)
        try:
            service.revoke_api_key((kid or "").strip())
        except ChatloopError as exc:
            return f"⚠️ {exc}", *refresh(ok)
        return f"Revoked key `{kid.strip()}`.", *refresh(ok)

    create.click(create_key, [ctx.signed_in, name, chat_pm, fb_pm, pairs], [msg, keys_df])
    revoke.click(revoke_key, [ctx.signed_in, key_id], [msg, keys_df])
    return Section(refresh, [keys_df], periodic=False)
