"""The engine thread never leaves a caller waiting: a bug outside the runner's step fails the requests of
that iteration and the engine goes on; a thread that stops anyway ends every listener with an error, and a
stopped engine answers new requests at once ("cancelled", the server's 503) instead of queueing them."""

from __future__ import annotations

import asyncio

import pytest

from canvaslm.engine.engine import ENGINE_DOWN, SHUTTING_DOWN, Engine, EngineConfig, GenerationRequest
from canvaslm.llm import SamplingParams

WAIT_S = 60  # a hang fails the test instead of stalling the run


@pytest.fixture
def engine(llm):
    # one slot: requests run one after another, never in the same plan as the failing one
    engine = Engine(llm.model, EngineConfig(max_batch=1, max_model_len=128, prefix_caching=False)).start()
    yield engine
    engine.shutdown()


def request(llm, rid: str, seed: int = 1) -> GenerationRequest:
    sp = SamplingParams(seed=seed, max_new_tokens=2 * llm.cfg.canvas_length, max_denoising_steps=2)
    return GenerationRequest(rid, tuple(llm.encode_prompt(f"prompt {seed}")), sp.resolve(llm.defaults), seed, ())


def run_all(engine, *requests):
    async def main():
        return await asyncio.wait_for(asyncio.gather(*(engine.run(r) for r in requests)), WAIT_S)

    return asyncio.run(main())


def test_a_bookkeeping_failure_fails_its_request_only(llm, engine, monkeypatch):
    alone = run_all(engine, request(llm, "a", 1), request(llm, "b", 2))
    commit = engine.scheduler._commit

    def failing_commit(state, tokens, reason):
        if state.request_id == "bad":
            raise RuntimeError("injected bookkeeping failure")
        return commit(state, tokens, reason)

    monkeypatch.setattr(engine.scheduler, "_commit", failing_commit)
    bad, a, b = run_all(engine, request(llm, "bad", 3), request(llm, "a2", 1), request(llm, "b2", 2))
    assert bad[1].reason == "error" and "injected bookkeeping failure" in bad[1].message, bad
    assert [(tokens, fin.reason) for tokens, fin in (a, b)] == [(tokens, fin.reason) for tokens, fin in alone]
    (after, fin), = run_all(engine, request(llm, "after", 1))
    assert (after, fin.reason) == (alone[0][0], alone[0][1].reason)
    assert engine.alive and engine.num_running == engine.num_waiting == 0


def test_a_thread_that_stops_ends_its_listeners_and_refuses_new_requests(llm, engine, monkeypatch):
    def broken_plan(hold=frozenset()):
        raise RuntimeError("the scheduler is broken")

    monkeypatch.setattr(engine.scheduler, "plan", broken_plan)  # every iteration fails: the thread gives up
    ends = run_all(engine, request(llm, "x", 1), request(llm, "y", 2))
    for tokens, fin in ends:
        assert (tokens, fin.reason) == ([], "error"), fin
        assert fin.message == "the engine thread failed: RuntimeError: the scheduler is broken", fin
    engine._thread.join(WAIT_S)
    assert not engine.alive
    (tokens, fin), = run_all(engine, request(llm, "late", 1))  # answered at once, not queued for nobody
    assert (tokens, fin.reason, fin.message) == ([], "cancelled", ENGINE_DOWN)
    with pytest.raises(RuntimeError, match="shut down"):
        engine.call(lambda model: 0)


def test_a_request_after_shutdown_is_answered_not_queued(llm, engine):
    engine.shutdown()
    (tokens, fin), = run_all(engine, request(llm, "late", 1))
    assert (tokens, fin.reason, fin.message) == ([], "cancelled", SHUTTING_DOWN)
