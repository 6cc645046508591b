"""Scheduler tests: fake requests and a fake runner loop, no model and no torch."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from canvaslm.engine.request import RequestState, RequestStatus
from canvaslm.engine.scheduler import Scheduler, StepPlan, StepResult

ROOT = Path(__file__).resolve().parents[2]


def make_req(rid, prompt_len=4, max_new=8, cl=4, steps=3, priority=0, max_time=None):
    return RequestState(rid, tuple(range(1, prompt_len + 1)), max_new, cl, steps, priority=priority,
                        max_time=max_time)


def canvas_tokens(rid: str, k: int, cl: int) -> list[int]:
    return [(sum(map(ord, rid)) * 7919 + k * 104_729 + i) % 50_000 for i in range(cl)]


class FakeRunner:
    """Executes plans without a model and checks that they are consistent with what it has seen.

    converge(rid, k) -> number of steps after which canvas k converges (None: never, run to max).
    eos(rid) -> (canvas_index, position) of the EOS token, or None.
    """

    def __init__(self, sched: Scheduler, converge=lambda rid, k: None, eos=lambda rid: None):
        self.sched, self.converge, self.eos = sched, converge, eos
        self.slot_owner: dict[int, str] = {}
        self.prefilled: dict[str, int] = {}
        self.steps: dict[str, int] = {}  # steps run on the current canvas
        self.canvases: dict[str, int] = {}  # canvases committed
        self.expected: dict[str, list[int]] = {}  # tokens reported as committed
        self.stopped: set[str] = set()  # requests whose EOS canvas was committed

    def run(self, plan: StepPlan) -> StepResult:
        for slot in plan.freed_slots:  # reset first: this plan may hand the slot to a new request
            self.slot_owner.pop(slot, None)
        items = [*plan.encode, *plan.denoise]
        assert len(plan.encode) <= self.sched.max_batch and len(plan.denoise) <= self.sched.max_batch
        assert len({i.request_id for i in items}) == len(items), "a request appears twice in one plan"
        for item in items:
            owner = self.slot_owner.setdefault(item.slot, item.request_id)
            assert owner == item.request_id, f"slot {item.slot} used by {owner} and {item.request_id}"
        committed, finished, early = {}, {}, set()
        for item in plan.encode:
            rid, req = item.request_id, self.sched.get(item.request_id)
            if item.kind == "prefill":
                assert item.start == self.prefilled.get(rid, 0) and 0 < item.num_tokens <= self.sched.prefill_chunk
                assert item.token_ids == req.prompt_ids[item.start:item.end]
                self.prefilled[rid] = item.end
            else:
                k = self.canvases.get(rid, 0)
                assert self.prefilled[rid] == req.prompt_len
                assert (item.start, item.end) == (req.prompt_len + k * req.canvas_length,
                                                  req.prompt_len + (k + 1) * req.canvas_length)
                tokens = canvas_tokens(rid, k, req.canvas_length)
                if self.eos(rid) is not None and self.eos(rid)[0] == k:
                    tokens = tokens[: self.eos(rid)[1] + 1]
                    finished[rid] = "stop"
                    self.stopped.add(rid)
                elif item.final:  # its max_time is spent: this canvas ends it
                    finished[rid] = "length"
                committed[rid] = tokens
                self.expected.setdefault(rid, []).extend(tokens)
                self.canvases[rid], self.steps[rid] = k + 1, 0
        for item in plan.denoise:
            rid, req = item.request_id, self.sched.get(item.request_id)
            assert self.prefilled[rid] == req.prompt_len
            assert item.canvas_index == self.canvases.get(rid, 0) and item.denoise_step == self.steps.get(rid, 0)
            assert item.denoise_step < req.max_denoising_steps
            self.steps[rid] = item.denoise_step + 1
            if self.converge(rid, item.canvas_index) == self.steps[rid]:
                early.add(rid)
        return StepResult(early_stopped=early, committed=committed, finished=finished)


def drive(sched, runner, max_plans=10_000, before_update=None):
    """Run plans until idle; returns the plans. before_update(plan) may cancel requests mid-step."""
    plans = []
    while (plan := sched.plan()) is not None:
        plans.append(plan)
        result = runner.run(plan)
        if before_update:
            before_update(plan)
        sched.update(plan, result)
        assert len(plans) < max_plans, "scheduler did not drain"
    return plans


def kinds(plan):
    return {i.kind for i in plan.encode} | ({"denoise"} if plan.denoise else set())


def test_modules_import_without_torch():
    # Stub the parent packages so only request.py and scheduler.py are judged, not package __init__s.
    code = textwrap.dedent(f"""
        import sys, types
        for name, path in [("canvaslm", {str(ROOT / "canvaslm")!r}), ("canvaslm.engine", {str(ROOT / "canvaslm/engine")!r})]:
            mod = types.ModuleType(name); mod.__path__ = [path]; sys.modules[name] = mod
        import canvaslm.engine.request, canvaslm.engine.scheduler
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_single_request_lifecycle_with_chunked_prefill():
    sched = Scheduler(max_batch=4, kv_budget_tokens=100, num_slots=2, prefill_chunk=4, canvas_length=4)
    req = make_req("a", prompt_len=10, max_new=6, cl=4, steps=2)
    sched.add(req)
    runner = FakeRunner(sched)
    plans = drive(sched, runner)
    prefill = [(i.start, i.end) for p in plans for i in p.encode if i.kind == "prefill"]
    assert prefill == [(0, 4), (4, 8), (8, 10)]  # one chunk per plan, at most prefill_chunk tokens
    assert all(not p.denoise for p in plans[:3])  # no denoising before the prompt is fully encoded
    shape = [("commit", i.start, i.end) if i.kind == "commit" else None for p in plans for i in p.encode]
    assert [s for s in shape if s] == [("commit", 10, 14), ("commit", 14, 18)]
    assert [d.denoise_step for p in plans for d in p.denoise] == [0, 1, 0, 1]
    assert len(plans) == 3 + 2 * (2 + 1)
    assert req.status is RequestStatus.FINISHED and req.finish_reason == "length"
    assert req.output_ids == runner.expected["a"][:6] and len(req.output_ids) == 6
    assert sched.kv_used == 0 and sched.num_free_slots == 2


