"""A canvas constraint's host work (masks, commit passes) runs off the engine thread: while one request
waits for it, the others keep stepping and finish; the waiting request's output is unchanged."""

from __future__ import annotations

import asyncio
import threading

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
