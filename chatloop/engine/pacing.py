"""How many prompt tokens the next prefill chunk takes, so it costs at most a share of a decode step.

Owns: ``PrefillPacer``. A long prompt that arrives while others decode is prefilled a chunk per
step, between their decode steps; each of their inter-token gaps then holds one decode step and
one chunk. A fixed chunk size cannot keep that gap near the quiet one on every machine (a chunk
costs several decode steps on a slow CPU and a fraction of one on a GPU), so the chunk is sized
from measured times: ``budget`` x (the last decode step's seconds) / (seconds per prompt token of
the last chunk).

Invariants:
- A chunk has at least ``min_tokens`` (the prompt always gets on; below 8 tokens a chunk's fixed
  cost dominates and the long prompt's wait grows faster than the others' gaps shrink: docs/LOG.md)
  and at most ``max_tokens``.
- ``budget = 0`` turns pacing off: every chunk has ``max_tokens`` (the fixed-size behaviour).
- Until both a decode step and a chunk have been timed, a chunk has ``min_tokens``.
"""
from __future__ import annotations


class PrefillPacer:
    def __init__(self, max_tokens: int, budget: float, min_tokens: int = 8):
        if max_tokens < 1:
            raise ValueError("the prefill chunk must be at least 1 token")
        if budget < 0:
            raise ValueError("the prefill budget must be 0 (off) or a positive share of a decode step")
        self.max_tokens = max_tokens
        self.budget = budget
        self.min_tokens = min_tokens
        self._step_s: float | None = None  # the last decode step
        self._token_s: float | None = None  # per prompt token, the last chunk

    def decoded(self, seconds: float) -> None:
        self._step_s = seconds

    def prefilled(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self._token_s = seconds / tokens

    def next_tokens(self) -> int:
        if self.budget == 0:
            return self.max_tokens
        if self._step_s is None or not self._token_s:
            return min(self.min_tokens, self.max_tokens)
        tokens = int(self.budget * self._step_s / self._token_s)
        return min(self.max_tokens, max(self.min_tokens, tokens))