def test_plan_mixes_prefill_commit_and_denoise():
    sched = Scheduler(max_batch=4, kv_budget_tokens=100, num_slots=4, prefill_chunk=2, canvas_length=4)
    sched.add(make_req("a", prompt_len=1, max_new=8, steps=1))
    sched.add(make_req("b", prompt_len=8, max_new=4, steps=2))
    sched.add(make_req("c", prompt_len=1, max_new=4, steps=3))
    runner = FakeRunner(sched)
    plans = drive(sched, runner)
    # plan 2: a commits its 1-step canvas, b prefills its 2nd chunk, c takes its 2nd step
    assert kinds(plans[2]) == {"prefill", "commit", "denoise"}
    assert all(sched.get(r) is None for r in "abc")


def test_early_stop_leaves_batch_others_continue():
    sched = Scheduler(max_batch=3, kv_budget_tokens=100, num_slots=3, prefill_chunk=8, canvas_length=4)
    reqs = [make_req(r, max_new=4, steps=5) for r in "abc"]
    for r in reqs:
        sched.add(r)
    runner = FakeRunner(sched, converge=lambda rid, k: 2 if rid == "b" else None)
    plans = drive(sched, runner)
    batches = [[(d.request_id, d.denoise_step) for d in p.denoise] for p in plans]
    assert batches[1:4] == [[("a", 0), ("b", 0), ("c", 0)], [("a", 1), ("b", 1), ("c", 1)], [("a", 2), ("c", 2)]]
    assert [i.request_id for i in plans[3].encode] == ["b"]  # b commits while a and c keep denoising
    assert reqs[1].status is RequestStatus.FINISHED and plans.index(plans[3]) == 3
    assert sum(1 for p in plans for d in p.denoise if d.request_id == "a") == 5  # a was never stalled
    assert len(plans) == 1 + 5 + 1


