"""LoRA adapters inside the served model: slots, hot-swap, the per-row adapter hooks, and the
start-up self-check that proves the installed transformers/peft can do all of it.

Owns: ``AdapterSlots``, the part of ``Engine`` (a mixin) that keeps versions in PEFT adapter
"slots". Invariants: it runs on the engine thread only (or before it starts); a version that is
neither active nor used by a running row frees its slot, and at most one spare slot is kept; a
corrupt or mismatched adapter is refused (``AdapterError``) and the active one keeps serving.
The spare kept ready (``_keep_spare``) holds a zero LoRA (B = 0) and is never any row's adapter.

A new slot is built by transformers' ``load_adapter``; a hot-swap into a spare slot copies the
version's weights from files read before the engine thread is asked (``read_adapter``, in
``activate``'s caller): transformers' generic loading machinery took most of a hot-swap's time on
the engine thread, where every running reply waits for it (docs/LOG.md). A slot is reused only
for a version of equal LoRA settings (``_same_lora_shape``: so the same scaling), so when the
version's tensors are exactly the slot's, by name and shape, the hot-swap is a copy into each
(the slot's tensors are looked up once per slot, outside activations where possible: PEFT's
``hotswap_adapter_from_state_dict`` walks the whole model's state dict on every call). Anything
else goes through PEFT's function, which also zeroes layers the version leaves out; should PEFT
refuse the state dict, the version gets a new slot instead.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.hotswap import hotswap_adapter_from_state_dict
from safetensors.torch import load_file

from chatloop.adapters import BASE_VERSION, AdapterError
from chatloop.engine.rowlora import row_groups, rows_lora_forward
from chatloop.engine.weights import PackedLinear
from chatloop.hotswap_check import HotSwapUnavailable, unavailable, write_probe_adapters

log = logging.getLogger("chatloop.engine")


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# LoraConfig fields that change what a LoRA layer adds, beside its weights (dropout is off in serving)
_OUTPUT_SETTINGS = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
                    "rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "bias", "fan_in_fan_out",
                    "modules_to_save", "layers_to_transform", "layers_pattern", "target_parameters")


class AdapterFiles(NamedTuple):
    """An adapter directory's config and weights as read from disk (None where unreadable: a load
    anew then reports why)."""
    path: str
    config: LoraConfig | None
    state: dict[str, torch.Tensor] | None


def read_adapter(path: str) -> AdapterFiles:
    """Read an adapter directory's config and weights (no model needed: any thread can do it)."""
    try:
        config = LoraConfig.from_pretrained(path)
    except Exception:
        config = None
    try:
        state = load_file(str(Path(path) / "adapter_model.safetensors"))
    except Exception:
        state = None
    return AdapterFiles(path, config, state)


_LORA_PARAM = re.compile(r"(\.lora_[A-Za-z_]+)(\.weight|\.bias)?$")


def _slot_key(key: str, slot: str) -> str:
    """A saved adapter's key (``base_model.model.<module>.lora_A.weight``) as the slot's
    parameter in the served model (``<module>.lora_A.<slot>.weight``)."""
    key = key.removeprefix("base_model.model.")
    return _LORA_PARAM.sub(lambda m: f"{m.group(1)}.{slot}{m.group(2) or ''}", key)


