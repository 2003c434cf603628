"""One forward for the running rows' decode step and a chunk of a long prompt ("ragged": rows of
different lengths in one pass), so a joining prompt's chunk shares the decode step's pass over the
weights instead of making a pass of its own between two decode steps.

Owns: ``RaggedStep`` (what one such forward holds: the caches, each decode row's first key, the
chunk's place in its prompt), ``ragged_forward`` (runs it), and its attention (``RaggedStep.attend``,
called by attention.py's row-invariant implementation while a step is running on this thread).

Layout: every token is a row of one position (ids and positions of shape [tokens, 1]): the decode
rows first, then the chunk's tokens. Linear layers, norms, rotary embeddings and the per-row LoRA
(rowlora.py) see one position per row, as in a plain decode step, so packed weights stay on their
decode kernels and each token gets its own row's adapter. Only attention needs the rows' real
shape, and it is done here, per layer:
- each decode row's new key and value go into the batch's cache (one column, as a plain decode
  step writes it) and the row attends to its own unpadded keys with the very call a plain decode
  step makes (``attention._decode_row``);
- the chunk's keys and values go into its prompt's own cache and its queries attend to that
  cache causally, as a chunk forward alone does (torch's ``scaled_dot_product_attention`` with
  the causal mask ``sdpa`` is given then; grouped-query heads read their keys without copies).

Invariants:
- Runs only on a model switched to row-invariant attention (attention.py), with a plain growing
  cache for both (kvcache.py); the engine falls back to a chunk forward of its own otherwise.
- The model is called without a cache; nothing else reads or writes the caches during the step.
- Only the rows whose logits are wanted reach the output head (a hook on the decoder's output):
  the decode rows, and on the prompt's last chunk its last token.
- The step is set for the calling thread only (each engine has its own thread) and cleared when
  the forward ends, even if it raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from chatloop.engine import kvcache
from chatloop.engine.attention import ROW_INVARIANT, _decode_row, set_ragged_step


def supported(model: torch.nn.Module, *caches: DynamicCache) -> bool:
    """Whether ``model`` and ``caches`` can run a ragged step (else: a chunk forward of its own)."""
    return (getattr(model.config, "_attn_implementation", None) == ROW_INVARIANT
            and hasattr(model, "get_decoder") and all(kvcache.batchable(c) for c in caches))


@dataclass
class RaggedStep:
    """One forward's decode rows and chunk: where each one's keys and values go and come from."""
    batch_cache: DynamicCache  # the running rows' cache: one new column each
    starts: list[int]  # each decode row's first real key (its left padding)
    chunk_cache: DynamicCache  # the joining prompt's own cache
    chunk_done: int  # prompt tokens already in ``chunk_cache``
    chunk_len: int
    _chunk_mask: torch.Tensor | None = None  # built by the first layer, read by the others

    def chunk_mask(self, device: torch.device) -> torch.Tensor | None:
        """The chunk's causal mask over the prompt so far (None for the first chunk: sdpa's
        ``is_causal``, as a chunk forward of its own gets it)."""
        if self.chunk_done and self._chunk_mask is None:
            total = self.chunk_done + self.chunk_len
            self._chunk_mask = (torch.arange(total, device=device)[None, :]
                                <= torch.arange(self.chunk_done, total, device=device)[:, None])[None, None]
        return self._chunk_mask

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               **kwargs) -> torch.Tensor:
        """The attention output [tokens, 1, heads, dim] of one layer for the step's rows."""
        n, layer = len(self.starts), module.layer_idx
        out = query.new_empty(query.shape[0], 1, query.shape[1], value.shape[-1])
        keys, values = self.batch_cache.layers[layer].update(key[:n], value[:n])
        for i, start in enumerate(self.starts):
            out[i:i + 1] = _decode_row(module, query[i:i + 1], keys[i:i + 1, :, start:], values[i:i + 1, :, start:],
                                       kwargs.get("scaling"))
        # the chunk's tokens, rows of one position, are one sequence of chunk_len positions again
        ckeys, cvalues = self.chunk_cache.layers[layer].update(key[n:].transpose(0, 2), value[n:].transpose(0, 2))
        mask = self.chunk_mask(query.device)
        query = query[n:].transpose(0, 2)
        if getattr(module, "num_key_value_groups", 1) > 1 and not kwargs.get("dropout"):
            # grouped-query heads read their shared keys in place: transformers' sdpa copies them
            # (repeat_kv) whenever a mask is given, a whole prompt's keys per layer and chunk
            chunk = F.scaled_dot_product_attention(query, ckeys, cvalues, attn_mask=mask, is_causal=mask is None,
                                                   scale=kwargs.get("scaling"), enable_gqa=True).transpose(1, 2)
        else:
            chunk, _ = sdpa_attention_forward(module, query, ckeys, cvalues, mask, **kwargs)
        out[n:] = chunk.transpose(0, 1)
        return out


def ragged_forward(model: torch.nn.Module, step: RaggedStep, ids: torch.Tensor, positions: torch.Tensor,
                   keep: torch.Tensor) -> torch.Tensor:
    """Float logits of the rows ``keep`` (indices into the step's token rows) after one forward of
    ``ids``/``positions`` ([tokens, 1] each: the decode rows, then the chunk)."""

    def only_kept(_module, _args, output):
        output.last_hidden_state = output.last_hidden_state[keep]
        return output

    hook = model.get_decoder().register_forward_hook(only_kept)
    set_ragged_step(step)
    try:
        out = model(input_ids=ids, position_ids=positions, past_key_values=None, use_cache=False, logits_to_keep=1)
    finally:
        set_ragged_step(None)
        hook.remove()
    return out.logits[:, -1, :].float()
