"""How many prompt tokens the next prefill chunk takes, so it costs at most a share of a decode step.

Owns: ``PrefillPacer``. A long prompt that arrives while others decode is prefilled a chunk per
step, between their decode steps; each of their inter-token gaps then holds one decode step and
one chunk. A fixed chunk size cannot keep that gap near the quiet one on every machine (a chunk
costs several decode steps on a slow CPU and a fraction of one on a GPU), so the chunk is sized
from measured times: ``budget`` x (the last decode step's seconds) / (seconds per prompt token of
the last chunk). A chunk that rides in the decode step's own forward (ragged.py) costs what it
adds to that step: (the step's seconds - the last plain decode step's) / its tokens, averaged
with the estimate before (one such difference is noisy, and may be negative).

Invariants:
- A chunk has at least ``min_tokens`` (the prompt always gets on; below 8 tokens a chunk forward's
  fixed cost dominates and the long prompt's wait grows faster than the others' gaps shrink:
  docs/LOG.md), a chunk sharing the decode step at least ``min_shared_tokens`` (it has no forward
  of its own to pay for), and at most ``max_tokens``.
- ``budget = 0`` turns pacing off: every chunk has ``max_tokens`` (the fixed-size behaviour).
- Until both a decode step and a chunk have been timed, a chunk has its least size.
- A chunk has at most twice the tokens of the one before it, so one fast, noisy measurement
  cannot make the next chunk jump to ``max_tokens``.
"""
from __future__ import annotations


class PrefillPacer:
    def __init__(self, max_tokens: int, budget: float, min_tokens: int = 8, min_shared_tokens: int = 2):
        if max_tokens < 1:
            raise ValueError("the prefill chunk must be at least 1 token")
        if budget < 0:
            raise ValueError("the prefill budget must be 0 (off) or a positive share of a decode step")
        self.max_tokens = max_tokens
        self.budget = budget
        self.min_tokens = min_tokens
        self.min_shared_tokens = min_shared_tokens
        self._step_s: float | None = None  # the last decode step
        self._token_s: float | None = None  # per prompt token, the last chunk
        self._last_tokens: int | None = None  # the last chunk's size

    def decoded(self, seconds: float) -> None:
        self._step_s = seconds

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A chunk of ``tokens`` took ``seconds``, a forward of its own."""
        if tokens > 0:
            self._token_s = seconds / tokens
            self._last_tokens = tokens

    def shared(self, tokens: int, seconds: float) -> None:
        """A decode step that carried a chunk of ``tokens`` took ``seconds`` (one forward)."""
        if tokens <= 0:
            return
        self._last_tokens = tokens
        if self._step_s is None:
            return
        added = max(seconds - self._step_s, 0.0) / tokens
        self._token_s = added if self._token_s is None else (self._token_s + added) / 2

    def next_tokens(self, shared: bool = False) -> int:
        """The next chunk's size; ``shared``: it rides in a decode step (else a forward of its own)."""
        if self.budget == 0:
            return self.max_tokens
        least = self.min_shared_tokens if shared else self.min_tokens
        if self._step_s is None or not self._token_s:
            return min(least, self.max_tokens)
        tokens = int(self.budget * self._step_s / self._token_s)
        if self._last_tokens is not None:
            tokens = min(tokens, 2 * self._last_tokens)
        return min(self.max_tokens, max(least, tokens))
