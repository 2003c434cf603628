"""The running service's application layer: what the HTTP API and the UI both call.

Owns: wiring settings, store, registry, engine and retrainer together; validating chat input;
recording every reply with the version that produced it; feedback and comparisons; per-user rate
limits. The operator's actions (activation, override, rollback, retraining, runs, SQL, export,
import) are the ``Operations`` half it inherits (``chatloop.operations``).

Invariants:
- A reply is recorded once, after it ends (finished, stopped or cancelled), with its message id
  allocated when it starts, so streams can name it from the first chunk.
- Routes, the UI and the CLI call this object only; none reaches past it into its parts.
- A user continues, lists and deletes only their own conversations and rates only replies
  written for them (Forbidden otherwise); a deleted conversation cannot be continued (NotFound); text that could not be stored (control characters, lone surrogates) is
  refused before anything is written.
- Nothing here knows about HTTP or Gradio.
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterator

from chatloop.adapters import BASE_VERSION, AdapterRegistry, UnknownAdapter
from chatloop.apikeys import KeyRing
from chatloop.config import Settings
from chatloop.conversations import current_branch
from chatloop.engine import Completion, Engine, GenerationParams, InvalidRequest, StreamHandle
from chatloop.loop import Retrainer
from chatloop.identity import CookieSigner, NewIdentityLimit, load_secret
from chatloop.engine.weights import pack_for_serving, resolve_serve_weights
from chatloop.models import LoadedModel, in_passing_thread, load_model
from chatloop.train.configs import lora_config
from chatloop.operations import Operations
from chatloop.ratelimit import FailureBackoff, RateLimiter
from chatloop.reconcile import reconcile
from chatloop.store import Forbidden, GenerationRecord, Store, new_id

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


def check_text(text: str, what: str) -> None:
    """Refuse control characters (other than newline, return and tab) and lone surrogates (text
    that is not valid Unicode and could not be stored as UTF-8)."""
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cc" and ch not in "\n\r\t":
            raise InvalidRequest(f"{what} contains control characters")
        if cat == "Cs":
            raise InvalidRequest(f"{what} is not valid Unicode (a lone surrogate)")


def validate_messages(messages: Any, max_messages: int, max_chars: int) -> list[dict[str, str]]:
    """Check a chat request's messages; returns clean {role, content} dicts or raises InvalidRequest."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    if len(messages) > max_messages:
        raise InvalidRequest(f"too many messages: {len(messages)} (at most {max_messages})")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if isinstance(content, list):  # OpenAI content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InvalidRequest(f"messages[{i}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string")
        if len(content) > max_chars:
            raise InvalidRequest(f"messages[{i}] is too long: {len(content)} characters (at most {max_chars})")
        check_text(content, f"messages[{i}]")
        if role == "user" and not content.strip():
            raise InvalidRequest(f"messages[{i}] is empty")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "user":
        raise InvalidRequest("the last message must be from the user")
    return clean


@dataclass
class ChatTurn:
    """A reply being generated: iterate for text deltas; ``message_id`` is known from the start."""

    message_id: str
    conversation_id: str
    handle: StreamHandle
    service: "Service"
    context: list[dict[str, str]]
    params: GenerationParams
    completion: Completion | None = None
    _recording: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.handle
        finally:
            if not self.handle.done:
                self.handle.cancel()  # the consumer went away: free the engine at the next step
            self._record()

    def result(self, timeout: float | None = None) -> Completion:
        self.handle.result(timeout)
        self._record()
        assert self.completion is not None
        return self.completion

    @property
    def adapter_version(self) -> str | None:
        return self.handle.adapter_version

    def abandon(self) -> None:
        """The client went away: stop generating at the next step, and store what was generated
        (in the background, so the server's event loop does not wait for that step)."""
        if not self.handle.done:
            self.handle.cancel()
        threading.Thread(target=self._record, name="chatloop-record-abandoned", daemon=True).start()

    def _record(self) -> None:
        with self._recording:  # the stream's end and abandon() may both get here: store once
            if self.completion is not None:
                return
            try:
                c = self.handle.result(timeout=120)  # a cancelled request ends at the next step
            except Exception:
                return  # nothing was generated (refused or failed in the engine): nothing to record
            self.completion = c
            self._store(c)

    def _store(self, c: Completion) -> None:
        if c.finish_reason == "cancelled" and not c.completion_tokens:
            return  # stopped before the first token: there is no reply to keep
        self.service.store.record_exchange(self.conversation_id, GenerationRecord(
            context=self.context, reply=c.text, model=self.service.model_name,
            adapter_version=c.adapter_version, settings=self.params.as_dict(),
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
            ttft_ms=c.ttft_ms, latency_ms=c.latency_ms, finish_reason=c.finish_reason,
        ), message_id=self.message_id)


