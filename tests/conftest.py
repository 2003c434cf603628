"""Shared fixtures: a tiny model on disk, settings on a temp data dir, a fresh store, a service
behind a TestClient, and a live service (``chatloop serve`` in a subprocess)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_model  # noqa: E402

from chatloop.config import Settings, TrainingDefaults  # noqa: E402
from chatloop.store import GenerationRecord, Store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
ADMIN_TOKEN = "test-operator-token"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir, tmp_path_factory):
    from chatloop.models import load_model

    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("models"))


@pytest.fixture
def store(tmp_path):
    """A fresh feedback log in a temporary data directory."""
    s = Store(tmp_path / "data" / "chatloop.duckdb")
    yield s
    s.close()


@contextmanager
def api_client(model_dir: Path, directory: Path, raise_server_exceptions: bool = True, training=None,
               **changes):
    """A started Service on ``directory`` with the tiny model and the HTTP app in a TestClient
    (``client.service`` is the service); ``changes`` replace settings (``limits=Limits(...)``),
    ``training`` is a dict of [training] settings."""
    from fastapi.testclient import TestClient

    from chatloop.models import load_model
    from chatloop.service import Service
    from chatloop.web import create_app

    settings = make_settings(directory / "data", model_dir, **(training or {})).replace(**changes)
    service = Service(settings, load_model(str(model_dir), directory / "models")).start()
    try:
        with TestClient(create_app(service, ADMIN_TOKEN), raise_server_exceptions=raise_server_exceptions) as c:
            c.service = service
            yield c
    finally:
        service.close()


def make_settings(data_dir: Path, model: Path, **training) -> Settings:
    t = dict(min_pairs=2, epochs=2, batch_size=4, learning_rate=1e-3, max_reply_tokens=32,
             max_prompt_tokens=128)
    t.update(training)
    return Settings(data_dir=data_dir, model=str(model), admin_token=ADMIN_TOKEN,
                    training=TrainingDefaults(**t))


def generation(context, reply="a reply", adapter="base") -> GenerationRecord:
    """A generation record as the engine would produce it (tests that write the log directly)."""
    return GenerationRecord(context=context, reply=reply, model="m", adapter_version=adapter,
                            settings={"temperature": 0.7}, prompt_tokens=5, completion_tokens=2,
                            ttft_ms=1.0, latency_ms=3.0, finish_reason="stop")


def log_reply(store: Store, conv: str, context, reply: str) -> str:
    """Store one reply to ``context``; returns its message id."""
    return store.record_exchange(conv, generation(context, reply))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    data_dir: Path
    token: str
    proc: subprocess.Popen
    env: dict

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "chatloop.cli", *args, "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, timeout=timeout, env=self.env)


# the test suite's quick settings for tiny models: few pairs, a fast learning rate, short replies
QUICK_ENV = {"CHATLOOP_TRAINING__MIN_PAIRS": "2", "CHATLOOP_TRAINING__LEARNING_RATE": "0.001",
             "CHATLOOP_TRAINING__MAX_REPLY_TOKENS": "32", "CHATLOOP_GENERATION__MAX_TOKENS": "12"}


def start_server(data_dir: Path, model: str, extra_env: dict | None = None, token: str = ADMIN_TOKEN,
                 timeout: float = 120, quick: bool = True) -> LiveServer:
    """`chatloop serve` on a free loopback port. ``quick`` applies ``QUICK_ENV`` (tests on tiny
    models); a benchmark passes ``quick=False`` to measure the product's own defaults."""
    port = free_port()
    env = dict(os.environ, CHATLOOP_ADMIN_TOKEN=token, PYTHONUNBUFFERED="1", **(QUICK_ENV if quick else {}))
    env.update(extra_env or {})
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir.parent / f"server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "chatloop.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--data-dir", str(data_dir), "--model", model],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log.name).read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return LiveServer(url, data_dir, token, proc, env)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start: {Path(log.name).read_text()[-3000:]}")


def stop_server(server: LiveServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture
def live_server(tmp_path, tiny_model_dir):
    server = start_server(tmp_path / "data", str(tiny_model_dir))
    yield server
    stop_server(server)
