"""The engine's KV cache layers: keys and values written in place into buffers with spare columns.

Owns: ``GrowingLayer`` (transformers' ``DynamicLayer`` without the whole-cache copy per step),
``new_cache`` (a ``DynamicCache`` made of them), and the two whole-batch edits the engine makes:
``stack_rows`` (rows joining the batch, right-aligned in a wider cache) and ``keep_rows`` (rows
leaving it, padding nobody needs trimmed).

Invariants:
- A layer's ``keys``/``values`` are always the first ``length`` columns (dim -2) of its buffers,
  so every reader (attention, the engine) sees exactly what a ``DynamicLayer`` would hold; a step
  writes only the columns after them. ``DynamicLayer.update`` concatenates, which copies the
  whole cache every step: with one long conversation in the batch that copy was most of every
  other user's decode step (docs/LOG.md).
- The buffers grow by a quarter (at least ``MIN_SPARE`` columns) when full, so a copy of the
  cache happens once per many steps instead of every step.
- Anything that assigns ``keys``/``values`` directly (transformers' own ``crop`` or
  ``reorder_cache``, for example) still works: the layer notices the tensors are no longer views
  of its buffers and copies them into new buffers at the next write.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_SPARE = 64  # columns added at least when a buffer grows


def _spare(columns: int) -> int:
    return max(MIN_SPARE, columns // 4)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers with spare columns."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def adopt(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
        """Hold ``kbuf``/``vbuf`` as the buffers, their first ``length`` columns as the cache."""
        self._kbuf, self._vbuf = kbuf, vbuf
        self.keys, self.values = kbuf[..., :length, :], vbuf[..., :length, :]
        self.dtype, self.device = kbuf.dtype, kbuf.device
        self.is_initialized = True

    def _views_of_buffers(self) -> bool:
        k, buf = self.keys, self._kbuf
        return (buf is not None and k is not None and k.dim() == 4 and k.data_ptr() == buf.data_ptr()
                and k.shape[:2] == buf.shape[:2] and k.stride() == buf.stride()
                and self.values.data_ptr() == self._vbuf.data_ptr() and self.values.stride() == self._vbuf.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length()
        m = n + key_states.shape[-2]
        if n == 0 or not self._views_of_buffers() or self._kbuf.shape[-2] < m:
            capacity = m + _spare(m)
            kbuf = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
            vbuf = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
            if n:
                kbuf[..., :n, :].copy_(self.keys)
                vbuf[..., :n, :].copy_(self.values)
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[..., n:m, :].copy_(key_states)
        self._vbuf[..., n:m, :].copy_(value_states)
        self.keys, self.values = self._kbuf[..., :m, :], self._vbuf[..., :m, :]
        return self.keys, self.values


def new_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain dynamic layers are ``GrowingLayer``s (other
    layer kinds, sliding-window ones for example, are left as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def batchable(cache: DynamicCache) -> bool:
    """Whether rows can be stacked into and dropped from ``cache`` (only plain growing layers)."""
    return all(type(layer) is GrowingLayer for layer in cache.layers)


def stack_rows(a: torch.Tensor, b: torch.Tensor, dim: int, width: int, spare: int = 0) -> torch.Tensor:
    """``a``'s rows then ``b``'s, each right-aligned in the first ``width`` of ``width + spare``
    columns along ``dim``, zeros on their left; the spare columns are left unwritten. One
    allocation and one copy of each (a long prompt joining once made three copies of the whole
    cache: docs/LOG.md)."""
    shape = list(a.shape)
    shape[0], shape[dim] = a.shape[0] + b.shape[0], width + spare
    out = a.new_empty(shape)
    for rows, t in ((slice(0, a.shape[0]), a), (slice(a.shape[0], None), b)):
        part, pad = out[rows], width - t.shape[dim]
        part.narrow(dim, 0, pad).zero_()
        part.narrow(dim, pad, t.shape[dim]).copy_(t)
    return out


def join(cache: DynamicCache, joining: DynamicCache, width: int) -> None:
    """Stack ``joining``'s rows under ``cache``'s, both right-aligned in ``width`` columns, with
    spare columns for the steps to come."""
    spare = _spare(width)
    for old, new in zip(cache.layers, joining.layers):
        old.adopt(stack_rows(old.keys, new.keys, -2, width, spare),
                  stack_rows(old.values, new.values, -2, width, spare), width)


def keep_rows(cache: DynamicCache, index: torch.Tensor, trim: int) -> None:
    """Keep the rows ``index`` of ``cache``, without their first ``trim`` columns, in new
    buffers with spare columns."""
    for layer in cache.layers:
        length = layer.get_seq_length() - trim
        bufs = []
        for t in (layer.keys, layer.values):
            buf = t.new_empty((len(index), t.shape[1], length + _spare(length), t.shape[-1]))
            torch.index_select(t[..., trim:, :], 0, index, out=buf[..., :length, :])
            bufs.append(buf)
        layer.adopt(bufs[0], bufs[1], length)
