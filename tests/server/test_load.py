"""A short version of bench/serve_load.py: 8 streaming clients for 5 s against a tiny model on loopback.
No failed requests, every stream equal to its seed's non-streamed replay, memory flat across rounds."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_short_load_run(tiny_checkpoint, one_thread):
    bench = load_bench()
    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=8, max_model_len=128),
                        served_model_name="load")
    with BackgroundServer(state) as srv:
        rep = asyncio.run(bench.run_load(srv.base_url, "load", clients=8, duration=5.0, rounds=3))
        engine = srv.state.engine
        assert engine.num_running == 0 and engine.num_waiting == 0 and engine.scheduler.kv_used == 0
    assert rep.failed == 0, rep.errors
    assert rep.mismatched == 0, rep.errors
    assert rep.requests >= 8 and rep.tokens > 0
    assert rep.rss_growth_mib < 64, rep.rss_mib_per_round
