"""``chatloop serve``: the composition root that wires the service, the HTTP app, the UI and the
scheduler together, and runs them on one port.

Invariants: local mode (no operator token configured) binds to loopback only and generates a
token for the run, kept in the data directory's ``service.json`` (mode 0600).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import sys
import time

from chatloop.config import Settings

log = logging.getLogger("chatloop")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> int:
    import gradio as gr
    import uvicorn

    from chatloop.web import create_app
    from chatloop.hotswap_check import HotSwapUnavailable
    from chatloop.requestguard import guarded_protocol
    from chatloop.service import Service
    from jobs.scheduler import RetrainScheduler
    from ui.app import build_ui

    token = settings.admin_token
    if not token and settings.local_mode:
        if not _is_loopback(settings.host):
            print(f"error: local mode (operator access without a token) only binds to loopback, not "
                  f"{settings.host}; set CHATLOOP_ADMIN_TOKEN to serve operators elsewhere", file=sys.stderr)
            return 2
        token = secrets.token_urlsafe(18)
        log.warning("local mode on %s: generated an operator token for this run (it is in %s, mode 0600)",
                    settings.host, settings.service_file)
    elif not token:
        log.warning("no operator token configured: admin routes and the Admin tab are disabled "
                    "(set CHATLOOP_ADMIN_TOKEN, or use --local on loopback)")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    t0 = time.perf_counter()
    service = Service(settings)
    try:
        service.start()
    except HotSwapUnavailable as exc:
        service.close()
        print(f"error: {exc}", file=sys.stderr)
        return 3
    log.info("model %s loaded in %.1f s on %s (%s, served weights %s); serving adapter %s", service.model_name,
             service.load_s, service.loaded.device, service.loaded.dtype, service.serve_weights,
             service.active_version)
    scheduler = RetrainScheduler(settings, service.retrainer, service.store,
                                 poll_seconds=max(1.0, settings.schedule_poll_seconds)).start()
    app = create_app(service, token, scheduler)
    demo = build_ui(service, token, scheduler)
    # run_history=False: Gradio 6 would keep every handler's inputs and outputs (the operator
    # token, SQL results) in the browser's localStorage; it also clears what an older run kept
    app = gr.mount_gradio_app(app, demo, path="/", run_history=False)

    url = f"http://{settings.host}:{settings.port}"
    info = {"url": url, "pid": os.getpid(), "admin_token": token, "started_at": time.time()}
    settings.service_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.service_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    print(f"chatloop ready in {time.perf_counter() - t0:.1f} s: {url}  (model {service.model_name}, "
          f"adapter {service.active_version})", flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                    http=guarded_protocol(settings.limits.request_read_timeout_s))
    finally:
        scheduler.shutdown()
        service.close()
        try:
            if json.loads(settings.service_file.read_text()).get("pid") == os.getpid():
                settings.service_file.unlink()
        except (OSError, ValueError):
            pass
    return 0
