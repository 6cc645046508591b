"""Runner tests: Scheduler + Runner on a tiny random checkpoint, compared with `LLM.generate`.

Bitwise equality with `LLM.generate` needs the same attention geometry: generate allocates a KV cache of
prompt + whole canvases, and the kernel's reduction order depends on the cache length (ulp-level
differences that self-conditioning amplifies on random weights). So equality tests give the runner
exactly that `max_model_len`, and prompts of >= 16 tokens (generate encodes a lone prompt in one call,
and BLAS uses other kernels below ~16 rows; the runner pads small encoder calls to 16 rows so a prompt's
KV never depends on its batch-mates). Batch-invariance tests use any fixed geometry and compare a
request alone with the same request in a crowd.
"""

from __future__ import annotations

import pytest
import torch

from canvaslm.engine.request import RequestState
from canvaslm.engine.runner import Runner, RunnerError
from canvaslm.engine.scheduler import Scheduler
from canvaslm.llm import SamplingParams


def geometry(llm, prompt: str, max_new: int) -> int:
    C = llm.cfg.canvas_length
    return len(llm.encode_prompt(prompt)) + -(-max_new // C) * C


def run_all(llm, specs, max_model_len, max_batch=4, prefill_chunk=512, drafts=False):
    """specs: (prompt, SamplingParams) -> (RequestStates, runner, drafts seen)."""
    C = llm.cfg.canvas_length
    runner = Runner(llm.model, num_slots=max_batch, max_model_len=max_model_len, history_depth=1)
    sched = Scheduler(max_batch, max_batch * max_model_len, max_batch, prefill_chunk, C)
    states = []
    for i, (prompt, sp) in enumerate(specs):
        p = sp.resolve(llm.defaults)
        st = RequestState(f"r{i}", llm.encode_prompt(prompt), p.max_new_tokens, C, p.max_denoising_steps)
        sched.add(st)
        runner.add(st.request_id, p, sp.seed, llm.eos_ids, sp.constraint, drafts=drafts,
                   logit_bias=tuple((sp.logit_bias or {}).items()), min_tokens=sp.min_tokens or 0)
        states.append(st)
    seen, plans = [], 0
    while (plan := sched.plan()) is not None:
        out = runner.execute(plan)
        seen += out.drafts
        sched.update(plan, out.result)
        plans += 1
        assert plans < 10_000
    return states, runner, seen


CASES = [("Hello there, general Kenobi", SamplingParams(seed=1, max_new_tokens=32, max_denoising_steps=8)),
         ("abc, then some more", SamplingParams(seed=2, max_new_tokens=20, max_denoising_steps=4, temperature=0.7)),
         ("The quick brown fox jumps", SamplingParams(seed=3, max_new_tokens=48, max_denoising_steps=8)),
         ("zz top of the charts", SamplingParams(seed=5, max_new_tokens=64, max_denoising_steps=3, entropy_bound=0.5))]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_single_request_equals_llm_generate(llm, case):
    prompt, sp = CASES[case]
    want = llm.generate(prompt, sp)[0]
    (got,), runner, _ = run_all(llm, [(prompt, sp)], geometry(llm, prompt, sp.max_new_tokens), max_batch=1)
    assert got.output_ids == want.token_ids
    assert got.finish_reason == want.finish_reason


def test_equals_llm_generate_while_batched_with_others(llm):
    """The probe shares every encoder/decoder call with requests of other lengths, steps and temperatures."""
    probe = ("Hello there, general Kenobi", SamplingParams(seed=11, max_new_tokens=40, max_denoising_steps=6))
    want = llm.generate(*probe)[0]
    others = [("a", SamplingParams(seed=1, max_new_tokens=16, max_denoising_steps=3)),
              ("a much longer prompt!", SamplingParams(seed=2, max_new_tokens=24, max_denoising_steps=8,
                                                      temperature=1.5)),
              ("xy", SamplingParams(seed=3, max_new_tokens=40, max_denoising_steps=5, entropy_bound=1.0))]
    S = geometry(llm, probe[0], 40)
    for order in ([probe] + others, others + [probe], others[:1] + [probe] + others[1:]):
        states, _, _ = run_all(llm, order, S, max_batch=4)
        got = states[order.index(probe)]
        assert got.output_ids == want.token_ids and got.finish_reason == want.finish_reason


def test_top_k_top_p_min_p_match_generate_while_batched(llm):
    """Cuts are per row: each probe equals LLM.generate alone while sharing steps with rows that cut
    differently or not at all."""
    specs = [("Hello there, general Kenobi", SamplingParams(seed=11, max_new_tokens=40, top_p=0.8)),
             ("Hello there, general Kenobi", SamplingParams(seed=12, max_new_tokens=40, top_k=5, min_p=0.05)),
             ("Hello there, general Kenobi", SamplingParams(seed=13, max_new_tokens=40))]
    S = geometry(llm, specs[0][0], 40)
    states, _, _ = run_all(llm, specs, S, max_batch=3)
    for st, (prompt, sp) in zip(states, specs):
        want = llm.generate(prompt, sp)[0]
        assert st.output_ids == want.token_ids and st.finish_reason == want.finish_reason


def test_output_does_not_depend_on_batch_mates(llm):
    """At one fixed server geometry, a seeded request gives the same tokens alone and in any crowd."""
    probe = ("seeded request", SamplingParams(seed=7, max_new_tokens=48, max_denoising_steps=6))
    (alone,), _, _ = run_all(llm, [probe], 160, max_batch=1, prefill_chunk=4)  # the same server config
    crowd = [(f"other {i}" * (i + 1), SamplingParams(seed=100 + i, max_new_tokens=16 * (1 + i % 3),
                                                     max_denoising_steps=2 + i)) for i in range(5)]
    states, _, _ = run_all(llm, crowd[:2] + [probe] + crowd[2:], 160, max_batch=3, prefill_chunk=4)
    assert states[2].output_ids == alone.output_ids and states[2].finish_reason == alone.finish_reason


def test_encoder_calls_check_the_cache_limit_from_host_values(llm, monkeypatch):
    """The runner hands every encode its largest position from host values (no device read), and
    that value is the real one, so the cache limit is still checked."""
    from canvaslm.kv_cache import KVCache

    seen, check = [], KVCache.check_fits

    def spy(self, q_pos, top=None):
        seen.append((top, int(q_pos.max())))
        return check(self, q_pos, top)
    monkeypatch.setattr(KVCache, "check_fits", spy)
    run_all(llm, CASES[:3], 160, max_batch=3, prefill_chunk=4)
    assert len(seen) > 3 and all(top == real for top, real in seen)


def test_engine_steps_issue_no_syncing_op(llm, monkeypatch):
    """Prefill chunks, commits and decoder steps (with pins) run without an op that makes the host
    wait for the device, once the MoE runs a sync-free implementation (a GPU's grouped or Triton path;
    "dense" here). The stop-flag read at the end of a step is a plain copy, not such an op."""
    from canvaslm.testing import SyncRecorder

    recorder, execute = SyncRecorder(), Runner.execute

    def recorded(self, plan):
        with recorder:
            return execute(self, plan)
    monkeypatch.setattr(Runner, "execute", recorded)
    llm.model.set_moe_impl("dense")
    try:
        pins = llm.encode_prompt("OK:")
        specs = CASES[:2] + [("pinned", SamplingParams(seed=9, max_new_tokens=32, max_denoising_steps=4,
                                                        constraint=PinFirstTokens(pins)))]
        states, _, _ = run_all(llm, specs, 160, max_batch=3, prefill_chunk=4)
        assert recorder.found == []
        assert all(s.output_ids for s in states)
        llm.model.set_moe_impl("loop")  # the recorder does see the loop's per-expert nonzero
        run_all(llm, CASES[:1], 160, max_batch=1)
        assert "nonzero" in recorder.found
    finally:
        llm.model.set_moe_impl("auto")


def test_drafts_only_for_requests_that_ask_and_end_at_the_commit(llm):
    specs = [("draft me", SamplingParams(seed=4, max_new_tokens=32, max_denoising_steps=5))]
    states, _, drafts = run_all(llm, specs, 128, max_batch=1, drafts=True)
    assert drafts and all(d.request_id == "r0" for d in drafts)
    C = llm.cfg.canvas_length
    for k in range(-(-len(states[0].output_ids) // C)):
        last = [d for d in drafts if d.canvas_index == k][-1]  # the last draft of a canvas is what commits
        committed = states[0].output_ids[k * C:(k + 1) * C]
        assert list(last.token_ids[:len(committed)]) == committed
        steps = [d.denoise_step for d in drafts if d.canvas_index == k]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 5
    _, _, none = run_all(llm, specs, 128, max_batch=1, drafts=False)
    assert none == []


class PinFirstTokens:
    """A minimal constraint: canvas 0 starts with fixed ids; no vocabulary mask."""

    def __init__(self, ids):
        self.ids = ids

    def canvas(self, k, C, V):
        if k:
            return None, None
        pinned = torch.full((C,), -1, dtype=torch.long)
        pinned[:len(self.ids)] = torch.tensor(self.ids)
        return pinned, None


def test_constraint_pins_reach_the_sampler_and_match_generate(llm):
    pins = llm.encode_prompt("OK:")
    sp = SamplingParams(seed=9, max_new_tokens=32, max_denoising_steps=6, constraint=PinFirstTokens(pins))
    want = llm.generate("json please, quickly", sp)[0]
    (got,), _, _ = run_all(llm, [("json please, quickly", sp)], geometry(llm, "json please, quickly", 32), max_batch=1)
    assert got.output_ids[:len(pins)] == pins
    assert got.output_ids == want.token_ids


def test_stability_deeper_than_history_is_rejected(llm):
    runner = Runner(llm.model, num_slots=1, max_model_len=64, history_depth=1)
    p = llm.defaults.replace(stability_threshold=3)
    with pytest.raises(RunnerError, match="history_depth"):
        runner.add("x", p, 0, llm.eos_ids)


def test_engine_admission_waits_for_kv_budget_and_drops_nothing(llm):
    """A KV budget for one request at a time: the others wait in the queue, then all finish as if alone."""
    import asyncio

    from canvaslm.engine.engine import Commit, Engine, EngineConfig, Finish, GenerationRequest

    S = 64
    engine = Engine(llm.model, EngineConfig(max_batch=4, max_model_len=S, kv_budget_tokens=S)).start()
    specs = [(f"budget probe {i}", SamplingParams(seed=i, max_new_tokens=32, max_denoising_steps=4))
             for i in range(3)]

    async def main():
        loop, queues, waiting_seen = asyncio.get_running_loop(), [], 0
        for i, (prompt, sp) in enumerate(specs):
            q = asyncio.Queue()
            engine.submit(GenerationRequest(f"q{i}", tuple(llm.encode_prompt(prompt)), sp.resolve(llm.defaults),
                                            sp.seed, llm.eos_ids), q, loop)
            queues.append(q)
        outs = []
        for q in queues:
            tokens = []
            while True:
                ev = await q.get()
                waiting_seen = max(waiting_seen, engine.num_waiting)
                if isinstance(ev, Commit):
                    tokens += ev.token_ids
                if isinstance(ev, Finish):
                    outs.append((tokens, ev))
                    break
        return outs, waiting_seen

    try:
        outs, waiting_seen = asyncio.run(main())
    finally:
        engine.shutdown()
    assert waiting_seen >= 1  # the budget held requests back
    states, _, _ = run_all(llm, specs, S, max_batch=1)  # the same requests one after another
    for (tokens, fin), st in zip(outs, states):
        assert fin.reason in ("stop", "length") and fin.num_tokens == len(tokens)
        assert tokens == st.output_ids and fin.reason == st.finish_reason
    assert engine.scheduler.kv_used == 0 and engine.scheduler.num_free_slots == 4


def test_logit_bias_reaches_the_sampler_and_matches_generate(llm):
    prompt = "Hello there, general Kenobi"
    banned = set(llm.generate(prompt, SamplingParams(seed=4, max_new_tokens=32, max_denoising_steps=6))[0].token_ids)
    sp = SamplingParams(seed=4, max_new_tokens=32, max_denoising_steps=6, logit_bias={t: -100 for t in banned})
    want = llm.generate(prompt, sp)[0]
    (st,), runner, _ = run_all(llm, [(prompt, sp)], geometry(llm, prompt, 32), max_batch=1)
    assert st.output_ids == want.token_ids and not banned & set(st.output_ids)
    with pytest.raises(RunnerError, match="outside the vocabulary"):
        runner.add("c", sp.resolve(llm.defaults), 0, llm.eos_ids, logit_bias=((llm.cfg.vocab_size, 1.0),))


def test_min_tokens_in_the_runner_matches_generate(llm):
    prompt = "Hello there, general Kenobi"
    eos = llm.eos_ids[0]
    sp = SamplingParams(seed=9, max_new_tokens=40, max_denoising_steps=5, logit_bias={eos: 100}, min_tokens=19)
    want = llm.generate(prompt, sp)[0]
    assert len(want.token_ids) == 20 and want.token_ids[-1] == eos
    (st,), _, _ = run_all(llm, [(prompt, sp)], geometry(llm, prompt, 40), max_batch=1)
    assert st.output_ids == want.token_ids and st.finish_reason == "stop"


def test_engine_refuses_what_it_cannot_run_alone_and_keeps_serving(llm):
    """A request the engine cannot run fails at submission with an error naming why; the requests beside it
    (a running one with the same id, batch-mates) and the engine thread are untouched."""
    import asyncio

    from canvaslm.engine.engine import Engine, EngineConfig, GenerationRequest

    S = 64
    engine = Engine(llm.model, EngineConfig(max_batch=4, max_model_len=S, prefix_caching=False)).start()
    sp = SamplingParams(seed=1, max_new_tokens=32, max_denoising_steps=8, confidence_threshold=1e-9)
    ids = tuple(llm.encode_prompt("a long running request"))

    def req(rid, prompt=ids, seed=1, max_new=32):
        return GenerationRequest(rid, prompt, sp.resolve(llm.defaults).replace(max_new_tokens=max_new), seed,
                                 llm.eos_ids)

    async def main():
        first = asyncio.ensure_future(engine.run(req("a")))
        await asyncio.sleep(0.05)
        refused = [await asyncio.wait_for(engine.run(r), 60) for r in (
            req("a"),  # its id is running
            req("oov", (*ids, llm.cfg.vocab_size)),
            req("long", max_new=S),  # the prompt + 4 canvases is over max_model_len
            req("empty", ()),
            req("bad-seed", seed=True))]  # fails inside the runner (not a ValueError)
        return await asyncio.wait_for(first, 60), refused, await asyncio.wait_for(engine.run(req("b")), 60)

    try:
        first, refused, after = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [f.reason for _, f in refused] == ["error"] * 5
    messages = [f.message for _, f in refused]
    assert "request id 'a' is already running" in messages[0]
    assert f"outside the vocabulary [0, {llm.cfg.vocab_size})" in messages[1]
    assert "over max_model_len=64" in messages[2] and "prompt is empty" in messages[3] and messages[4]
    alone, _, _ = run_all(llm, [("a long running request", sp)], S)
    assert first[1].reason in ("stop", "length") and first[0] == alone[0].output_ids
    assert after[0] == alone[0].output_ids  # the engine thread lived on
    assert engine.scheduler.num_free_slots == 4


def test_sampling_params_refuse_a_bool_or_huge_seed_and_extreme_temperatures(llm):
    from canvaslm.generate import GenerationError

    for seed in (True, 2**64, -1, 1.5):
        with pytest.raises(GenerationError, match="SamplingParams.seed must be an integer in"):
            SamplingParams(seed=seed)
    for t in (float("inf"), float("nan"), 0.0):
        with pytest.raises(GenerationError, match="SamplingParams.temperature must be a finite number > 0"):
            SamplingParams(temperature=t)
    with pytest.raises(GenerationError, match="SamplingParams.temperature=1e-50 scales the schedule"):
        SamplingParams(temperature=1e-50).resolve(llm.defaults)
    assert SamplingParams(temperature=1e-3).resolve(llm.defaults).t_min > 0
