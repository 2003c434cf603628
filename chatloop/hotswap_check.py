"""The start-up self-check's parts: probe adapters and the error that names what is installed.

Owns: writing two throw-away LoRA adapters for the served model (rank 1 on one layer: one with
B = 0, which must leave every logit unchanged, and one with random weights, which must change
them) in PEFT's own on-disk format, and ``HotSwapUnavailable``, whose message names the installed
transformers and peft, the step that failed and the fix.

The check itself is ``Engine.check_hot_swap``: it runs these probes through the engine's own slot
code (new slot, hot-swap into the spare slot, mixed batch, unload), so it tests what serving does.

Invariant: writing the probes leaves the model as it found it (the adapter added to build them is
deleted again, also when writing fails).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

LOCK_FIX = ("install the locked versions: `make setup`, or "
            "`pip install --no-deps --require-hashes -r requirements.lock` in the service's environment")


class HotSwapUnavailable(RuntimeError):
    """The installed transformers/peft cannot load, hot-swap or unload a LoRA adapter."""


def installed_versions() -> dict[str, str]:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


def unavailable(step: str, cause: BaseException | str) -> HotSwapUnavailable:
    versions = ", ".join(f"{name} {version}" for name, version in installed_versions().items())
    return HotSwapUnavailable(
        f"the LoRA self-check failed at '{step}' with {versions}: {cause}. A service that cannot "
        f"hot-swap adapters would serve stale versions or fail requests, so it does not start. "
        f"Fix: {LOCK_FIX}")


# the random probe's LoRA weights: A·x then sums ~hidden-size terms of this size, so its change to
# the logits is far above the self-check's bf16 tolerance (3e-2 relative); PEFT's own random init
# sometimes was not (docs/LOG.md, 2026-12-03)
RANDOM_PROBE_STD = 0.3


def write_probe_adapters(model: torch.nn.Module, directory: Path,
                         target_modules: Sequence[str]) -> tuple[Path, Path]:
    """Write a zero and a random probe adapter for ``model`` under ``directory``.

    Returns (zero, random). Built with the model's own PEFT integration and saved as a PEFT
    directory, as a training run saves its adapter.
    """
    from peft import LoraConfig

    paths = []
    for name, init in (("zero", True), ("random", False)):
        config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=list(target_modules),
                            layers_to_transform=[0], init_lora_weights=init)
        adapter = f"chatloop_probe_{name}"
        model.add_adapter(config, adapter_name=adapter)
        if not init:  # PEFT's random init is too faint to show through bf16 rounding: make it loud
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if f".{adapter}." in pname:
                        p.normal_(0.0, RANDOM_PROBE_STD, generator=torch.Generator(p.device).manual_seed(0))
        try:
            path = directory / name
            model.save_pretrained(path)  # with an adapter loaded, transformers saves only it
        finally:
            model.delete_adapter(adapter)
        paths.append(path)
    return paths[0], paths[1]
