"""Each row's own LoRA in one batch: the products PEFT's mixed-batch forward computes, without its
per-call bookkeeping.

Owns: ``row_groups`` (a batch's rows grouped by adapter, once per forward) and
``rows_lora_forward`` (a LoRA ``Linear``'s forward over those groups).

PEFT's ``Linear._mixed_batch_forward`` (what ``adapter_names=`` runs) re-derives the row groups
from the name list in every layer, pops keyword arguments, checks them, and calls the dropout,
``lora_A`` and ``lora_B`` modules one by one: on a decode step of a small model that bookkeeping
costs more than the LoRA products themselves (docs/LOG.md, 2026-12-05). Here the groups come
once per forward and each layer runs only the tensor operations the result needs.

Invariants:
- Bit for bit PEFT's result: the base layer's output, and for each group of rows sharing an
  adapter ``lora_B(lora_A(dropout(x[rows]))) * scaling`` added to those rows in the result's
  dtype; ``nn.Linear``'s forward is ``F.linear`` and a dropout not in training mode is the
  identity, so the same operations run on the same values (tests/test_rowlora.py compares the
  two). A group of every row skips the gather and scatter of identical values.
- '__base__' rows get the base layer's output only; a layer without the group's adapter adds
  nothing to its rows (PEFT's rule).
- Anything this does not mirror exactly (a LoRA variant such as DoRA, a dropout in training
  mode, adapters switched off or merged) goes to PEFT's own forward with the names.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

BASE_ROWS = "__base__"  # PEFT's name for rows that skip LoRA


class RowGroups(NamedTuple):
    names: list[str]  # each row's adapter name, as PEFT takes them
    groups: list[tuple[str, torch.Tensor | None]]  # (adapter, its rows; None = every row), base rows left out


def row_groups(names: list[str] | None, device: torch.device) -> RowGroups | None:
    """The rows of each adapter in a batch whose row i uses ``names[i]`` (None: no per-row LoRA)."""
    if names is None:
        return None
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    return RowGroups(list(names), [(name, None if len(ix) == len(names) else torch.tensor(ix, device=device))
                                   for name, ix in rows.items() if name != BASE_ROWS])


def _mirrors_peft(layer: LoraLinear, adapter: str) -> bool:
    dropout = layer.lora_dropout[adapter]
    return adapter not in layer.lora_variant and not (isinstance(dropout, torch.nn.Dropout) and dropout.training)


def rows_lora_forward(layer: LoraLinear, routing: RowGroups | None, x: torch.Tensor, *args: Any,
                      **kwargs: Any) -> torch.Tensor:
    """``layer``'s output with each row's own adapter (PEFT's forward when ``routing`` is None)."""
    if routing is None or args or kwargs or layer.disable_adapters or layer.merged or not all(
            _mirrors_peft(layer, a) for a, _ in routing.groups if a in layer.lora_A):
        if routing is not None:
            kwargs["adapter_names"] = routing.names
        return LoraLinear.forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    for adapter, rows in routing.groups:
        if adapter not in layer.lora_A:
            continue
        a, b = layer.lora_A[adapter], layer.lora_B[adapter]
        sub = (x if rows is None else x[rows]).to(a.weight.dtype)
        out = F.linear(F.linear(sub, a.weight, a.bias), b.weight, b.bias) * layer.scaling[adapter]
        if rows is None:
            result += out.to(result.dtype)
        else:
            result[rows] += out.to(result.dtype)
    return result
