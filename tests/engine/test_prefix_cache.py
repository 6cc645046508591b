"""Prefix caching: a freed slot keeps its KV and a new request whose prompt starts with what the slot
holds skips encoding that part.

The scheduler tests drive plans against a simulated KV cache that stores, per slot, which token sits at
which position, in full layers and in a sliding ring of `ring` positions, exactly as `KVCache` keeps
them. Every encode and denoise item is checked against it: all the positions it reads must hold the
request's own tokens. The model tests run the real runner and compare with runs that do not reuse.
"""

from __future__ import annotations

import re

import random

import pytest
import torch

from canvaslm.engine.request import RequestState
from canvaslm.engine.runner import Runner
from canvaslm.engine.scheduler import Scheduler, StepPlan, StepResult


def canvas_tokens(rid: str, k: int, cl: int) -> tuple[int, ...]:
    return tuple((sum(map(ord, rid)) * 31 + k * 7 + i) % 5 + 10 for i in range(cl))


class KVSim:
    """A fake runner whose 'KV' is the token at each position of each slot (the runner's cache keeps every
    position one way or another); checks every read against the request's own tokens."""

    def __init__(self, sched: Scheduler, eos=lambda rid: None, store: tuple[int, int] | None = None):
        """store: (ring, store length) of a bounded prefix store to model: a reuse must find every position
        a rebuilt ring needs still in the slot's store (kv_cache's check)."""
        self.sched, self.eos, self.store_shape = sched, eos, store
        self.kv: dict[int, dict[int, int]] = {}  # slot -> position -> token
        self.store: dict[int, dict[int, int]] = {}  # slot -> position -> token, at most one per store column
        self.canvases: dict[str, int] = {}
        self.reads = self.restores = 0
        self.plans: list[StepPlan] = []

    def _check_context(self, slot, req, start):
        seq = req.prompt_ids + tuple(req.output_ids)
        kv = self.kv.get(slot, {})
        assert {p: kv.get(p) for p in range(start)} == {p: seq[p] for p in range(start)}, req.request_id
        assert all(p < start for p in kv), f"{req.request_id}: stale positions past {start}"
        self.reads += 1

    def _write(self, slot, start, tokens):
        self.kv.setdefault(slot, {}).update(enumerate(tokens, start))
        if self.store_shape:
            st = self.store.setdefault(slot, {})
            size = self.store_shape[1]
            for p, t in enumerate(tokens, start):
                for q in [q for q in st if q % size == p % size]:
                    del st[q]  # the column's previous position is overwritten
                st[p] = t

    def _restore(self, slot, keep):
        if not self.store_shape or not keep:
            return
        ring, size = self.store_shape
        st = self.store.get(slot, {})
        need = range(max(0, keep - ring), keep)
        assert all(p in st for p in need), f"slot {slot}: the store lost positions a reuse of {keep} needs"
        assert all(st[p] == self.kv[slot][p] for p in need)
        self.restores += 1
        self.store[slot] = {p: t for p, t in st.items() if p < keep}

    def run(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for slot in plan.freed_slots:
            self.kv.pop(slot, None)
            self.store.pop(slot, None)
        for src, dst, n in plan.copies:
            assert self.sched.get(next(r for r in plan.request_ids if self.sched.get(r).slot == dst)) is not None
            self.kv[dst] = {p: t for p, t in self.kv.get(src, {}).items() if p < n}
            if self.store_shape:
                lo = n - self.store_shape[1]
                self.store[dst] = {p: t for p, t in self.store.get(src, {}).items() if lo <= p < n}
        for slot, keep in plan.reuse:
            self.kv[slot] = {p: t for p, t in self.kv.get(slot, {}).items() if p < keep}
            self._restore(slot, keep)
        committed, finished = {}, {}
        for item in plan.encode:
            req = self.sched.get(item.request_id)
            if item.kind == "prefill":
                # exactness: prompts are encoded in chunks on the prefill_chunk grid, reused or not
                assert item.start % self.sched.prefill_chunk == 0 or item.start == req.cached_len == req.prompt_len
                self._check_context(item.slot, req, item.start)
                self._write(item.slot, item.start, item.token_ids)
                continue
            k = self.canvases.get(item.request_id, 0)
            tokens = canvas_tokens(item.request_id, k, req.canvas_length)
            self.canvases[item.request_id] = k + 1
            if self.eos(item.request_id) == k:
                finished[item.request_id] = "stop"
                tokens = tokens[:2]
            elif req.max_new_tokens - len(req.output_ids) <= req.canvas_length:
                finished[item.request_id] = "length"
            else:  # a continuing canvas is encoded (what Runner._commit_and_prefill does)
                self._write(item.slot, item.start, tokens)
            committed[item.request_id] = tokens
        for item in plan.denoise:
            self._check_context(item.slot, self.sched.get(item.request_id), item.canvas_start)
        return StepResult(committed=committed, finished=finished)


def drive(sched, sim, before_update=None):
    while (plan := sched.plan()) is not None:
        result = sim.run(plan)
        if before_update:
            before_update(plan)
        sched.update(plan, result)


def run_one(sched, sim, req):
    sched.add(req)
    drive(sched, sim)
    return req


def make_sched(slots=1, chunk=4, caching=True):
    return Scheduler(4, 10_000, slots, chunk, 4, prefix_caching=caching)


def test_next_request_skips_the_whole_chunks_its_slot_holds():
    sched = make_sched()
    sim = KVSim(sched)
    a = run_one(sched, sim, RequestState("a", tuple(range(1, 11)), 10, 4, 2))  # chunks [0,4) [4,8) [8,10)
    assert a.cached_len == 0 and len(a.output_ids) == 10
    b = RequestState("b", a.prompt_ids + (99, 98), 4, 4, 2)
    sched.add(b)
    plan = sched.plan()
    assert plan.reuse == ((0, 8),) and plan.freed_slots == ()  # [8,10) was a partial chunk: encoded again
    assert [(i.kind, i.start, i.end) for i in plan.encode] == [("prefill", 8, 12)]
    sched.update(plan, sim.run(plan))
    drive(sched, sim)
    assert b.cached_len == 8 and b.finish_reason == "length"
    # a prompt that leaves the held tokens part way keeps the whole chunks of the shared part
    c = run_one(sched, sim, RequestState("c", b.prompt_ids[:7] + (77,), 4, 4, 2))
    assert c.cached_len == 4
    # the whole prompt held: nothing to encode, the request starts denoising at once
    d = RequestState("d", c.prompt_ids, 4, 4, 2)
    sched.add(d)
    plan = sched.plan()
    assert plan.reuse == ((0, 8),) and plan.encode == () and [i.request_id for i in plan.denoise] == ["d"]
    sched.update(plan, sim.run(plan))
    drive(sched, sim)
    assert d.cached_len == 8 and d.output_ids == list(canvas_tokens("d", 0, 4))
    # the generated canvases are not offered: a prompt holding them re-encodes them in prompt chunks
    e = run_one(sched, sim, RequestState("e", d.prompt_ids + tuple(d.output_ids), 4, 4, 2))
    assert e.cached_len == 8


def test_a_prompt_only_request_warms_the_cache_for_the_next():
    """max_new_tokens=0 (llama-server's n_predict 0): the prompt is encoded into a slot, nothing is
    generated, and the next request reuses it. A prompt-only request whose whole prompt a slot already
    holds finishes at admission, without a step (`take_done`)."""
    sched = make_sched()
    sim = KVSim(sched)
    warm = run_one(sched, sim, RequestState("warm", tuple(range(1, 11)), 0, 4, 2))
    assert warm.finish_reason == "length" and warm.output_ids == [] and warm.prefilled_len == 10
    assert not sched.take_done()  # it finished in a step
    b = run_one(sched, sim, RequestState("b", tuple(range(1, 11)) + (7, 7), 4, 4, 2))
    assert b.cached_len == 8 and b.is_done
    again = RequestState("again", tuple(range(1, 11)) + (7, 7), 0, 4, 2)
    sched.add(again)
    assert sched.has_unfinished() and sched.plan() is None  # nothing to run...
    assert sched.take_done() == [again] and again.cached_len == 12 and again.finish_reason == "length"
    assert not sched.has_unfinished()


def test_without_prefix_caching_nothing_is_reused():
    sched = make_sched(caching=False)
    sim = KVSim(sched)
    for rid in "ab":
        r = run_one(sched, sim, RequestState(rid, (1, 2, 3, 4, 5), 4, 4, 2))
        assert r.cached_len == 0


def test_a_failed_request_leaves_nothing_to_reuse():
    sched = make_sched()
    sim = KVSim(sched)
    a = RequestState("a", (1, 2, 3, 4), 8, 4, 2)
    sched.add(a)
    plan = sched.plan()
    sched.update(plan, StepResult(errors={"a": "boom"}))
    assert a.finish_reason == "error"
    b = RequestState("b", (1, 2, 3, 4), 4, 4, 2)
    sched.add(b)
    plan = sched.plan()
    assert plan.reuse == ((0, 0),)
    sched.update(plan, sim.run(plan))
    drive(sched, sim)
    assert b.cached_len == 0


def test_a_request_cancelled_during_prefill_leaves_the_chunks_it_finished():
    sched = make_sched()
    sim = KVSim(sched)
    a = RequestState("a", tuple(range(1, 14)), 4, 4, 2)
    sched.add(a)
    drive(sched, sim, before_update=lambda plan: plan.encode[0].start == 4 and sched.cancel("a"))
    assert a.finish_reason == "cancelled" and a.prefilled_len == 4  # the chunk [4, 8) ran but was dropped
    b = run_one(sched, sim, RequestState("b", a.prompt_ids, 4, 4, 2))
    assert b.cached_len == 4


def test_the_best_match_wins_and_misses_take_the_slot_freed_longest_ago():
    sched = make_sched(slots=2)
    sim = KVSim(sched)
    a = RequestState("a", (1, 2, 3, 4, 5), 4, 4, 2)
    b = RequestState("b", (5, 6, 7, 8, 9), 4, 4, 3)  # one more step: a finishes first
    sched.add(a)
    sched.add(b)
    drive(sched, sim)
    miss = RequestState("m", (9, 9), 4, 4, 2)
    sched.add(miss)
    plan = sched.plan()
    assert plan.reuse == ((0, 0),)  # slot 0 (a's, freed first) goes; b's prefix stays cached
    sched.update(plan, sim.run(plan))
    drive(sched, sim)
    hit = run_one(sched, sim, RequestState("h", (5, 6, 7, 8, 1), 4, 4, 2))
    assert hit.cached_len == 4 and hit.slot is None
    # slot 1 now holds h's prompt: a repeat reuses it whole (its partial last chunk included)
    assert sched.reusable(1, hit.prompt_ids) == 5 and sched.reusable(0, hit.prompt_ids) == 0


def test_requests_arriving_together_encode_their_shared_prefix_once():
    sched = make_sched(slots=5)
    sim = KVSim(sched)
    prompt = tuple(range(1, 11))  # chunks [0,4) [4,8) [8,10)
    same = [RequestState(f"n{i}", prompt, 4, 4, 2) for i in range(3)]  # n = 3 choices of one prompt
    other = RequestState("o", prompt[:8] + (50, 51, 52), 4, 4, 2)
    stranger = RequestState("s", (60, 61), 4, 4, 2)
    for r in (*same, other, stranger):
        sched.add(r)
    plans = []
    while (plan := sched.plan()) is not None:
        plans.append(plan)
        sched.update(plan, sim.run(plan))
    prefill = [(i.request_id, i.start, i.end) for p in plans for i in p.encode if i.kind == "prefill"]
    # the first choice encodes the prompt; the stranger is not held up; "o" encodes only its own tail
    assert prefill == [("n0", 0, 4), ("s", 0, 2), ("n0", 4, 8), ("n0", 8, 10), ("o", 8, 11)]
    assert [r.cached_len for r in same] == [0, 10, 10] and other.cached_len == 8
    assert (plans[2].copies, plans[3].copies) == (((0, 2, 8),), ((0, 3, 10), (0, 4, 10)))
    assert all(r.finish_reason == "length" for r in (*same, other, stranger))


def test_a_wait_ends_when_the_source_is_cancelled():
    sched = make_sched(slots=2)
    sim = KVSim(sched)
    a, b = RequestState("a", tuple(range(1, 13)), 4, 4, 2), RequestState("b", tuple(range(1, 13)), 4, 4, 2)
    sched.add(a)
    sched.add(b)
    plan = sched.plan()
    assert [i.request_id for i in plan.encode] == ["a"] and b.slot is None  # b waits for a's chunks
    sched.update(plan, sim.run(plan))
    sched.cancel("a")
    plan = sched.plan()  # a's slot is free with one chunk in it: b takes it and goes on from there
    assert plan.reuse == ((0, 4),) and [(i.request_id, i.start) for i in plan.encode] == [("b", 4)]
    sched.update(plan, sim.run(plan))
    drive(sched, sim)
    assert b.finish_reason == "length" and b.cached_len == 4


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_randomized_reuse_always_reads_the_requests_own_tokens(seed, bounded):
    """Many requests, several slots, prompts grown from earlier prompts and outputs, random cancels:
    every read sees exactly the request's tokens, prompts stay on the chunk grid, and the cache is used.
    bounded: the prefix store holds only the last few positions, and every reuse finds what it needs."""
    rng = random.Random(seed)
    chunk = rng.choice([2, 3, 5])
    store = (3, 3 + chunk + rng.choice([0, 4, 8])) if bounded else None
    sched = Scheduler(3, 10_000, 3, chunk, 4, prefix_caching=True, prefix_store=store)
    sim = KVSim(sched, eos=lambda rid: sum(map(ord, rid)) % 4, store=store)
    done, reqs = [], []
    for n in range(40):
        if done and rng.random() < 0.8:
            src = rng.choice(done)
            seq = src.prompt_ids + tuple(src.output_ids)
            prompt = seq[:rng.randint(1, len(seq))] + tuple(rng.randint(1, 3) for _ in range(rng.randint(0, 3)))
        else:
            prompt = tuple(rng.randint(1, 3) for _ in range(rng.randint(1, 12)))
        budget = 0 if rng.random() < 0.15 else rng.randint(1, 13)  # 0: prompt only (cache warming)
        r = RequestState(f"r{n}", prompt, budget, 4, rng.randint(1, 3))
        sched.add(r)
        reqs.append(r)
        victim = f"r{rng.randrange(n + 1)}" if rng.random() < 0.2 else None
        for _ in range(rng.choice([0, 0, 1, 2, 6])):  # often several arrive before the next plan
            plan = sched.plan()
            if plan is None:
                break
            result = sim.run(plan)
            if victim is not None and victim in plan.request_ids:
                sched.cancel(victim)
            sched.update(plan, result)
        done = [r for r in reqs if r.is_done and r.finish_reason != "error"]
    drive(sched, sim)
    assert all(r.is_done for r in reqs)
    assert all(not r.output_ids for r in reqs if r.max_new_tokens == 0)
    assert any(r.max_new_tokens == 0 and r.finish_reason == "length" for r in reqs)
    assert sum(r.cached_len for r in reqs) > 0 and sim.reads > 0
    assert any(p.copies for p in sim.plans)
    assert not bounded or sim.restores > 0


# ---------------------------------------------------------------- with the model


class Served:
    """A Scheduler + Runner pair on the tiny model, fed one request after another."""

    def __init__(self, llm, caching: bool, max_model_len=128, prefill_chunk=8, slots=2, store_len=None,
                 kv_dtype=None):
        self.llm = llm
        self.runner = Runner(llm.model, num_slots=slots, max_model_len=max_model_len, history_depth=1,
                             prefix_caching=caching, prefix_store_len=store_len, kv_dtype=kv_dtype)
        ring = self.runner.cache.size["sliding_attention"]
        self.sched = Scheduler(slots, slots * max_model_len, slots, prefill_chunk, llm.cfg.canvas_length,
                               prefix_caching=caching, prefix_store=(ring, store_len) if store_len else None)
        self.n = 0

    def run(self, prompt_ids, sp, eos_ids=None):
        return self.run_together([(prompt_ids, sp)], eos_ids)[0]

    def run_together(self, specs, eos_ids=None):
        """Add every (prompt_ids, SamplingParams) before the first plan; run until all finish."""
        states = []
        for prompt_ids, sp in specs:
            p = sp.resolve(self.llm.defaults)
            st = RequestState(f"r{self.n}", tuple(prompt_ids), p.max_new_tokens, self.llm.cfg.canvas_length,
                              p.max_denoising_steps)
            self.n += 1
            self.sched.add(st)
            self.runner.add(st.request_id, p, sp.seed, self.llm.eos_ids if eos_ids is None else eos_ids)
            states.append(st)
        while (plan := self.sched.plan()) is not None:
            self.sched.update(plan, self.runner.execute(plan).result)
        for st in states:
            self.runner.remove(st.request_id)
        return states


KV_DTYPES = pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["model-dtype", "fp8"])


