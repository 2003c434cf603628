"""The serving engine: the only owner of the model in the service.

Owns: the model and its loaded LoRA adapters, the bounded request queue, the decode loop
(KV cache, sampling, stop conditions), token streaming, cancellation, and adapter
load/activate/unload.

Does not own: HTTP, the store, the registry's files (it reads them through ``AdapterRegistry``).

Invariants:
- One engine thread touches the model. Other threads talk to it through the request queue and
  the control queue; ``activate`` blocks its caller until the engine thread has loaded the adapter.
- Each request is pinned to one adapter version when the engine starts it ('base' or vN); the
  version is re-selected before every forward pass, so activation between decode steps never
  changes the adapter of a reply in flight, and the reply reports the version that produced it.
- Adapters that are neither active nor used by a running request are unloaded, so memory does
  not grow with the number of activations. A corrupt or mismatched adapter is refused and the
  active one keeps serving.
- Greedy decoding (temperature 0) equals ``model.generate(do_sample=False)`` token for token
  with the same repetition penalty (tests check it).

This first engine decodes one request at a time (requests wait in the queue); the interface
(submit -> stream handle, activate, cancel) is the seam for a batched engine or a vLLM backend.
"""

from __future__ import annotations

import logging
import math
import random
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chatloop.adapters import BASE_VERSION, AdapterError, AdapterRegistry
from chatloop.config import GenerationDefaults
from chatloop.models import LoadedModel

log = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """The request queue is full; try again later."""


class InvalidRequest(ValueError):
    """Bad generation settings or messages."""


class ContextTooLong(InvalidRequest):
    pass


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_tokens: int = 256
    repetition_penalty: float = 1.15
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def from_request(cls, defaults: GenerationDefaults, **given: Any) -> "GenerationParams":
        """Fill unset fields from defaults and validate; raises InvalidRequest with a clear message."""
        values = {
            "temperature": defaults.temperature,
            "top_p": defaults.top_p,
            "top_k": defaults.top_k,
            "max_tokens": defaults.max_tokens,
            "repetition_penalty": defaults.repetition_penalty,
            "stop": (),
            "seed": None,
        }
        for k, v in given.items():
            if k not in values:
                raise InvalidRequest(f"unknown generation setting {k!r}")
            if v is not None:
                values[k] = v
        stop = values["stop"]
        if isinstance(stop, str):
            stop = (stop,)
        values["stop"] = tuple(stop)
        params = cls(**values)
        params.validate(defaults.max_tokens_limit)
        return params

    def validate(self, max_tokens_limit: int) -> None:
        def num(name: str, lo: float, hi: float, integer: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
                raise InvalidRequest(f"{name} must be a{'n integer' if integer else ' number'}")
            if not math.isfinite(v) or not lo <= v <= hi:
                raise InvalidRequest(f"{name} must be between {lo:g} and {hi:g} (got {v})")

        num("temperature", 0.0, 2.0)
        num("top_p", 0.0, 1.0)
        if self.top_p == 0.0:
            raise InvalidRequest("top_p must be greater than 0")
        num("top_k", 0, 1000, integer=True)
        num("max_tokens", 1, max_tokens_limit, integer=True)
        num("repetition_penalty", 1.0, 2.0)
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s or len(s) > 64 for s in self.stop):
            raise InvalidRequest("stop must be at most 4 non-empty strings of up to 64 characters")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InvalidRequest("seed must be a non-negative integer")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length | cancelled
    adapter_version: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    latency_ms: float
    token_ids: list[int] = field(default_factory=list)


_DONE = object()


