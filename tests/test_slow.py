"""The real default model (SmolLM2-135M-Instruct from its GGUF): conversion, reload, a correct answer."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from conftest import start_server, stop_server

pytestmark = pytest.mark.slow


def test_default_model_converts_once_and_knows_the_capital_of_france(tmp_path):
    from chatloop.models import load_model

    t0 = time.perf_counter()
    first = load_model("default", tmp_path / "models")
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_model("default", tmp_path / "models")
    second_s = time.perf_counter() - t0
    print(f"default model: first load {first_s:.1f} s (with conversion), second {second_s:.1f} s")
    assert second_s < first_s
    assert list((tmp_path / "models").glob("*/model.safetensors"))
    assert first.name == "SmolLM2-135M-Instruct"


def test_service_on_the_default_model_answers_paris(tmp_path):
    server = start_server(tmp_path / "data", "default", timeout=300)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        r = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30, temperature=0.0)
        assert "paris" in r.choices[0].message.content.lower()
        assert r.model == "SmolLM2-135M-Instruct" and r.model_extra["chatloop_adapter"] == "base"
        assert httpx.get(server.url + "/").status_code == 200  # the UI is served too
    finally:
        stop_server(server)