@KV_DTYPES
def test_reuse_gives_the_cache_free_result_bit_for_bit(llm, kv_dtype):
    """A writes its prompt and three canvases, so the sliding layers' ring (15 positions here) has long
    moved past the prefix B shares with it. B reuses two chunks of A's prompt; its output and its KV rows
    equal a run without the cache, bit for bit. A repeat of A's whole prompt reuses all of it. With an
    fp8 cache too: reuse moves the stored bytes, so it equals the cache-free fp8 run."""
    from canvaslm.llm import SamplingParams

    C = llm.cfg.canvas_length
    ring = llm.model.cfg.sliding_window - 1
    a_ids = llm.encode_prompt("The quick brown fox jumps over the lazy dog")
    b_ids = a_ids[:19] + llm.tokenizer.encode(" is a sentence that is used", add_special_tokens=False)
    assert len(a_ids) > 16 + ring and len(b_ids) > 16 + ring
    cached, fresh = Served(llm, caching=True, kv_dtype=kv_dtype), Served(llm, caching=False, kv_dtype=kv_dtype)
    assert cached.runner.cache.k[0].dtype == (kv_dtype or llm.model.embed_weight.dtype)
    a = cached.run(a_ids, SamplingParams(seed=1, max_new_tokens=3 * C, max_denoising_steps=3), eos_ids=())
    assert len(a.output_ids) == 3 * C
    one_canvas = SamplingParams(seed=7, max_new_tokens=C, max_denoising_steps=6)
    b = cached.run(b_ids, one_canvas)
    want = fresh.run(b_ids, one_canvas)
    assert (b.cached_len, want.cached_len) == (16, 0)
    assert b.output_ids == want.output_ids and b.finish_reason == want.finish_reason
    for layer in range(llm.cfg.num_layers):  # slot 0 in both: the prompt, the last canvas never encoded
        for x, y in zip(cached.runner.cache.layer_kv(layer, 0), fresh.runner.cache.layer_kv(layer, 0)):
            assert torch.equal(x, y)
    again = cached.run(a_ids, one_canvas)
    assert again.cached_len == 16  # slot 0 now holds B, which shares two chunks with A
    repeat = cached.run(a_ids, one_canvas)
    assert repeat.cached_len == len(a_ids)
    assert repeat.output_ids == again.output_ids == fresh.run(a_ids, one_canvas).output_ids


