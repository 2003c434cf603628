"""What a generation request is, from outside the engine: its settings, its stream, its result,
and the errors it can meet.

Owns: ``GenerationParams`` (validated sampling settings), ``StreamHandle`` (the caller's side of
one request: text deltas, cancel, the final ``Completion``), the stop-string matcher, and the
engine's errors (each with its HTTP status, see ``chatloop.errors``).

Invariants: settings are validated before a request is queued (a bad one is ``InvalidRequest``
and never reaches the engine); a handle ends exactly once, with a completion or an error.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from chatloop.config import GenerationDefaults
from chatloop.errors import ChatloopError


class EngineBusy(ChatloopError, RuntimeError):
    """The request queue is full; try again later."""
    status, type = 503, "server_busy"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class GenerationFailed(ChatloopError, RuntimeError):
    """One request's generation failed inside the engine; the rest of its batch went on."""
    status, type, code = 500, "server_error", "generation_failed"


class InvalidRequest(ChatloopError, ValueError):
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
    submitted: float  # perf_counter() at submit: TTFT and latency include the wait in the queue


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