def test_denoise_batch_prefers_largest_same_step_group():
    sched = Scheduler(max_batch=2, kv_budget_tokens=100, num_slots=4, prefill_chunk=8, canvas_length=4)
    runner = FakeRunner(sched)
    sched.add(make_req("a", max_new=4, steps=6))
    for _ in range(2):  # a: prefill, step 0
        plan = sched.plan()
        sched.update(plan, runner.run(plan))
    sched.add(make_req("b", max_new=4, steps=6))
    sched.add(make_req("c", max_new=4, steps=6))
    plan = sched.plan()  # b, c prefill; a alone at step 1
    sched.update(plan, runner.run(plan))
    plan = sched.plan()  # a at step 2, b and c at step 0: the pair at step 0 fills the batch
    assert {(d.request_id, d.denoise_step) for d in plan.denoise} == {("b", 0), ("c", 0)}
    sched.update(plan, runner.run(plan))
    drive(sched, runner)  # and a still finishes (aging)
    assert not sched.has_unfinished()


@pytest.mark.parametrize("state", ["waiting", "prefilling", "denoising", "awaiting_commit", "in_flight"])
def test_cancel_in_each_state_frees_slot_and_budget(state):
    sched = Scheduler(max_batch=4, kv_budget_tokens=40, num_slots=1, prefill_chunk=2, canvas_length=4)
    a, b = make_req("a", prompt_len=4, max_new=8, steps=2), make_req("b", prompt_len=4, max_new=8, steps=2)
    sched.add(a)
    sched.add(b)  # waits: only one slot
    runner = FakeRunner(sched)
    target = b if state == "waiting" else a
    ready = {"waiting": lambda: a.status is not RequestStatus.WAITING, "prefilling": lambda: a.prefilled_len == 2,
             "denoising": lambda: a.denoise_step == 1, "awaiting_commit": lambda: a.canvas_ready,
             "in_flight": lambda: a.denoise_step == 1}[state]
    while not ready():
        plan = sched.plan()
        sched.update(plan, runner.run(plan))
    kv_before = sched.kv_used
    if state == "in_flight":
        plan = sched.plan()
        assert "a" in plan.request_ids
        runner.run(plan)
        assert sched.cancel("a") is a and a.status is RequestStatus.CANCELLED
        assert sched.kv_used == kv_before and sched.num_free_slots == 0  # the runner still uses the slot
        sched.update(plan, StepResult())  # results for a cancelled request are not needed
    else:
        assert sched.cancel(target.request_id) is target
    assert target.status is RequestStatus.CANCELLED and target.finish_reason == "cancelled"
    assert sched.get(target.request_id) is None and target.slot is None
    assert sched.cancel(target.request_id) is None  # cancelling twice is a no-op
    if state == "waiting":
        assert sched.kv_used == kv_before and sched.num_waiting == 0
        return
    assert sched.kv_used == 0 and sched.num_free_slots == 1
    plan = sched.plan()  # b takes the freed slot; the runner is told to reset it first
    assert plan.freed_slots == (0,) and [(i.request_id, i.slot, i.start) for i in plan.encode] == [("b", 0, 0)]
    sched.update(plan, runner.run(plan))
    drive(sched, runner)
    assert b.status is RequestStatus.FINISHED and b.output_ids == runner.expected["b"]


def test_admission_waits_for_budget_then_is_admitted():
    # each request reserves 4 + ceil(6/4)*4 = 12 tokens; the budget holds two of them
    sched = Scheduler(max_batch=4, kv_budget_tokens=25, num_slots=8, prefill_chunk=8, canvas_length=4)
    reqs = [make_req(r, max_new=6, steps=2) for r in "abc"]
    for r in reqs:
        sched.add(r)
    runner = FakeRunner(sched)
    plan = sched.plan()
    assert [i.request_id for i in plan.encode] == ["a", "b"] and reqs[2].status is RequestStatus.WAITING
    assert sched.kv_used == 24
    sched.update(plan, runner.run(plan))
    plans = [plan] + drive(sched, runner)
    first_c = next(n for n, p in enumerate(plans) if "c" in p.request_ids)
    last_a = max(n for n, p in enumerate(plans) if "a" in p.request_ids)
    assert first_c == last_a + 1  # admitted as soon as a released its reservation
    assert all(r.status is RequestStatus.FINISHED for r in reqs) and sched.kv_used == 0


