"""/metrics' finished-request counters only rise (Prometheus reads a fall as a restart): a "length" end of a
request whose caller has stop strings is counted once the caller's stop-cancel has relabelled it "stop", or
after LATE_STOP_S without one; other ends count at once."""

from __future__ import annotations

import asyncio
import time

from canvaslm.engine import engine as engine_module
from canvaslm.engine.engine import Engine, EngineConfig, GenerationRequest
from canvaslm.llm import SamplingParams


def test_a_relabelled_length_end_never_lowers_a_counter(llm, monkeypatch):
    monkeypatch.setattr(engine_module, "LATE_STOP_S", 0.5)
    C = llm.cfg.canvas_length
    sp = SamplingParams(seed=1, max_new_tokens=C, max_denoising_steps=2)
    engine = Engine(llm.model, EngineConfig(max_batch=2, max_model_len=128)).start()
    stats = engine.stats
    seen = []

    def request(rid, late):  # no EOS: every one ends at its length
        return GenerationRequest(rid, tuple(llm.encode_prompt("count me")), sp.resolve(llm.defaults), sp.seed, (),
                                 stops_late=late)

    async def main():
        _, fin = await engine.run(request("plain", False))
        seen.append(dict(stats.requests_finished))
        assert fin.reason == "length"
        _, fin = await engine.run(request("relabelled", True))
        assert fin.reason == "length"
        seen.append(dict(stats.requests_finished))
        engine.cancel("relabelled", "stop")  # the caller found its stop string in the last canvas
        _, fin = await engine.run(request("unrelabelled", True))
        seen.append(dict(stats.requests_finished))
        await asyncio.sleep(1.5)  # past LATE_STOP_S (the idle engine wakes every 0.5 s)
        seen.append(dict(stats.requests_finished))

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 10
        while engine._length_ends and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        engine.shutdown()
    length = [s.get("length", 0) for s in seen]
    stop = [s.get("stop", 0) for s in seen]
    assert length == [1, 1, 1, 2], seen  # the relabelled one never counted as "length"
    assert stop == [0, 0, 1, 1], seen