class AdapterSlots:
    def check_hot_swap(self) -> None:
        """Prove, before serving, that the installed transformers/peft can do what serving does.

        Through the engine's own slot code: a zero probe adapter into a new slot (a mixed batch
        of base and probe rows must give the base model's logits), a random probe hot-swapped
        into the freed slot (its row must change, the base row must not), then every slot
        unloaded (the base model's logits again). Takes milliseconds; runs before the engine
        thread starts. Raises ``HotSwapUnavailable`` naming the versions and the fix.
        """
        if (self._thread is not None and self._thread.is_alive()
                and threading.current_thread() is not self._thread):
            raise RuntimeError("the self-check runs in the engine thread, before its loop starts")
        step = "writing probe adapters"
        try:
            with tempfile.TemporaryDirectory(prefix="chatloop-probe-") as tmp, torch.inference_mode():
                zero, noisy = write_probe_adapters(self.model, Path(tmp), self.probe_modules)
                step = "forward pass of the base model"
                base = self._probe_logits([BASE_VERSION])[0]
                full = (base.dtype == torch.float32 and self.model.dtype == torch.float32
                        and not any(isinstance(m, PackedLinear) for m in self.model.modules()))
                tol = (1e-4 if full else 3e-2) * (1 + float(base.abs().max()))  # packed: bf16 matmuls
                step = "loading an adapter into a new slot"
                self._ensure_loaded("probe-zero", path=str(zero))
                step = "a mixed batch of base and zero-adapter rows"
                got = self._probe_logits([BASE_VERSION, "probe-zero"])
                if (got - base).abs().max() > tol:
                    raise RuntimeError("a zero LoRA changed the logits")
                step = "hot-swapping an adapter into the spare slot"
                self._unload_unused()
                self._ensure_loaded("probe-random", path=str(noisy), must_hotswap=True)
                step = "a mixed batch after the hot-swap"
                got = self._probe_logits([BASE_VERSION, "probe-random"])
                if (got[0] - base).abs().max() > tol:
                    raise RuntimeError("the base row changed when another row used an adapter")
                if (got[1] - base).abs().max() <= tol:
                    raise RuntimeError("the hot-swapped adapter did not change its row's logits")
                # a version whose tensors are not exactly the slot's goes through PEFT's hot-swap:
                # it must replace the weights too (the zero probe over the random one: base again)
                step = "hot-swapping with PEFT's own function (for tensors that are not the slot's)"
                self._hotswap(self._slot_of["probe-random"], read_adapter(str(zero)), copy=False)
                if (self._probe_logits(["probe-random"])[0] - base).abs().max() > tol:
                    raise RuntimeError("PEFT's hot-swap did not change its row's logits")
                step = "unloading the adapters"
                self._unload_unused()
                for slot in list(self._slots):
                    self._drop_slot(slot)
                if (self._probe_logits([BASE_VERSION])[0] - base).abs().max() > tol:
                    raise RuntimeError("the model does not give the base logits after unloading")
        except HotSwapUnavailable:
            raise
        except Exception as exc:
            raise unavailable(step, exc) from exc
        finally:  # leave no probe behind, whatever failed
            for slot in list(self._slots):
                try:
                    self._drop_slot(slot)
                except Exception:
                    self._slots.pop(slot, None)
                    self._slot_params.pop(slot, None)
            self._slot_of.clear()

    def _adapter_names(self, versions: list[str]) -> list[str] | None:
        """Each row's PEFT adapter name for the LoRA hooks ('__base__' skips LoRA); None = no slots."""
        if not self._slots:
            return None
        return [self._slot_of[v] if v != BASE_VERSION else "__base__" for v in versions]

    def _probe_logits(self, versions: list[str]) -> torch.Tensor:
        """Last-position logits of the probe prompt, one row per version (a mixed batch)."""
        ids = torch.tensor([self._probe_ids] * len(versions), device=self.loaded.device)
        self._per_row_forward()
        self._route_rows(versions)
        try:
            return self.model(input_ids=ids, logits_to_keep=1).logits[:, -1, :].float()
        finally:
            self._route_rows(None)

    def _do_activate(self, version: str, files: AdapterFiles | None = None) -> str:
        if version != BASE_VERSION:
            self._ensure_loaded(version, files=files)
            if self._spare_shape is not None:  # the next version most likely has this one's settings
                self._spare_shape = self.model.peft_config.get(self._slot_of[version], self._spare_shape)
        previous, self._active = self._active, version
        self._unload_unused()
        return previous

    def _ensure_loaded(self, version: str, path: str | None = None, must_hotswap: bool = False,
                       files: AdapterFiles | None = None) -> None:
        """Give ``version`` a slot: hot-swap it into the spare slot if its shape allows, else a new one.

        ``path`` defaults to the registry's directory of the version; ``files``, that directory
        already read (else it is read here); ``must_hotswap`` (the self-check) raises instead of
        falling back to a new slot.
        """
        if version in self._slot_of:
            return
        self._wrappers_in()  # PEFT finds the layers to load into by walking the model
        path = path if path is not None else str(self.registry.path(version))
        spare = next((slot for slot, held in self._slots.items() if held is None), None)
        if must_hotswap and spare is None:
            raise RuntimeError("no spare slot to hot-swap into")
        if spare is not None:
            files = files if files is not None and files.path == path else read_adapter(path)
        if spare is not None and not must_hotswap and not self._same_lora_shape(spare, files.config):
            self._drop_slot(spare)  # another scaling or other layers: the version gets a slot of its own
            spare = None
        if spare is not None:
            try:
                self._hotswap(spare, files)
                self._assign(spare, version)
                return
            except Exception as exc:  # another rank or target modules, or a bad file: start afresh
                if must_hotswap:
                    raise
                log.info("adapter %s cannot reuse slot %s (%s); loading it anew", version, spare, exc)
                self._drop_slot(spare)
        slot = self._new_slot_name()
        try:
            # transformers reports every other loaded adapter's weights as "missing" from this
            # checkpoint: noise for us (a real mismatch raises), so keep it out of the log
            with _quiet("transformers.integrations.peft"):
                self.model.load_adapter(path, adapter_name=slot, hotswap=False)
        except Exception as exc:
            if slot in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(slot)
            raise AdapterError(f"adapter {version} cannot be loaded: {exc}") from exc
        self._assign(slot, version)
        self._hook_lora_layers()
        self._lora_on = None  # new LoRA layers start switched on: set the switch again

    def _keep_spare(self, busy: bool) -> None:
        """Build the spare slot the next activation hot-swaps into, when there is none: at once
        while idle, and while busy once it has been missing ``spare_wait_s`` (so the step that
        builds it, a few hundred ms of PEFT's layer building, comes after the new version's first
        replies rather than before them)."""
        if self._spare_shape is None or self.spare_ready:
            self._spare_missing_since = None
            return
        now = time.perf_counter()
        if self._spare_missing_since is None:
            self._spare_missing_since = now
        if busy and now - self._spare_missing_since < self.spare_wait_s:
            return
        self._spare_missing_since = None
        t0 = time.perf_counter()
        self._wrappers_in()
        slot = self._new_slot_name()
        # zero LoRA (B = 0), no dropout: a spare changes nothing, whatever happens to run through it
        config = dataclasses.replace(self._spare_shape, lora_dropout=0.0, init_lora_weights=True,
                                     inference_mode=True)
        try:
            self.model.add_adapter(config, adapter_name=slot)
        except Exception:
            log.exception("cannot build a spare LoRA slot of the training settings' shape; "
                          "activations will build their slots as they come")
            self._spare_shape = None
            if slot in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(slot)
            elif not getattr(self.model, "peft_config", None):
                # transformers marks the model as holding adapters before PEFT injects any; left
                # so, its next load_adapter looks for a peft_config that was never made
                self.model._hf_peft_config_loaded = False
            return
        for name, module in self.model.named_modules():  # as load_adapter leaves a new slot
            if name.endswith(f".{slot}"):  # lora_A.<slot>, lora_B.<slot>, lora_dropout.<slot>
                module.eval()
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
        self._slots[slot] = None
        self._lora_tensors(slot)  # looked up now, so the activation that uses this spare only copies
        self.spare_build_ms.append((time.perf_counter() - t0) * 1000)
        self._hook_lora_layers()
        self._lora_on = None  # new LoRA layers start switched on: set the switch again

    def _new_slot_name(self) -> str:
        self._slot_counter += 1
        # "slot1_" is not a part of "slot11_": PEFT's hot-swap finds a slot's keys by substring
        return f"slot{self._slot_counter}_"

    def _hotswap(self, slot: str, files: AdapterFiles, copy: bool = True) -> None:
        """Copy ``files``' weights into ``slot``: into each of its tensors when they are exactly
        the slot's (``copy``), else with PEFT's own hot-swap (weights, scaling, and zeros where the
        version has no LoRA), which raises if it finds them incompatible."""
        if files.config is None or files.state is None:
            raise ValueError(f"cannot read the adapter files in {files.path}")
        if any(slot in other for other in self._slots if other != slot):  # see the slot names
            raise ValueError(f"slot {slot} is part of another slot's name")
        state = {_slot_key(k, slot): v for k, v in files.state.items()}
        params = self._lora_tensors(slot)
        if copy and state.keys() == params.keys() and all(params[k].shape == v.shape for k, v in state.items()):
            with torch.no_grad():
                for key, value in state.items():
                    params[key].copy_(value)
            return
        self._slot_params.pop(slot, None)  # PEFT may swap tensors for others of another shape
        hotswap_adapter_from_state_dict(self.model, state, adapter_name=slot, config=files.config)

    def _lora_tensors(self, slot: str) -> dict[str, torch.nn.Parameter]:
        """``slot``'s LoRA parameters by their names in the model (the names ``_slot_key`` gives a
        saved adapter's keys), looked up once per slot."""
        if slot not in self._slot_params:
            self._wrappers_in()
            marker = f".{slot}."
            self._slot_params[slot] = {name: p for name, p in self.model.named_parameters()
                                       if marker in name and ".lora_" in name}
        return self._slot_params[slot]

    def _same_lora_shape(self, slot: str, new: LoraConfig | None) -> bool:
        """Whether an adapter of config ``new`` has the slot's LoRA settings, everything that
        decides its output besides the weights. transformers' hot-swap copied weights only,
        keeping the slot's scaling (``lora_alpha / r``) and the slot's previous weights in layers
        the new adapter does not target, so a version trained with other LoRA settings was served
        wrong (tests/test_engine.py); a slot is reused only for equal settings."""
        current = getattr(self.model, "peft_config", {}).get(slot)
        if current is None or new is None:
            return False  # unreadable here: loading it anew reports why

        def key(config) -> dict:
            d = config.to_dict()
            out = {k: d.get(k) for k in _OUTPUT_SETTINGS}
            for k, v in out.items():
                if isinstance(v, (list, set, tuple)):
                    out[k] = sorted(v)
            return out

        return key(current) == key(new)

    def _assign(self, slot: str, version: str) -> None:
        self._slots[slot] = version
        self._slot_of[version] = slot

    def _drop_slot(self, slot: str) -> None:
        self._unfold_if_holds(self._slots.get(slot))
        self._wrappers_in()
        held = self._slots.pop(slot)
        if held is not None:
            self._slot_of.pop(held, None)
        self._slot_params.pop(slot, None)
        self.model.delete_adapter(slot)
        self._lora_on = None  # layers may have come or gone: set the switch again before the next forward
        if not self._slots and self._merged_version is None:
            self._base_weights.clear()

    def _hook_lora_layers(self) -> None:
        """Give every LoRA layer the batch's per-row adapters: a LoRA ``Linear`` runs
        ``rowlora.rows_lora_forward`` over the groups of rows set once per forward (PEFT's
        mixed-batch products without its per-call bookkeeping); any other LoRA layer gets PEFT's
        ``adapter_names`` (the mechanism of ``PeftModel.generate(adapter_names=...)``). Installed
        once per layer instead of around every call; '__base__' rows skip the LoRA update.
        """
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and module not in self._hooked:
                if type(module) is LoraLinear:
                    module.forward = functools.partial(self._rows_lora_forward, module)
                else:
                    module.register_forward_pre_hook(self._inject_adapter_names, with_kwargs=True)
                self._hooked.add(module)

    def _rows_lora_forward(self, layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return rows_lora_forward(layer, self._routing, x, *args, **kwargs)

    def _inject_adapter_names(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        if self._routing is not None:
            kwargs["adapter_names"] = self._routing.names
        return args, kwargs

    def _route_rows(self, versions: list[str] | None) -> None:
        """The adapters of the next forward's rows, by version (None: no per-row LoRA)."""
        names = None if versions is None else self._adapter_names(versions)
        self._routing = row_groups(names, self.loaded.device)

    def _unload_unused(self) -> None:
        """Free the slots of versions nobody uses; keep one spare for the next activation."""
        in_use = {self._active} | {r.version for r in (*self._rows, *self._in_prefill())}
        for version in [v for v in self._slot_of if v not in in_use]:
            self._unfold_if_holds(version)
            self._slots[self._slot_of.pop(version)] = None
        for slot in [s for s, held in self._slots.items() if held is None][1:]:
            self._drop_slot(slot)
