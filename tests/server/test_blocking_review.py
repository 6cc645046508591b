"""Slow work never stalls unrelated requests: constraint compiles run on their own pool (their limit counted
from arrival, a busy compiler refused fast), a JSON schema's compile stops at --regex-timeout, and /tokenize
/ /detokenize encode and write their replies off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import time

import httpx
import pytest

from canvaslm.server.launch import BackgroundServer, build_state

TIMEOUT = 4.0  # the server's --regex-timeout
SLOW = "(a|b)*a" + "(a|b)" * 18  # 2**19 automaton states: its compile runs until it is killed


@pytest.fixture(scope="module")
def server(tiny_checkpoint, one_thread):
    with BackgroundServer(build_state(tiny_checkpoint, "cpu", "float32", served_model_name="tiny",
                                      regex_timeout=TIMEOUT)) as srv:
        yield srv


def _post(srv, path: str, body: dict, timeout: float = 60) -> tuple:
    start = time.monotonic()
    r = httpx.post(srv.base_url + path, json=body, timeout=timeout)
    return r, time.monotonic() - start


def test_slow_compiles_leave_plain_requests_alone(server):
    """More slow regex requests than asyncio's default pool has threads (min(32, cores + 4)): a plain
    completion meanwhile is not queued behind them, the two compiling end at their limit counted from
    arrival, and the others are refused as busy (503) as turns stay taken, not each after the whole limit."""
    n = min(32, (os.cpu_count() or 1) + 4) + 2
    with cf.ThreadPoolExecutor(n) as pool:
        slow = [pool.submit(_post, server, "/v1/completions", dict(model="tiny", prompt="x", max_tokens=32,
                                                                  guided_regex=SLOW + "c" * i)) for i in range(n)]
        time.sleep(0.5)
        r, took = _post(server, "/v1/completions", dict(model="tiny", prompt="plain", max_tokens=8))
        assert r.status_code == 200 and took < TIMEOUT / 2
        answers = [f.result() for f in slow]
    timed_out = [t for r, t in answers if r.status_code == 400]
    busy = [t for r, t in answers if r.status_code == 503]
    assert len(timed_out) + len(busy) == n and len(timed_out) <= 2, [(r.status_code, r.text) for r, _ in answers]
    assert all(t < TIMEOUT + 2 for t in timed_out)
    assert busy and all(t < TIMEOUT + 2 for t in busy) and min(busy) < TIMEOUT / 2
    assert all("already running" in r.json()["error"]["message"] for r, _ in answers if r.status_code == 503)


def test_a_schema_compile_stops_at_the_limit(server, monkeypatch):
    """A huge enum (minutes to compile once) ends in a 400 naming guided_json at --regex-timeout."""
    monkeypatch.setattr(server.state, "regex_timeout", 0.2)
    schema = {"type": "string", "enum": [f"v{i:05d}" for i in range(30000)]}
    r, took = _post(server, "/v1/completions", dict(model="tiny", prompt="x", max_tokens=32, guided_json=schema),
                    timeout=30)
    assert r.status_code == 400 and took < 10, r.text
    error = r.json()["error"]
    assert error["param"] == "guided_json" and "longer than the limit of 0.2 s" in error["message"]


def test_tokenize_runs_off_the_event_loop(server, monkeypatch):
    """Encoding, decoding and the reply's JSON of a large document run in worker threads: /health answers
    meanwhile (a 2 MB document held the loop for seconds)."""
    tok = server.state.tokenizer
    threads = []

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    def encode(*args, **kwargs):
        threads.append(on_loop())
        return type(tok).encode(tok, *args, **kwargs)

    def decode(*args, **kwargs):
        threads.append(on_loop())
        return type(tok).decode(tok, *args, **kwargs)

    monkeypatch.setattr(tok, "encode", encode, raising=False)
    monkeypatch.setattr(tok, "decode", decode, raising=False)
    big = "hello world " * 150_000
    with cf.ThreadPoolExecutor(1) as pool:
        job = pool.submit(_post, server, "/tokenize", dict(model="tiny", prompt=big))
        time.sleep(0.3)
        waits = []
        while not job.done():
            waits.append(_post_health(server))
        r, _ = job.result()
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) > 100_000
    assert max(waits, default=0) < 1.0, waits
    r, _ = _post(server, "/detokenize", dict(model="tiny", tokens=r.json()["tokens"][:1000]))
    assert r.status_code == 200 and r.json()["prompt"] == big[:1000]
    assert threads and not any(threads)  # no encode / decode on the event loop's thread


def _post_health(srv) -> float:
    start = time.monotonic()
    httpx.get(srv.base_url + "/health", timeout=60)
    took = time.monotonic() - start
    time.sleep(0.05)
    return took