def test_head_of_queue_is_not_overtaken_by_smaller_requests():
    sched = Scheduler(max_batch=4, kv_budget_tokens=40, num_slots=8, prefill_chunk=8, canvas_length=4)
    sched.add(make_req("big1", prompt_len=4, max_new=20, steps=1))  # 24 tokens
    sched.add(make_req("big2", prompt_len=4, max_new=20, steps=1))  # 24: must wait for big1
    sched.add(make_req("small", prompt_len=4, max_new=4, steps=1))  # 8: would fit, but is behind big2
    plans = drive(sched, FakeRunner(sched))
    first = {r: next(n for n, p in enumerate(plans) if r in p.request_ids) for r in ("big1", "big2", "small")}
    assert first["big1"] < first["big2"] == first["small"]


def test_request_larger_than_budget_is_rejected():
    sched = Scheduler(max_batch=4, kv_budget_tokens=32, num_slots=2, prefill_chunk=8, canvas_length=8)
    with pytest.raises(ValueError, match=r"needs 36 KV tokens.*kv_budget_tokens is 32"):
        sched.add(RequestState("huge", tuple(range(20)), 10, 8, 4))
    with pytest.raises(ValueError, match="canvas_length"):
        sched.add(RequestState("odd", (1,), 10, 4, 4))
    sched.add(RequestState("ok", tuple(range(16)), 16, 8, 4))  # exactly the budget fits
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(RequestState("ok", (1,), 8, 8, 4))
    assert sched.num_waiting == 1


def test_protocol_errors_are_reported():
    sched = Scheduler(max_batch=4, kv_budget_tokens=100, num_slots=2, prefill_chunk=8, canvas_length=4)
    sched.add(make_req("a", max_new=4, steps=1))
    runner = FakeRunner(sched)
    for _ in range(2):
        plan = sched.plan()
        sched.update(plan, runner.run(plan))
    plan = sched.plan()
    assert [i.kind for i in plan.encode] == ["commit"]
    with pytest.raises(RuntimeError, match="in flight"):
        sched.plan()
    with pytest.raises(ValueError, match="lacks request 'a'"):
        sched.update(plan, StepResult())
    with pytest.raises(ValueError, match="early_stopped"):
        sched.update(plan, StepResult(early_stopped={"a"}, committed={"a": [1, 2, 3, 4]}))
    sched.update(plan, StepResult(committed={"a": [1, 2, 3, 4]}))  # a corrected result is accepted
    assert sched.plan() is None and sched.kv_used == 0


def test_runner_error_finishes_request():
    sched = Scheduler(max_batch=4, kv_budget_tokens=100, num_slots=2, prefill_chunk=8, canvas_length=4)
    a = make_req("a")
    sched.add(a)
    plan = sched.plan()
    finished = sched.update(plan, StepResult(errors={"a": "nan in logits"}))
    assert finished == [a] and a.finish_reason == "error" and sched.kv_used == 0


def test_no_request_starves_under_a_steady_stream():
    def simulate(max_wait_plans, window=400):
        sched = Scheduler(max_batch=4, kv_budget_tokens=10_000, num_slots=64, prefill_chunk=8,
                          canvas_length=4, max_wait_plans=max_wait_plans)
        runner, arrived, done, n = FakeRunner(sched), {}, {}, 0
        for t in range(window):
            if t == 0 or (t >= 1 and (t - 1) % 6 == 0 and t < window - 100):
                for _ in range(1 if t == 0 else 4):  # a low-priority old one, then groups of 4 that fill the batch
                    rid = f"r{n}"
                    sched.add(make_req(rid, max_new=4, steps=6, priority=1 if t == 0 else 0))
                    arrived[rid], n = t, n + 1
            plan = sched.plan()
            if plan is None:
                break
            for r in sched.update(plan, runner.run(plan)):
                done[r.request_id] = t
        return arrived, done

    arrived, done = simulate(max_wait_plans=10**9)
    assert done["r0"] >= 300  # without aging the old request only runs once the stream stops
    arrived, done = simulate(max_wait_plans=8)
    assert set(done) == set(arrived)
    # 6 steps, each after at most max_wait_plans passed-over plans, plus its prefill and commit
    assert max(done[r] - arrived[r] for r in arrived) <= 6 * (8 + 1) + 2


