"""The start-up LoRA self-check and the lock: a service whose transformers/peft cannot hot-swap
refuses to start with a message that names the versions and the fix (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import peft
import pytest
import torch
import transformers

from chatloop.adapters import AdapterRegistry
from chatloop.engine import Engine, slots
from chatloop.hotswap_check import HotSwapUnavailable
from chatloop.lockdiff import diff, parse_pins
from chatloop.models import load_model
from conftest import ADMIN_TOKEN, REPO, free_port

VERSIONS = f"transformers {transformers.__version__}, peft {peft.__version__}"


@pytest.fixture
def engine(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), tmp_path / "models")
    return Engine(loaded, AdapterRegistry(tmp_path / "adapters"))


def base_logits(engine: Engine) -> torch.Tensor:
    with torch.inference_mode():
        return engine._probe_logits(["base"])[0]


def test_the_check_passes_and_leaves_the_model_as_it_was(engine):
    before = base_logits(engine)
    engine.check_hot_swap()
    assert engine.adapter_slots == 0 and engine.loaded_adapters == set()
    assert not getattr(engine.model, "peft_config", {}), "a probe adapter was left in the model"
    assert torch.equal(base_logits(engine), before)
    engine.start()  # start() runs it again, then serves
    try:
        assert engine.active_version == "base"
    finally:
        engine.stop()


def test_a_failing_hot_swap_names_the_versions_and_the_fix(engine, monkeypatch):
    def refusing(model, state_dict, adapter_name, config):  # a peft whose hot-swap cannot take our keys
        raise RuntimeError("Hot swapping the adapter did not succeed, unexpected keys found: x.lora_A.weight.")

    monkeypatch.setattr(slots, "hotswap_adapter_from_state_dict", refusing)
    with pytest.raises(HotSwapUnavailable) as err:
        engine.start()
    message = str(err.value)
    assert VERSIONS in message and "hot-swapping" in message and "requirements.lock" in message
    assert "unexpected keys found" in message
    assert engine._thread is None, "the engine started serving despite the failed check"
    assert engine.adapter_slots == 0 and not getattr(engine.model, "peft_config", {})


def test_a_hot_swap_that_silently_keeps_the_old_weights_is_caught(engine, monkeypatch):
    monkeypatch.setattr(slots, "hotswap_adapter_from_state_dict", lambda *args, **kwargs: None)  # "succeeds"
    with pytest.raises(HotSwapUnavailable, match="did not change its row's logits"):
        engine.check_hot_swap()


def test_a_hot_swap_copy_that_misses_the_slot_is_caught(engine, monkeypatch):
    """The hot-swap serving does (a copy into the slot's tensors) writing somewhere else, as it
    would if a new peft kept a slot's weights under other tensors than its named parameters."""
    named = slots.AdapterSlots._lora_tensors
    monkeypatch.setattr(slots.AdapterSlots, "_lora_tensors",
                        lambda self, slot: {k: p.detach().clone() for k, p in named(self, slot).items()})
    with pytest.raises(HotSwapUnavailable, match="hot-swapped adapter did not change its row's logits"):
        engine.check_hot_swap()


def test_a_lora_that_leaks_into_base_rows_is_caught(engine, monkeypatch):
    monkeypatch.setattr(Engine, "_adapter_names", lambda self, versions: None)  # no per-row routing
    with pytest.raises(HotSwapUnavailable, match="changed"):
        engine.check_hot_swap()


def test_serve_refuses_to_start_without_hot_swap(tiny_model_dir, tmp_path):
    """The real `chatloop serve`, with peft's hot-swap broken (refusing every state dict)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import peft.utils.hotswap
        def hotswap_adapter_from_state_dict(*args, **kwargs):
            raise RuntimeError("Hot swapping the adapter did not succeed: this peft is broken")
        peft.utils.hotswap.hotswap_adapter_from_state_dict = hotswap_adapter_from_state_dict
    """))
    port = free_port()
    env = dict(os.environ, CHATLOOP_ADMIN_TOKEN=ADMIN_TOKEN,
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "chatloop.cli", "serve", "--host", "127.0.0.1",
                           "--port", str(port), "--data-dir", str(tmp_path / "data"),
                           "--model", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert VERSIONS in proc.stderr and "this peft is broken" in proc.stderr
    assert "make setup" in proc.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_the_lock_pins_what_is_installed():
    """The test environment is the lock's: every pinned package at its pinned version."""
    from importlib.metadata import distributions

    locked = parse_pins((REPO / "requirements.lock").read_text())
    assert locked["transformers"] == transformers.__version__ and locked["peft"] == peft.__version__
    installed = {d.metadata["Name"]: d.version for d in distributions()}
    installed = parse_pins("\n".join(f"{n}=={v}" for n, v in installed.items()))
    moved = [row for row in diff(locked, installed) if row[1] != "-"]
    assert not moved, f"installed versions differ from requirements.lock: {moved}"


def test_lockdiff_reads_pins_and_reports_moves():
    text = "# comment\nFoo_Bar==1.0 \\\n    --hash=sha256:00\nbaz==2.0 ; python_version < '4'\n"
    assert parse_pins(text) == {"foo-bar": "1.0", "baz": "2.0"}
    assert diff({"foo-bar": "1.0", "baz": "2.0"}, {"foo-bar": "1.1", "qux": "3"}) == [
        ("baz", "2.0", "-"), ("foo-bar", "1.0", "1.1"), ("qux", "-", "3")]
