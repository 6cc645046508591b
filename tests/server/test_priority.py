"""`priority` (vLLM's field): with the only slot busy, a later request with a lower priority value is
admitted before an earlier one with a higher value (the gap is wide enough that aging, one step per
max_wait_plans plans waited, cannot close it within the test)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state


@pytest.fixture(scope="module")
def one_slot(tiny_checkpoint, one_thread):
    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=256),
                        served_model_name="tiny", max_denoising_steps=64)
    with BackgroundServer(state) as srv:
        yield srv


def test_lower_priority_value_goes_first(one_slot):
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 16, "seed": 1}
    long = {**body, "max_tokens": 64, "max_denoising_steps": 64, "confidence_threshold": 1e-9}
    done: list[str] = []

    async def send(client, name, payload, delay):
        await asyncio.sleep(delay)
        r = await client.post(one_slot.base_url + "/v1/completions", json=payload, timeout=120)
        assert r.status_code == 200, r.text
        done.append(name)

    async def main():
        async with httpx.AsyncClient() as client:
            engine = one_slot.state.engine
            first = asyncio.create_task(send(client, "busy", long, 0))
            while engine.num_running == 0:  # the slot is taken
                await asyncio.sleep(0.01)
            await asyncio.gather(first, send(client, "late-low", {**body, "priority": 1000}, 0),
                                 send(client, "later-high", {**body, "priority": -1000}, 0.2))

    asyncio.run(main())
    assert done == ["busy", "later-high", "late-low"]


def test_priority_must_be_an_int(one_slot):
    r = httpx.post(one_slot.base_url + "/v1/completions", json={"model": "tiny", "prompt": "a", "priority": "high"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
