"""The single-version fast path: when every row in flight uses one adapter version, its LoRA is
folded into the layer weights and the LoRA layers are switched off, so a forward pass costs what
the base model's does; mixed batches keep PEFT's per-row LoRA forward.

Owns: ``MergedWeights``, a mixin of ``Engine`` (engine thread only). Invariants:
- The weights in place are the base weights, or the base weights plus exactly one version's
  ``ΔW`` (PEFT's own ``get_delta_weight``, added in place as PEFT's ``merge`` adds it), named by
  ``_merged_version``; LoRA layers run only while the base weights are in place.
- The base weights are restored by copying a kept copy back, never by subtracting ``ΔW``, so no
  rounding drifts in over many switches; the copy is taken once, the first time a version is folded.
- The state is decided by every row in flight (running and joining), not by one forward's rows,
  so the weights change only when the set of versions in flight changes, not every step.
- With the LoRA layers off, PEFT's wrappers are out of the model (their parents hold the base
  layers); they are put back before anything loads, drops, folds or runs a LoRA layer, and when
  the engine stops.
- A version whose slot is freed or reused is unfolded first; an adapter the fold cannot express
  (LoRA on a non-Linear layer, a LoRA bias, a variant such as DoRA) is served unmerged.
- Over packed weights (``weights.PackedLinear``: bf16, int8, int4) the delta is not added into
  the weights (most of it would round away); the layer holds the version's LoRA factors instead
  (``fuse``) and adds what PEFT's LoRA forward adds, without PEFT's wrapper.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from chatloop.adapters import BASE_VERSION
from chatloop.engine.weights import PackedLinear


class MergedWeights:
    merge_single_version: bool = True  # set by Engine from its constructor argument

    def _init_merged(self, enabled: bool) -> None:
        self.merge_single_version = enabled
        self._merged_version: str | None = None
        self._base_weights: dict[torch.nn.Module, torch.Tensor] = {}
        self._fused: list[PackedLinear] = []  # packed layers holding the folded version's LoRA
        self._lora_on: bool | None = None  # unknown: a model may come from an engine before this one
        self._unwrapped: list[tuple[torch.nn.Module, str, LoraLayer]] = []  # (parent, name, wrapper) taken out
        self._can_fold: dict[str, bool] = {}  # by version (a version's files never change)
        self.weight_switches = 0  # how often the weights in place changed (fold or restore)

    def _uniform_forward(self, versions: set[str]) -> bool:
        """Put in place the weights a forward for rows of ``versions`` needs; True when the LoRA
        layers are off (one version, folded or base), False for PEFT's per-row forward."""
        if not self._slots:
            return False  # no LoRA layers: nothing to fold or switch
        one = next(iter(versions)) if len(versions) == 1 else None
        if one is None or not self.merge_single_version or (one != BASE_VERSION and not self._foldable(one)):
            self._per_row_forward()
            return False
        target = None if one == BASE_VERSION else one
        if self._merged_version != target:
            self._unfold()
            if target is not None:
                self._fold(target)
        self._set_lora(False)
        return True

    def _per_row_forward(self) -> None:
        """The base weights in place and the LoRA layers on (PEFT's per-row forward)."""
        self._unfold()
        self._set_lora(True)

    def _lora_layers(self, slot: str) -> list[LoraLayer]:
        self._wrappers_in()
        return [m for m in self.model.modules() if isinstance(m, LoraLayer) and slot in m.lora_A]

    def _foldable(self, version: str) -> bool:
        """Whether the fold can express ``version`` (asked on every forward: looked at once)."""
        if version not in self._can_fold:
            slot = self._slot_of.get(version)
            if slot is None:
                return False
            self._can_fold[version] = all(
                isinstance(m, LoraLinear) and not m.lora_bias.get(slot, False)
                and slot not in getattr(m, "lora_variant", {}) for m in self._lora_layers(slot))
        return self._can_fold[version]

    def _fold(self, version: str) -> None:
        slot = self._slot_of[version]
        with torch.no_grad():
            for m in self._lora_layers(slot):
                base = m.get_base_layer()
                if isinstance(base, PackedLinear):
                    base.fuse(m.lora_A[slot], m.lora_B[slot], m.scaling[slot])
                    self._fused.append(base)
                    continue
                w = base.weight
                if m not in self._base_weights:
                    self._base_weights[m] = w.detach().clone()
                w.data += m.get_delta_weight(slot).to(w.dtype)
        self._merged_version = version
        self.weight_switches += 1

    def _unfold(self) -> None:
        if self._merged_version is None:
            return
        with torch.no_grad():
            for m, kept in self._base_weights.items():
                m.get_base_layer().weight.data.copy_(kept)
        for layer in self._fused:
            layer.unfuse()
        self._fused = []
        self._merged_version = None
        self.weight_switches += 1

    def _set_lora(self, on: bool) -> None:
        """On: PEFT's LoRA wrappers in the model and switched on (the per-row forward). Off: the
        wrappers taken out of the forward path (``_wrappers_out``)."""
        if self._lora_on == on:
            return
        if on:
            self._wrappers_in()
            for m in self.model.modules():
                if isinstance(m, LoraLayer):
                    m._disable_adapters = False  # PEFT's own switch (enable_adapters also sets grads)
        else:
            self._wrappers_out()
        self._lora_on = on

    def _wrappers_out(self) -> None:
        """Each LoRA-wrapped layer's parent holds the base layer itself, so a forward with the
        LoRA layers off runs neither PEFT's wrapper nor the per-row hook (switched off, they still
        cost a measurable share of a decode step: docs/LOG.md 2026-12-04). Whatever reads or changes the LoRA
        layers puts the wrappers back first (``_wrappers_in``)."""
        if self._unwrapped:
            return
        for parent in list(self.model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    self._unwrapped.append((parent, name, child))
        for parent, name, wrapper in self._unwrapped:
            setattr(parent, name, wrapper.get_base_layer())

    def _wrappers_in(self) -> None:
        """PEFT's wrappers back in their places (before a slot is loaded, dropped or folded)."""
        if not self._unwrapped:
            return
        for parent, name, wrapper in self._unwrapped:
            setattr(parent, name, wrapper)
        self._unwrapped = []
        self._lora_on = None  # the wrappers' own switches are as they were: set them again

    def _unfold_if_holds(self, version: str | None) -> None:
        """Before ``version``'s slot is freed or reused: the base weights back in place."""
        if version is not None and version == self._merged_version:
            self._unfold()