@KV_DTYPES
def test_a_bounded_store_reuses_a_prompt_behind_a_short_reply_bit_for_bit(llm, kv_dtype):
    """The prefix store keeps only the last ring + chunk + canvas positions. A follow-up turn (the
    prompt, the reply, a new message) reuses the prompt's whole chunks behind a one-canvas reply, with
    the cache-free output and KV rows; behind a longer reply the store has lost them, and the request
    encodes its prompt itself, with the same output."""
    from canvaslm.engine.engine import Engine, EngineConfig
    from canvaslm.llm import SamplingParams

    C, chunk = llm.cfg.canvas_length, 8
    ring = llm.model.cfg.sliding_window - 1
    prompt = llm.encode_prompt("The quick brown fox jumps over the lazy dog")
    assert len(prompt) > 2 * chunk + ring
    store_len = ring + chunk + C
    for canvases, reused, slot in [(2, len(prompt) // chunk * chunk, 0), (3, 0, 1)]:  # a miss: the unused slot
        cached = Served(llm, caching=True, store_len=store_len, kv_dtype=kv_dtype)
        assert cached.runner.cache.store_len == store_len < cached.runner.cache.max_len
        first = cached.run(prompt, SamplingParams(seed=1, max_new_tokens=canvases * C, max_denoising_steps=3),
                           eos_ids=())
        follow = tuple(prompt) + tuple(first.output_ids) + tuple(llm.tokenizer.encode(" ok?", add_special_tokens=False))
        sp = SamplingParams(seed=7, max_new_tokens=C, max_denoising_steps=6)
        fresh = Served(llm, caching=False, max_model_len=cached.runner.max_model_len, kv_dtype=kv_dtype)
        got, want = cached.run(follow, sp), fresh.run(follow, sp)
        assert got.cached_len == reused and want.cached_len == 0
        assert got.output_ids == want.output_ids
        for layer in range(llm.cfg.num_layers):
            for x, y in zip(cached.runner.cache.layer_kv(layer, slot), fresh.runner.cache.layer_kv(layer, 0)):
                assert torch.equal(x, y)
    engine = Engine(llm.model, EngineConfig(max_batch=2, max_model_len=256, prefill_chunk=chunk,
                                            prefix_caching=True, prefix_store_len=store_len))
    assert engine.runner.cache.store_len == store_len and engine.scheduler.prefix_store == (ring, store_len)
    with pytest.raises(ValueError, match="prefix_store_len"):
        Engine(llm.model, EngineConfig(max_model_len=256, prefill_chunk=chunk, prefix_caching=True,
                                       prefix_store_len=ring))


@KV_DTYPES
def test_requests_arriving_together_share_the_prompt_encode(llm, monkeypatch, kv_dtype):
    """Three choices of one prompt and a fourth request sharing two chunks with it, added at once: the
    prompt is encoded once and copied from slot to slot, and every output equals a cache-free run's."""
    from canvaslm.llm import SamplingParams

    C = llm.cfg.canvas_length
    prompt = llm.encode_prompt("The quick brown fox jumps over the lazy dog")
    other = prompt[:19] + llm.tokenizer.encode(" and then some", add_special_tokens=False)
    specs = [(prompt, SamplingParams(seed=s, max_new_tokens=2 * C, max_denoising_steps=4)) for s in (1, 2, 3)]
    specs.append((other, SamplingParams(seed=4, max_new_tokens=C, max_denoising_steps=4)))
    cached = Served(llm, caching=True, slots=4, kv_dtype=kv_dtype)
    encoded = []
    real = cached.runner.model.encode

    def counting(tokens, positions, *args, **kwargs):
        encoded.append(int((positions >= 0).sum()))
        return real(tokens, positions, *args, **kwargs)

    monkeypatch.setattr(cached.runner.model, "encode", counting)
    got = cached.run_together(specs)
    monkeypatch.undo()
    assert [r.cached_len for r in got] == [0, len(prompt), len(prompt), 16]
    commits = 3 * C  # each choice encodes its first canvas at its commit
    assert sum(encoded) == len(prompt) + (len(other) - 16) + commits
    for r, (ids, sp) in zip(got, specs):
        want = Served(llm, caching=False, kv_dtype=kv_dtype).run(ids, sp)
        assert (r.output_ids, r.finish_reason) == (want.output_ids, want.finish_reason)


def test_by_default_prefix_caching_is_on_where_its_memory_fits(llm):
    """The 26B-A4B shape, 8 slots of 4096 positions in bf16: the prefix store is 6.7 GB. On an 80 GB GPU
    with bf16 weights loaded it fits; beside int4 weights on a 24 GB GPU it does not; where it does not, the
reason names the longest context at which it would."""
    from canvaslm.engine.engine import Engine, EngineConfig, prefix_caching_fits, prefix_store_len
    from canvaslm.kv_cache import KVCache
    from canvaslm.shapes import model_config

    cfg = model_config("26b-a4b")
    config = EngineConfig(max_batch=8, max_model_len=4096)
    cache, store = KVCache.planned_bytes(cfg, 9, 4096, torch.bfloat16)
    assert 6.5e9 < store < 7.9e9 and 2.0e9 < cache < 2.9e9
    gib = 1 << 30
    on, why = prefix_caching_fits(cfg, config, "cuda", torch.bfloat16, free_total=(27 * gib, 80 * gib))
    assert on and "fits" in why
    off, why = prefix_caching_fits(cfg, config, "cuda", torch.bfloat16, free_total=(9 * gib, 24 * gib))
    assert not off and "does not fit" in why and "--max-model-len" in why
    on, _ = prefix_caching_fits(cfg, config, "cpu", torch.bfloat16, free_total=(20 * gib, 24 * gib))
    assert on  # the CPU's available RAM counts as a GPU's free memory does
    off, why = prefix_caching_fits(cfg, config, "cpu", torch.bfloat16, free_total=(8 * gib, 24 * gib))
    shorter = int(re.search(r"--max-model-len (\d+) leaves room for it", why).group(1))
    budget = 8 * gib - 24 * gib // 10  # the reserve: a tenth of the memory, at least 2 GiB
    assert shorter % 256 == 0 and shorter < 4096
    store_len = prefix_store_len(cfg, config)
    assert sum(KVCache.planned_bytes(cfg, 9, shorter, torch.bfloat16, store_len)) <= budget
    assert sum(KVCache.planned_bytes(cfg, 9, shorter + 256, torch.bfloat16, store_len)) > budget
    engine = Engine(llm.model, EngineConfig(max_batch=2, max_model_len=128))
    assert engine.prefix_caching and engine.runner.cache.store  # the tiny model on the CPU
    runner = Runner(llm.model, 2, 128, prefix_caching=True)
    assert runner.cache.nbytes() == sum(KVCache.planned_bytes(llm.cfg, 3, 128, runner.dtype))


def test_a_digest_collision_is_caught_before_reuse(monkeypatch):
    """Prefixes are matched by chunk digests; the tokens of the pick are compared before any reuse, so
    even digests that always collide never hand a request another prompt's KV."""
    from canvaslm.engine import scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "chunk_digest", lambda tokens, chunk: (0,) * (len(tokens) // chunk))
    sched = make_sched(slots=2)
    sim = KVSim(sched)
    a = run_one(sched, sim, RequestState("a", (1, 2, 3, 4, 5, 6, 7, 8, 9), 4, 4, 2))
    b = run_one(sched, sim, RequestState("b", (1, 2, 3, 4, 9, 9, 9, 9, 9), 4, 4, 2))  # chunk 2 differs
    c = run_one(sched, sim, RequestState("c", (7, 7, 7, 7, 7), 4, 4, 2))  # no chunk in common at all
    assert (a.cached_len, b.cached_len, c.cached_len) == (0, 0, 0)  # the whole match is refused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@KV_DTYPES
def test_cuda_reuse_matches_the_cache_free_run(tiny_checkpoint, kv_dtype):
    """On a GPU (bench/fast_path_gpu.sh runs it): one request at a time keeps every encoder call's shape
    the same with and without the cache, so reuse must not change a token there either."""
    from canvaslm.llm import LLM, SamplingParams

    gpu = LLM(tiny_checkpoint, device="cuda", dtype="float32")
    C = gpu.cfg.canvas_length
    a_ids = gpu.encode_prompt("The quick brown fox jumps over the lazy dog")
    b_ids = a_ids[:19] + gpu.tokenizer.encode(" is a sentence that is used", add_special_tokens=False)
    cached, fresh = Served(gpu, caching=True, kv_dtype=kv_dtype), Served(gpu, caching=False, kv_dtype=kv_dtype)
    cached.run(a_ids, SamplingParams(seed=1, max_new_tokens=3 * C, max_denoising_steps=3), eos_ids=())
    sp = SamplingParams(seed=7, max_new_tokens=2 * C, max_denoising_steps=6)
    b = cached.run(b_ids, sp)
    assert b.cached_len == 16 and b.output_ids == fresh.run(b_ids, sp).output_ids