class Service(Operations):
    """The service: chat and feedback here, the operator's actions in ``Operations``."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None):
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        # set-up work with torch runs in a passing thread: the engine thread's OpenMP team must be
        # the only one alive (models.in_passing_thread)
        self.loaded = loaded or in_passing_thread(lambda: load_model(settings.model, settings.models_dir,
                                                                     settings.device, settings.dtype))
        # the engine's copy only: training children load the full weights from loaded.path
        self.serve_weights = resolve_serve_weights(settings.serve_weights, self.loaded.device)
        self.packed_layers = in_passing_thread(lambda: pack_for_serving(self.loaded.model, self.serve_weights))
        self.load_s = time.perf_counter() - t0
        self.model_name = self.loaded.name
        self.store = Store(settings.db_path)
        self.registry = AdapterRegistry(settings.adapters_dir)
        # after a crash: runs, adapter rows and the activation log brought in line with the registry
        self.reconciled = reconcile(self.store, self.registry)
        self.limiter = RateLimiter()
        self.signin_backoff = FailureBackoff()  # wrong operator tokens, API and Admin tab alike
        self.keys = KeyRing(self.store)  # API keys: issued identities with their own limits
        self.signer = CookieSigner(load_secret(settings.cookie_secret, settings.data_dir))
        self.new_identities = NewIdentityLimit(settings.limits.new_identities_per_hour)
        self.engine = Engine(self.loaded, self.registry, settings.limits.max_context_tokens,
                             settings.queue_size, settings.max_batch,
                             probe_modules=settings.training.lora_target_modules,
                             merge_single_version=settings.merge_single_version,
                             prefill_chunk=settings.prefill_chunk_tokens,
                             prefill_budget=settings.prefill_chunk_budget,
                             row_invariant_attention=settings.row_invariant_attention,
                             # a slot of the shape training publishes, ready for the next activation
                             spare_lora=lora_config(settings.training))
        self.retrainer = Retrainer(settings, self.store, self.registry, self.loaded.path,
                                   activate=self.activate, active_version=lambda: self.engine.active_version)

    def start(self) -> "Service":
        self.engine.start()
        if self.engine.active_version != self.registry.active():
            log.warning("registry names %s but the engine serves %s", self.registry.active(),
                        self.engine.active_version)
        return self

    def close(self) -> None:
        self.retrainer.cancel()
        self.engine.stop()
        self.store.close()

    # ---- chat --------------------------------------------------------------------------------
    def check_rate(self, action: str, user_key: str, per_minute: int | None = None) -> None:
        """Raise RateLimited when ``user_key`` has used up its ``action`` allowance ('chat' or
        'feedback', per ``[limits]`` unless ``per_minute`` is given: an API key's own)."""
        if per_minute is None:
            per_minute = (self.settings.limits.chat_per_minute if action == "chat"
                          else self.settings.limits.feedback_per_minute)
        self.limiter.check(action, user_key, per_minute)

    # ---- identities --------------------------------------------------------------------------
    def admit_identity(self, address: str, user_id: str) -> None:
        """RateLimited once ``address`` has brought too many unkeyed users new to it this hour."""
        self.new_identities.admit(address, user_id)

    def cookie_user(self, cookies: Any) -> str | None:
        """The id in a request's signed identity cookie, or None (absent, malformed, forged)."""
        return self.signer.uid_from_cookies(cookies)

    def authenticate_key(self, token: str):
        """The active API key ``token`` is, or None (wrong secret, unknown or revoked)."""
        return self.keys.authenticate(token)

    def api_keys(self) -> list[dict[str, Any]]:
        return self.keys.list()

    def create_api_key(self, name: str, chat_per_minute: int | None = None, feedback_per_minute: int | None = None,
                       max_pairs: int | None = None) -> tuple[dict[str, Any], str]:
        """A new key's listing and the key itself (shown once; only its hash is kept)."""
        return self.keys.create(name, chat_per_minute, feedback_per_minute, max_pairs)

    def revoke_api_key(self, key_id: str) -> None:
        self.keys.revoke(key_id)

    def params(self, **given: Any) -> GenerationParams:
        return GenerationParams.from_request(self.settings.generation, **given)

    def chat(self, messages: Any, params: GenerationParams, user_id: str,
             conversation_id: str | None = None, source: str = "api",
             adapter: str | None = None, operator: bool = False) -> ChatTurn:
        """One reply. ``adapter`` names a version other than the active one: any published
        version for an operator; for anyone else only one that serves or has served (base, the
        active one, the live comparison's candidate, an earlier active one), never a candidate the
        gate rejected or a failed run left behind."""
        lim = self.settings.limits
        if adapter is not None and not operator and not self.is_public_version(adapter):
            raise InvalidRequest(f"unknown adapter version {adapter!r}")  # worded as for one that does not exist
        context = validate_messages(messages, lim.max_messages, lim.max_message_chars)
        if conversation_id is not None and self.store.conversation_owner(conversation_id) != user_id:
            raise Forbidden("that conversation belongs to another user")
        # tokenizes once and checks the context limit: ContextTooLong, EngineBusy, AdapterError
        try:
            handle = self.engine.submit(context, params, adapter=adapter)
        except UnknownAdapter as exc:  # a field of the request, not a resource in its path: 400
            raise InvalidRequest(str(exc)) from None
        if conversation_id is None:
            try:
                conversation_id = self.store.new_conversation(user_id, source)
            except BaseException:
                handle.cancel()
                raise
        return ChatTurn(message_id=new_id("msg"), conversation_id=conversation_id, handle=handle,
                        service=self, context=context, params=params)

    # ---- feedback ----------------------------------------------------------------------------
    def feedback(self, message_id: str, rating: int, user_id: str,
                 reason: str | None = None, comment: str | None = None) -> int:
        """A thumb by ``user_id``, who must be the user the reply was written for (Forbidden)."""
        lim = self.settings.limits
        if reason is not None and len(reason) > lim.max_reason_chars:
            raise InvalidRequest(f"reason is too long (at most {lim.max_reason_chars} characters)")
        if comment is not None and len(comment) > lim.max_comment_chars:
            raise InvalidRequest(f"comment is too long (at most {lim.max_comment_chars} characters)")
        for what, text in (("reason", reason), ("comment", comment), ("message_id", message_id)):
            if text is not None:
                check_text(text, what)
        # the writer checks, in the same transaction, that the reply was shown to this user
        return self.store.record_feedback(message_id, user_id, rating, reason, comment, shown_only=True)

    def compare(self, message_a: str, message_b: str, choice: str, user_id: str) -> int:
        """An A/B choice by ``user_id``, who must have been shown both replies (Forbidden)."""
        return self.store.record_comparison(message_a, message_b, choice, user_id, shown_only=True)

    # ---- a user's own conversations ------------------------------------------------------------
    def conversations(self, user_id: str, exclude_sources: tuple[str, ...] = (),
                      limit: int = 100) -> list[dict[str, Any]]:
        """``user_id``'s conversations, most recently active first (deleted ones left out)."""
        return self.store.user_conversations(user_id, exclude_sources, limit)

    def conversation(self, conversation_id: str, user_id: str) -> list[dict[str, Any]]:
        """The turns of the current branch of ``user_id``'s conversation, with the alternatives
        and that user's rating at each reply (``chatloop.conversations``); Forbidden for another
        user's, NotFound for an unknown or deleted one."""
        return current_branch(self.store.conversation_replies(conversation_id, user_id))

    def delete_conversation(self, conversation_id: str, user_id: str) -> None:
        """Hide ``user_id``'s conversation from them; it stays in the log, marked, and never trains again."""
        self.store.delete_conversation(conversation_id, user_id)

    # ---- adapters ----------------------------------------------------------------------------
    def is_public_version(self, version: str) -> bool:
        """Whether ``version`` may serve anyone (it serves or has served), not only operators."""
        public = {BASE_VERSION, self.engine.active_version, self.registry.compare_version()}
        return version in public or version in self.store.served_versions()
