"""A canvas constraint's host work (masks, commit passes) runs off the engine thread: while one request
waits for it, the others keep stepping and finish; the waiting request's output is unchanged."""

from __future__ import annotations

import asyncio
import threading

import pytest

from canvaslm.engine.engine import Engine, EngineConfig, GenerationRequest
from canvaslm.llm import SamplingParams
from canvaslm.sampling.constraints import PinnedConstraint

from .test_runner import run_all


class Gated:
    """A constraint whose host work cannot end before `gate` opens; it records where it ran."""

    def __init__(self, inner, gate: threading.Event):
        self.inner, self.gate, self.calls = inner, gate, []

    def canvas(self, k, C, V):
        self.calls.append(("canvas", k, threading.current_thread().name))
        assert self.gate.wait(60), "the gate never opened"
        return self.inner.canvas(k, C, V)

    def commit(self, k, ids, logits):
        self.calls.append(("commit", k, threading.current_thread().name))
        return self.inner.commit(k, ids, logits)


def test_other_requests_finish_while_a_constraint_works(llm):
    C = llm.cfg.canvas_length
    pins = {1: 7, C + 2: 9, 2 * C: 11}
    gate = threading.Event()
    gated = Gated(PinnedConstraint(pins), gate)
    slow = SamplingParams(seed=3, max_new_tokens=3 * C, max_denoising_steps=4, constraint=gated)
    fast = SamplingParams(seed=4, max_new_tokens=2 * C, max_denoising_steps=4)
    prompts = ["a constrained request", "a plain request"]
    engine = Engine(llm.model, EngineConfig(max_batch=4, max_model_len=256, constraint_worker=True)).start()

    async def main():
        reqs = [GenerationRequest(f"r{i}", tuple(llm.encode_prompt(prompt)), sp.resolve(llm.defaults), sp.seed,
                                  llm.eos_ids, constraint=sp.constraint)
                for i, (prompt, sp) in enumerate(zip(prompts, (slow, fast)))]
        held = asyncio.ensure_future(engine.run(reqs[0]))
        plain = await asyncio.wait_for(engine.run(reqs[1]), 120)  # while the constraint's first mask is held
        assert not held.done() and not gate.is_set()  # the constrained request is still waiting
        assert engine.runner.held() == {"r0"}
        gate.set()
        return await asyncio.wait_for(held, 120), plain

    try:
        (tokens, fin), (plain_tokens, plain_fin) = asyncio.run(main())
    finally:
        gate.set()
        engine.shutdown()
    states, _, _ = run_all(llm, [(prompts[0], SamplingParams(seed=3, max_new_tokens=3 * C, max_denoising_steps=4,
                                                             constraint=PinnedConstraint(pins))),
                                 (prompts[1], fast)], 256)
    assert tokens == states[0].output_ids and fin.reason == states[0].finish_reason
    assert plain_tokens == states[1].output_ids and plain_fin.reason == states[1].finish_reason
    assert all(tokens[off] == t for off, t in pins.items() if off < len(tokens))
    kinds = {(kind, k) for kind, k, _ in gated.calls}
    assert ("canvas", 0) in kinds and ("commit", 0) in kinds
    assert all(thread.startswith("canvaslm-constraint") for _, _, thread in gated.calls)


class Failing:
    """A constraint whose mask or commit pass for canvas `k` raises; otherwise `inner`'s."""

    def __init__(self, inner, kind: str, k: int):
        self.inner, self.kind, self.k = inner, kind, k

    def canvas(self, k, C, V):
        if (self.kind, self.k) == ("mask", k):
            raise RuntimeError("mask broke on purpose")
        return self.inner.canvas(k, C, V)

    def commit(self, k, ids, logits):
        if (self.kind, self.k) == ("commit", k):
            raise RuntimeError("commit broke on purpose")
        return self.inner.commit(k, ids, logits)


@pytest.mark.parametrize("worker", [False, True])
@pytest.mark.parametrize("kind,k", [("mask", 0), ("mask", 1), ("commit", 0)])
def test_a_failing_constraint_fails_only_its_request(llm, worker, kind, k):
    """Constraint work that raises (a bug, a limit) ends its own request with an error naming the work;
    the requests batched with it finish with the tokens they get alone."""
    C = llm.cfg.canvas_length
    pins = {1: 7, C + 2: 9}
    bad = SamplingParams(seed=3, max_new_tokens=3 * C, max_denoising_steps=4,  # no EOS before the failing canvas
                         constraint=Failing(PinnedConstraint(pins, ban_ids=llm.eos_ids, ban_until=2 * C), kind, k))
    plain = [SamplingParams(seed=4, max_new_tokens=2 * C, max_denoising_steps=4),
             SamplingParams(seed=5, max_new_tokens=C, max_denoising_steps=3, constraint=PinnedConstraint({0: 5}))]
    prompts = ["a request whose constraint fails", "a plain request", "a pinned request"]
    engine = Engine(llm.model, EngineConfig(max_batch=4, max_model_len=256, constraint_worker=worker)).start()

    async def main():
        reqs = [GenerationRequest(f"r{i}", tuple(llm.encode_prompt(prompt)), sp.resolve(llm.defaults), sp.seed,
                                  llm.eos_ids, constraint=sp.constraint)
                for i, (prompt, sp) in enumerate(zip(prompts, (bad, *plain)))]
        return await asyncio.wait_for(asyncio.gather(*(engine.run(r) for r in reqs)), 240)

    try:
        results = asyncio.run(main())
        assert engine.alive
        again = asyncio.run(asyncio.wait_for(engine.run(GenerationRequest(
            "after", tuple(llm.encode_prompt(prompts[1])), plain[0].resolve(llm.defaults), plain[0].seed,
            llm.eos_ids)), 120))
    finally:
        engine.shutdown()
    (bad_tokens, bad_fin), *good = results
    assert bad_fin.reason == "error"
    what = "mask" if kind == "mask" else "commit pass"
    assert f"{what} for canvas {k} failed" in bad_fin.message and f"{kind} broke on purpose" in bad_fin.message
    assert len(bad_tokens) == k * C  # the canvases before the failing one were committed
    states, _, _ = run_all(llm, list(zip(prompts[1:], plain)), 256)
    for (tokens, fin), st in zip(good, states):
        assert fin.reason == st.finish_reason != "error" and tokens == st.output_ids
    assert again[0] == states[0].output_ids  # the engine keeps serving