class StreamHandle:
    """What ``Engine.submit`` returns: iterate for text deltas, then read ``completion``."""

    def __init__(self) -> None:
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.adapter_version: str | None = None  # set when the engine starts the request

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._events.get()
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the whole reply (whether or not the stream was read)."""
        if not self._finished.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        assert self.completion is not None
        return self.completion

    # engine side
    def _emit(self, text: str) -> None:
        if text:
            self._events.put(text)

    def _finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
        self.completion, self.error = completion, error
        self._finished.set()
        self._events.put(_DONE)


@dataclass
class _Request:
    prompt: list[int]  # chat-template token ids, encoded once in the submitting thread
    params: GenerationParams
    adapter: str | None  # None = whatever is active when the request starts
    handle: StreamHandle


class _StopMatcher:
    """Finds stop strings in streamed text and holds back any tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)

    def find(self, text: str) -> int:
        hits = [text.find(s) for s in self.stops if s in text]
        return min(hits) if hits else -1

    def safe_len(self, text: str) -> int:
        keep = len(text)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = min(keep, len(text) - k)
                    break
        return keep


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        registry: AdapterRegistry,
        max_context_tokens: int = 2048,
        queue_size: int = 64,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.registry = registry
        self.max_context_tokens = max_context_tokens
        self._requests: queue.Queue[_Request] = queue.Queue(maxsize=queue_size)
        self._control: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded_adapters: set[str] = set()
        self._selected: str | None = None
        self._running_adapter: str | None = None
        self._active = BASE_VERSION
        # Rust tokenizers raise "Already borrowed" when two threads use one at once
        self._tokenizer_lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.eos_ids = {int(e) for e in eos_ids if e is not None}

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, initial_version: str | None = None) -> None:
        """Start the engine thread; activate the registry's active version (or base if broken)."""
        self._thread = threading.Thread(target=self._loop, name="chatloop-engine", daemon=True)
        self._thread.start()
        version = initial_version if initial_version is not None else self.registry.active()
        if version != BASE_VERSION:
            try:
                self.activate(version)
            except AdapterError as exc:
                log.error("active adapter %s cannot be loaded (%s); serving the base model", version, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def active_version(self) -> str:
        return self._active

    @property
    def loaded_adapters(self) -> set[str]:
        return set(self._loaded_adapters)

    def queue_depth(self) -> int:
        return self._requests.qsize()

    # ---- public API --------------------------------------------------------------------------
    def submit(self, messages: list[dict[str, str]], params: GenerationParams,
               adapter: str | None = None) -> StreamHandle:
        """Queue a chat request; returns at once with a handle that streams the reply."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("engine is not running")
        if adapter is not None and adapter != BASE_VERSION:
            self.registry.check(adapter)  # unknown/corrupt -> AdapterError before queueing
        prompt = self._encode(messages)
        if len(prompt) + params.max_tokens > self.max_context_tokens:
            raise ContextTooLong(
                f"the conversation is {len(prompt)} tokens; with max_tokens={params.max_tokens} it "
                f"exceeds the {self.max_context_tokens}-token context limit: start a new "
                f"conversation or ask for fewer tokens")
        handle = StreamHandle()
        try:
            self._requests.put_nowait(_Request(prompt, params, adapter, handle))
        except queue.Full:
            raise EngineBusy("the server is busy: too many requests are waiting") from None
        return handle

    def generate(self, messages: list[dict[str, str]], params: GenerationParams,
                 adapter: str | None = None, timeout: float | None = None) -> Completion:
        return self.submit(messages, params, adapter).result(timeout)

    def activate(self, version: str, timeout: float = 120) -> str:
        """Load ``version`` (if needed) and make it the adapter for new requests.

        Runs on the engine thread between decode steps; raises AdapterError if the adapter
        cannot be loaded, in which case the previous active version keeps serving.
        Returns the previously active version.
        """
        self.registry.check(version)
        return self._call(lambda: self._do_activate(version), timeout)

    # ---- engine thread -----------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any], timeout: float) -> Any:
        fut: Future = Future()
        self._control.put((fn, fut))
        return fut.result(timeout)

    def _run_control(self) -> None:
        while True:
            try:
                fn, fut = self._control.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # delivered to the caller
                    fut.set_exception(exc)

    def _do_activate(self, version: str) -> str:
        if version != BASE_VERSION:
            self._ensure_loaded(version)
        previous, self._active = self._active, version
        self._unload_unused()
        return previous

    def _ensure_loaded(self, version: str) -> None:
        if version in self._loaded_adapters:
            return
        path = self.registry.path(version)
        try:
            self.model.load_adapter(str(path), adapter_name=version, hotswap=False)
        except Exception as exc:
            if version in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(version)
            self._selected = None
            raise AdapterError(f"adapter {version} cannot be loaded: {exc}") from exc
        self._loaded_adapters.add(version)
        self._selected = None  # load_adapter changes which adapter is set

    def _unload_unused(self) -> None:
        for v in list(self._loaded_adapters):
            if v not in (self._active, self._running_adapter):
                self.model.delete_adapter(v)
                self._loaded_adapters.discard(v)
                self._selected = None

    def _select(self, version: str) -> None:
        """Make ``version`` the adapter the next forward pass uses."""
        if self._selected == version:
            return
        if self._loaded_adapters:
            if version == BASE_VERSION:
                self.model.disable_adapters()
            else:
                self.model.enable_adapters()
                self.model.set_adapter(version)
        self._selected = version

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_control()
            try:
                req = self._requests.get(timeout=0.05)
            except queue.Empty:
                continue
            completion, error = None, None
            try:
                completion = self._serve(req)
            except Exception as exc:  # never kill the engine thread; the caller gets the error
                if not isinstance(exc, (InvalidRequest, AdapterError)):
                    log.exception("generation failed")
                error = exc
            # unload before answering, so a caller that sees the reply sees the engine settled
            self._running_adapter = None
            try:
                self._unload_unused()
            except Exception:
                log.exception("unloading adapters failed")
            req.handle._finish(completion, error)
        # stopped: nobody will serve what is still queued, so say so instead of leaving callers waiting
        while True:
            try:
                self._requests.get_nowait().handle._finish(None, RuntimeError("the engine has stopped"))
            except queue.Empty:
                break

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        with self._tokenizer_lock:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _serve(self, req: _Request) -> Completion:
        t0 = time.perf_counter()
        handle, p = req.handle, req.params
        version = req.adapter if req.adapter is not None else self._active
        if version != BASE_VERSION:
            self._ensure_loaded(version)
        self._running_adapter = version
        handle.adapter_version = version
        prompt = req.prompt
        device = self.loaded.device
        input_ids = torch.tensor([prompt], device=device)
        processors = LogitsProcessorList()
        if p.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
        greedy = p.temperature == 0.0
        if not greedy:
            processors.append(TemperatureLogitsWarper(p.temperature))
            if p.top_k:
                processors.append(TopKLogitsWarper(p.top_k))
            if p.top_p < 1.0:
                processors.append(TopPLogitsWarper(p.top_p))
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed if p.seed is not None else random.SystemRandom().randrange(2**63))

        stops = _StopMatcher(p.stop)
        generated: list[int] = []
        emitted = 0
        text = ""
        finish = "length"
        ttft = None
        past = None
        next_input = input_ids
        seq = input_ids
        with torch.inference_mode():
            for _ in range(p.max_tokens):
                if handle.cancelled:
                    finish = "cancelled"
                    break
                self._run_control()  # activation between steps never touches this request
                self._select(version)
                out = self.model(input_ids=next_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                scores = processors(seq, logits)
                if greedy:
                    tok = int(torch.argmax(scores, dim=-1))
                else:
                    probs = torch.softmax(scores, dim=-1)
                    tok = int(torch.multinomial(probs, 1, generator=gen))
                if ttft is None:
                    ttft = (time.perf_counter() - t0) * 1000
                if tok in self.eos_ids:
                    finish = "stop"
                    break
                generated.append(tok)
                next_input = torch.tensor([[tok]], device=device)
                seq = torch.cat([seq, next_input], dim=1)
                text = self._decode(generated)
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence: wait for the next token
                cut = stops.find(text)
                if cut >= 0:
                    text = text[:cut]
                    finish = "stop"
                    break
                safe = stops.safe_len(text)
                if safe > emitted:
                    handle._emit(text[emitted:safe])
                    emitted = safe
        text = text.rstrip("\ufffd")  # a reply cut inside a multi-byte character
        handle._emit(text[emitted:])
        return Completion(
            text=text, finish_reason=finish, adapter_version=version, prompt_tokens=len(prompt),
            completion_tokens=len(generated), ttft_ms=ttft,
            latency_ms=(time.perf_counter() - t0) * 1000, token_ids=generated,
        )
