"""A server that stops (SIGTERM to `canvaslm serve`, BackgroundServer.stop) ends the generations under way
first: a stream gets its in-band 503 "the server is shutting down" and [DONE], a plain request a JSON 503,
and the process exits promptly (rc 0) instead of running the longest request to its end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import httpx

from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state, free_port

from .conftest import wait_until_healthy

LONG = {"max_tokens": 1500, "ignore_eos": True, "max_denoising_steps": 256}  # minutes on the tiny model


def stream_lines(base: str, body: dict, started: threading.Event, out: list) -> None:
    """The stream's data lines into `out`; `started` once the first content arrived."""
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line.removeprefix("data: "))
                if len(out) > 1:
                    started.set()
    started.set()


def post(base: str, body: dict, out: list) -> None:
    r = httpx.post(base + "/v1/completions", json=body, timeout=120)
    out.append((r.status_code, r.headers.get("content-type"), r.text))


def assert_ended_by_shutdown(lines: list, plain: list) -> None:
    assert lines[-1] == "[DONE]", lines[-3:]
    assert "shutting down" in json.loads(lines[-2])["error"]["message"], lines[-3:]
    (status, content_type, text), = plain
    assert (status, content_type) == (503, "application/json"), (status, text)
    assert "the server is shutting down" in json.loads(text)["error"]["message"]


def start_requests(base: str, model: str):
    lines, plain, started = [], [], threading.Event()
    threads = [threading.Thread(target=stream_lines, args=(base, {"model": model, "prompt": "a", **LONG}, started,
                                                           lines)),
               threading.Thread(target=post, args=(base, {"model": model, "prompt": "b", **LONG}, plain))]
    for t in threads:
        t.start()
    assert started.wait(60), "the stream never started"
    return threads, lines, plain


def test_sigterm_ends_the_requests_under_way_and_exits(tiny_checkpoint):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "canvaslm.cli", "serve", str(tiny_checkpoint), "--port", str(port),
                             "--device", "cpu", "--max-batch", "2", "--max-model-len", "2048",
                             "--max-steps-limit", "1024", "--served-model-name", "tiny", "--shutdown-timeout", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = wait_until_healthy(proc, port)
        threads, lines, plain = start_requests(base, "tiny")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5 + 15) == 0, proc.stdout.read().decode()[-2000:]  # the timeout plus a margin
        for t in threads:
            t.join(30)
        assert_ended_by_shutdown(lines, plain)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_background_server_stop_ends_the_requests_under_way(tiny_checkpoint):
    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=2048),
                        served_model_name="tiny", max_denoising_steps=1024)
    srv = BackgroundServer(state).start()
    try:
        threads, lines, plain = start_requests(srv.base_url, "tiny")
    finally:
        srv.stop()
    for t in threads:
        t.join(30)
    assert_ended_by_shutdown(lines, plain)