def test_max_batch_respected_with_many_requests():
    sched = Scheduler(max_batch=3, kv_budget_tokens=1000, num_slots=8, prefill_chunk=3, canvas_length=4)
    reqs = [make_req(f"r{i}", prompt_len=1 + i % 5, max_new=1 + i, steps=1 + i % 3) for i in range(12)]
    for r in reqs:
        sched.add(r)
    plans = drive(sched, FakeRunner(sched, converge=lambda rid, k: 1 if k % 2 else None))  # runner checks max_batch
    assert max(len(p.denoise) for p in plans) == 3 and max(len(p.encode) for p in plans) == 3
    assert all(r.status is RequestStatus.FINISHED for r in reqs)


@pytest.mark.parametrize("seed", range(8))
def test_randomized_simulation_invariants(seed):
    rng = random.Random(seed)
    cl = rng.choice([2, 4, 8])
    budget = rng.randint(3, 8) * cl + 16
    sched = Scheduler(max_batch=rng.randint(1, 4), kv_budget_tokens=budget, num_slots=rng.randint(1, 5),
                      prefill_chunk=rng.randint(1, 6), canvas_length=cl, max_wait_plans=rng.randint(1, 10))
    conv = {}  # (rid, k) -> early-stop step
    eos = {}
    runner = FakeRunner(sched, converge=lambda rid, k: conv.get((rid, k)), eos=lambda rid: eos.get(rid))
    reqs: dict[str, RequestState] = {}
    cancelled: set[str] = set()

    def maybe_cancel(_plan=None):
        live = [r for r in reqs.values() if not r.is_done]
        if live and rng.random() < 0.015:
            victim = rng.choice(live)
            kv, slots, held = sched.kv_used, sched.num_free_slots, victim.slot is not None
            in_flight = _plan is not None and victim.request_id in _plan.request_ids
            assert sched.cancel(victim.request_id) is victim and victim.status is RequestStatus.CANCELLED
            cancelled.add(victim.request_id)
            freed = held and not in_flight  # in flight: freed at update() instead
            assert sched.kv_used == kv - (victim.kv_reserved if freed else 0)
            assert sched.num_free_slots == slots + freed

    for step in range(3000):
        if len(reqs) < 60 and rng.random() < 0.3:
            rid = f"r{len(reqs)}"
            prompt_len = rng.randint(1, 12)
            max_new = rng.randint(1, max(1, (budget - prompt_len) // cl) * cl)
            req = RequestState(rid, tuple(rng.randrange(1000) for _ in range(prompt_len)), max_new, cl,
                               rng.randint(1, 5), priority=rng.randint(0, 2))
            if req.kv_tokens_needed > budget:
                with pytest.raises(ValueError):
                    sched.add(req)
                continue
            sched.add(req)
            reqs[rid] = req
            for k in range(req.num_canvases):
                if rng.random() < 0.5:
                    conv[(rid, k)] = rng.randint(1, req.max_denoising_steps)
            if rng.random() < 0.3:
                eos[rid] = (rng.randrange(req.num_canvases), rng.randrange(cl))
        maybe_cancel()
        plan = sched.plan()
        held = [r for r in reqs.values() if r.slot is not None]  # admitted and not yet released
        assert sum(r.kv_reserved for r in held) == sched.kv_used <= budget
        assert len({r.slot for r in held}) == len(held) <= sched.num_slots
        if plan is None:
            if len(reqs) >= 60:
                break
            continue
        result = runner.run(plan)
        maybe_cancel(plan)
        sched.update(plan, result)

    assert not sched.has_unfinished() and sched.kv_used == 0 and sched.num_free_slots == sched.num_slots
    for rid, r in reqs.items():
        if rid in cancelled:
            assert r.status is RequestStatus.CANCELLED and r.slot is None
            continue
        assert r.status is RequestStatus.FINISHED
        assert r.output_ids == runner.expected[rid][: r.max_new_tokens]
        natural = rid in runner.stopped and len(runner.expected[rid]) <= r.max_new_tokens
        assert r.finish_reason == ("stop" if natural else "length")


@pytest.mark.parametrize("waited,first", [(2, "h"), (40, "l")])
def test_admission_priority_ages_one_step_per_max_wait_plans(waited, first):
    """Lower priority values are admitted first, but a waiting request moves up one value for every
    max_wait_plans plans it waits (here 4): after 40 plans, priority 2 has aged past a fresh priority 0."""
    sched = Scheduler(max_batch=2, kv_budget_tokens=10_000, num_slots=1, prefill_chunk=8, canvas_length=4,
                      max_wait_plans=4)
    runner = FakeRunner(sched)
    sched.add(make_req("busy", max_new=4, steps=200))
    sched.add(make_req("l", priority=2))
    for _ in range(waited):
        plan = sched.plan()
        sched.update(plan, runner.run(plan))
    sched.add(make_req("h", priority=0))
    order = []
    while (plan := sched.plan()) is not None:
        order += [i.request_id for i in plan.encode if i.kind == "prefill" and i.request_id not in order]
        sched.update(plan, runner.run(plan))
    assert order[0] == first


def test_held_requests_sit_out_denoise_and_commit_but_not_prefill():
    """plan(hold=...): a request whose constraint work is still running is left out of denoise and commit
    items; its prompt chunks and the other requests go ahead, and it resumes once no longer held."""
    sched = Scheduler(max_batch=4, kv_budget_tokens=1000, num_slots=4, prefill_chunk=2, canvas_length=4)
    runner = FakeRunner(sched)
    a, b = make_req("a", prompt_len=4), make_req("b", prompt_len=2)
    sched.add(a)
    sched.add(b)
    hold = frozenset({"a"})
    seen_a = []
    for _ in range(6):
        plan = sched.plan(hold=hold)
        assert not any(i.request_id == "a" for i in plan.denoise)
        assert not any(i.request_id == "a" and i.kind == "commit" for i in plan.encode)
        seen_a += [i.kind for i in plan.encode if i.request_id == "a"]
        sched.update(plan, runner.run(plan))
    assert seen_a == ["prefill", "prefill"] and a.prefilled_len == 4 and a.needs_denoise
    assert b.output_ids  # b went on: it committed a canvas meanwhile
    while (plan := sched.plan()) is not None:  # no longer held: a runs to the end
        sched.update(plan, runner.run(plan))
    assert len(a.output_ids) == a.max_new_tokens


class FakeClock:
    """A clock the test moves."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_spent_max_time_makes_the_canvas_in_progress_the_last():
    sched = Scheduler(max_batch=4, kv_budget_tokens=200, num_slots=4, prefill_chunk=8, canvas_length=4)
    clock = sched.clock = FakeClock()
    timed = make_req("timed", prompt_len=8, max_new=12, steps=10, max_time=2.5)  # 3 canvases, 10 steps each
    late = make_req("late", prompt_len=8, max_new=12, steps=10, max_time=4.5)  # its budget runs out in canvas 1
    free = make_req("free", prompt_len=8, max_new=12, steps=10)
    for r in (timed, late, free):
        sched.add(r)
    runner = FakeRunner(sched, converge=lambda rid, k: 2 if (rid, k) == ("late", 0) else None)

    def tick(plan):
        clock.now += 1.0

    plans = drive(sched, runner, before_update=tick)
    steps = {rid: [(d.canvas_index, d.denoise_step) for p in plans for d in p.denoise if d.request_id == rid]
             for rid in ("timed", "late", "free")}
    # timed: clock 1, 2, 3 s after its first denoising plan -> 3 steps, then its commit is final
    assert steps["timed"] == [(0, 0), (0, 1), (0, 2)]
    assert timed.finish_reason == "length" and timed.output_ids == runner.expected["timed"] == canvas_tokens("timed", 0, 4)
    # late: canvas 0 converges after 2 steps and is committed (not final: 2 s spent); canvas 1's second step
    # ends 5 s after the first, past its 4.5 s
    assert steps["late"] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert late.finish_reason == "length" and len(late.output_ids) == 8
    # free: no budget, all 3 canvases x 10 steps
    assert len(steps["free"]) == 30 and len(free.output_ids) == 12 and free.finish_reason == "length"
    finals = [(i.request_id, i.final) for p in plans for i in p.encode if i.kind == "commit"]
    assert ("timed", True) in finals and ("late", False) in finals and ("late", True) in finals
    assert not any(f for rid, f in finals if rid == "free")
    assert sched.kv_used == 0


def test_a_final_commit_must_finish_its_request():
    sched = Scheduler(max_batch=4, kv_budget_tokens=100, num_slots=1, prefill_chunk=8, canvas_length=4)
    sched.clock = FakeClock()
    sched.add(make_req("a", prompt_len=4, max_new=12, steps=5, max_time=0.5))
    sched.update(plan := sched.plan(), StepResult())  # prefill
    plan = sched.plan()  # one step, which takes a second: the budget is spent
    sched.clock.now = 1.0
    sched.update(plan, StepResult())
    plan = sched.plan()
    (item,) = plan.encode
    assert item.kind == "commit" and item.final
    with pytest.raises(ValueError, match="final"):
        sched.update(plan, StepResult(committed={"a": (1, 2, 3, 4)}))
    sched.update(plan, StepResult(committed={"a": (1, 2, 3, 4)}, finished={"a": "length"}))
    assert sched.get("a") is None


def test_free_slots_holding_names_freed_slots_with_exactly_the_prompt():
    """What infill scoring reads instead of encoding the prompt again: a free slot whose last owner encoded
    exactly this prompt (its final canvas is never encoded), under the same adapter."""
    sched = Scheduler(max_batch=4, kv_budget_tokens=200, num_slots=3, prefill_chunk=4, canvas_length=4,
                      prefix_caching=True)
    one = RequestState("one", (11, 12, 13, 14, 15, 16), 4, 4, 3)  # one canvas: the slot ends holding the prompt
    two = RequestState("two", (21, 22, 23, 24, 25), 8, 4, 3)  # two canvases: the first is encoded behind it
    for r in (one, two):
        sched.add(r)
    drive(sched, FakeRunner(sched))
    assert len(sched.free_slots_holding(one.prompt_ids)) == 1 and sched.free_slots_holding(one.prompt_ids, lora=1) == []
    assert sched.free_slots_holding(two.prompt_ids) == []  # its KV runs on past the prompt
    assert sched.free_slots_holding(one.prompt_ids[:-1]) == []  # a prefix is not the prompt
    # a new request with that prompt takes the slot: it is no longer free
    sched.add(RequestState("three", one.prompt_ids, 4, 4, 3))
    sched.plan()
    assert sched.free_slots_holding(one.prompt_ids) == []
    plain = Scheduler(max_batch=4, kv_budget_tokens=200, num_slots=3, prefill_chunk=4, canvas_length=4)
    plain.add(RequestState("one", one.prompt_ids, 4, 4, 3))
    drive(plain, FakeRunner(plain))
    assert plain.free_slots_holding(one.prompt_ids) == []  # no prefix caching: freed slots are reset


def test_a_slot_retaken_before_a_plan_runs_is_kept_once_with_the_new_owners_prefix():
    """With prefix caching, a request admitted while held (a whole cached prompt, nothing to encode, its
    constraint work running) and cancelled before any plan ran, then replaced in its slot, leaves one reuse entry
    for the slot, the new owner's: two would be two index writes to one slot in the runner's batched update."""
    sched = Scheduler(max_batch=4, kv_budget_tokens=200, num_slots=1, prefill_chunk=4, canvas_length=4,
                      prefix_caching=True)
    sched.add(RequestState("one", (11, 12, 13, 14, 15, 16), 4, 4, 3))
    drive(sched, FakeRunner(sched))
    held = RequestState("held", (11, 12, 13, 14, 15, 16), 4, 4, 3)
    sched.add(held)
    assert sched.plan(hold=frozenset({"held"})) is None and held.slot == 0  # admitted, nothing to run
    sched.cancel("held")
    new = RequestState("new", (11, 12, 13, 14, 99), 4, 4, 3)
    sched.add(new)
    plan = sched.plan()
    assert [s for s, _ in plan.reuse] == [0] and plan.reuse[0][1] == new.prefilled_len == 4
