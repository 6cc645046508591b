"""Step-homogeneous micro-batching scheduler: decides what the runner does in each engine step.

Owns admission (FCFS under a KV-token budget and a fixed number of cache slots), chunked prefill,
which canvases take a denoising step together, when a finished canvas is committed, cancellation,
and the bookkeeping of every RequestState. It never touches tensors and imports no torch: the
runner executes a `StepPlan` and reports a `StepResult`.

One engine step is one plan:
  1. the runner resets every slot in `plan.freed_slots` (this very plan may reuse them), copies the
     prefixes in `plan.copies` from slot to slot, then cuts each slot in `plan.reuse` down to its first
     L positions (prefix caching, below);
  2. runs one encoder call over `plan.encode` (prefill chunks and canvas commits of many requests);
  3. runs one decoder call over `plan.denoise` (one denoising step for each listed canvas);
  4. calls `scheduler.update(plan, result)`; only then may `plan()` be called again.
A plan may hold encode and denoise work together (for different requests): the encoder runs first,
and mixing keeps the decoder busy while new prompts prefill (chunked-prefill style). A request
appears at most once per plan: a canvas whose prefill or commit is in this plan starts denoising in
the next one, so every state change follows from exactly one reported result.

Policy
- Admission: strict FCFS by (aged priority, arrival; see Fairness). A request reserves
  prompt_len + ceil(max_new_tokens / canvas_length) * canvas_length KV tokens and one slot until it
  finishes or is cancelled. The head of the queue that does not fit blocks the ones behind it, so a
  large request is never overtaken forever; it is never dropped. One larger than the whole budget
  is rejected by `add` with a ValueError.
- Encode: commits first (they complete output and let a running request move on), then prefill
  chunks (one chunk of <= prefill_chunk tokens per request per plan), each oldest first;
  at most max_batch items.
- Denoise: canvases are grouped by denoise_step; the largest group fills the batch first (ties:
  the group holding the oldest request), then the next groups, members oldest first, up to
  max_batch. Why: same-step canvases share step-dependent parameters (temperature/schedule) and
  tend to converge together, so batches stay homogeneous and their shapes stable. A canvas that
  stops early (or runs out of steps) just leaves the batch for a commit; the others continue.
- Latency budget (`RequestState.max_time`): timed by `clock` from the plan that first denoises the
  request. The first update that finds it spent stops the canvas just denoised, and its commit
  item is `final`: the runner finishes the request with that canvas.
- Fairness (aging): each plan that passes over a request with ready work bumps its `plans_waited`.
  Admission orders by priority value less one for every `max_wait_plans` plans waited (then arrival),
  so a lower value goes first (vLLM's `priority`) and yet a waiting request moves up until it is
  first. Once admitted, a request at `max_wait_plans` is overdue and its encode and denoise work goes
  ahead of the policy order above, overdue ones in pure arrival order. So under any stream of new
  requests an old request advances within a bounded number of plans.
- Prefix caching (`prefix_caching=True`): a freed slot keeps its KV, and the scheduler remembers the
  prompt tokens its owner encoded. A new request takes the free slot it can reuse the most of (ties:
  the slot freed longest ago, then the lowest) and skips encoding that part; the plan's `reuse` tells
  the runner to keep those positions and forget the rest (the runner's cache rebuilds the sliding
  layers' rings from its prefix store; with a bounded store, `prefix_store`, only prefixes whose ring it
  still holds are offered). A running request's encoded prompt chunks are offered too:
  the newcomer takes the free slot freed longest ago and `plan.copies` copies the prefix into it. A
  request whose prompt shares more with a prompt still being prefilled waits until those chunks are
  done (n > 1 choices, a burst with one system prompt): it would have spent as many plans encoding
  them itself, so the prefix is encoded once at no cost in plans. It does not hold up the queue.
  Reuse keeps results as they were: a prompt is always encoded in chunks that start at multiples of
  `prefill_chunk`, so reusing whole chunks (or a whole identical prompt) keeps exactly the rows a
  fresh encode would write, computed by the same calls. The price is that reuse comes in steps of
  `prefill_chunk` tokens. Canvases encoded at commits are not reused (a later prompt holding them
  would chunk them differently), and a request that ended in an error leaves nothing. Prompts are
  matched by chunk digests (`chunk_digest`), and the tokens of the chosen source are compared before
  any reuse.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, Mapping

from canvaslm.engine.request import RequestState, RequestStatus

EncodeKind = Literal["prefill", "commit"]


@dataclass(frozen=True)
class EncodeItem:
    """Encode sequence positions [start, end) of one request into its slot's KV."""

    request_id: str
    slot: int
    kind: EncodeKind
    start: int  # prompt positions start at 0; canvas i starts at prompt_len + i * canvas_length
    end: int
    token_ids: tuple[int, ...] = ()  # the prompt chunk for 'prefill'; empty for 'commit' (runner holds the canvas)
    final: bool = False  # a 'commit' that ends the request whatever its budget left (its max_time is spent)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class DenoiseItem:
    """Run one denoising step on the current canvas of one request."""

    request_id: str
    slot: int
    canvas_index: int
    denoise_step: int  # 0 means a fresh canvas: the runner initialises it (all masks)
    canvas_start: int  # sequence position of the canvas's first token


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    encode: tuple[EncodeItem, ...]
    denoise: tuple[DenoiseItem, ...]
    freed_slots: tuple[int, ...]  # reset these before running the items (a new owner may be in this plan)
    copies: tuple[tuple[int, int, int], ...] = ()  # (src, dst, L): copy src's first L positions into dst
    reuse: tuple[tuple[int, int], ...] = ()  # (slot, L): keep the slot's first L positions, forget the rest

    @property
    def request_ids(self) -> frozenset[str]:
        return frozenset(i.request_id for i in (*self.encode, *self.denoise))


@dataclass(frozen=True)
class StepResult:
    """What the runner reports after executing a plan. Items not named here simply completed."""

    early_stopped: frozenset[str] = frozenset()  # denoised canvases that converged this step
    committed: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # commit item -> canvas tokens
    finished: Mapping[str, str] = field(default_factory=dict)  # commit item -> 'stop' (EOS) | 'length'
    errors: Mapping[str, str] = field(default_factory=dict)  # any item -> message; finishes it with 'error'

    def __post_init__(self) -> None:  # accept any iterables, store immutable copies
        object.__setattr__(self, "early_stopped", frozenset(self.early_stopped))
        object.__setattr__(self, "committed", {k: tuple(v) for k, v in self.committed.items()})
        object.__setattr__(self, "finished", dict(self.finished))
        object.__setattr__(self, "errors", dict(self.errors))


def chunk_digest(tokens: tuple[int, ...], chunk: int) -> tuple[int, ...]:
    """One hash per whole chunk of `tokens`: prefix matching compares these, not every token."""
    return tuple(hash(tokens[i:i + chunk]) for i in range(0, len(tokens) - chunk + 1, chunk))


class Scheduler:
    def __init__(
        self,
        max_batch: int,
        kv_budget_tokens: int,
        num_slots: int,
        prefill_chunk: int,
        canvas_length: int,
        *,
        max_wait_plans: int = 16,
        prefix_caching: bool = False,
        prefix_store: tuple[int, int] | None = None,
        clock=time.perf_counter,
    ) -> None:
        """prefix_store: (sliding ring positions, prefix store positions) of the runner's cache when its
        store is bounded (kv_cache): only prefixes whose ring it can still rebuild are reused. None: the
        store holds every position. clock: seconds, read for requests with a `max_time`."""
        for name, value in [("max_batch", max_batch), ("kv_budget_tokens", kv_budget_tokens),
                            ("num_slots", num_slots), ("prefill_chunk", prefill_chunk),
                            ("canvas_length", canvas_length), ("max_wait_plans", max_wait_plans)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Scheduler: {name}={value!r}; expected an int >= 1")
        self.max_batch = max_batch
        self.kv_budget_tokens = kv_budget_tokens
        self.num_slots = num_slots
        self.prefill_chunk = prefill_chunk
        self.canvas_length = canvas_length
        self.max_wait_plans = max_wait_plans
        self.prefix_caching = prefix_caching
        self.prefix_store = prefix_store
        self.clock = clock

        self._waiting: dict[str, RequestState] = {}
        self._running: dict[str, RequestState] = {}  # PREFILLING or DENOISING: holds a slot and KV
        self._cancelled_in_flight: dict[str, RequestState] = {}  # slot/KV released at update()
        self._free_slots: list[int] = list(range(num_slots))  # min-heap: lowest slot first, deterministic
        self._freed_slots: list[int] = []  # reported to the runner in the next plan
        # prefix caching: per slot, the prompt its KV holds the first `held` tokens of (encoded from position
        # 0 in whole chunks), as (tokens, held, digest of its whole chunks, LoRA adapter); per live request, its digest
        self._slot_prompt: list[tuple[tuple[int, ...], int, tuple[int, ...], int]] = [((), 0, (), 0)] * num_slots
        self._digests: dict[str, tuple[int, ...]] = {}
        self._slot_freed_at: list[int] = [-1] * num_slots  # order of release (LRU among equal matches)
        # per slot, what its prefix store holds: positions [max(lo, written - store), written), where
        # `written` counts what the slot's (last) owner encoded: its prompt and continuing canvases
        self._slot_store_lo: list[int] = [0] * num_slots
        self._slot_written: list[int] = [0] * num_slots
        self._releases = itertools.count()
        self._reuse: list[tuple[int, int]] = []  # reported to the runner in the next plan
        self._copies: list[tuple[int, int, int]] = []  # likewise
        self._done: list[RequestState] = []  # finished without a step (take_done)
        self._kv_used = 0
        self._arrivals = itertools.count()
        self._step_ids = itertools.count()
        self._in_flight: StepPlan | None = None

    # ------------------------------------------------------------------ queries

    @property
    def kv_used(self) -> int:
        return self._kv_used

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._cancelled_in_flight or self._done)

    def get(self, request_id: str) -> RequestState | None:
        """A live request (waiting, running, or cancelled inside the plan in flight); None once gone."""
        for table in (self._running, self._waiting, self._cancelled_in_flight):
            if request_id in table:
                return table[request_id]
        return None

    def running(self) -> list[RequestState]:
        return list(self._running.values())

    # ------------------------------------------------------------------ requests in / out

    def add(self, request: RequestState) -> None:
        if self.get(request.request_id) is not None:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        if request.status is not RequestStatus.WAITING or request.arrival >= 0:
            raise ValueError(f"request {request.request_id!r} was already scheduled once (status {request.status.value})")
        if request.canvas_length != self.canvas_length:
            raise ValueError(f"request {request.request_id!r}: canvas_length={request.canvas_length}, "
                             f"expected the scheduler's canvas_length={self.canvas_length}")
        need = request.kv_tokens_needed
        if need > self.kv_budget_tokens:
            raise ValueError(
                f"request {request.request_id!r} needs {need} KV tokens (prompt {request.prompt_len} + "
                f"{request.num_canvases} canvases x {request.canvas_length}) but kv_budget_tokens is "
                f"{self.kv_budget_tokens}; shorten the prompt or max_new_tokens")
        request.arrival = next(self._arrivals)
        request.kv_reserved = need
        self._waiting[request.request_id] = request

    def cancel(self, request_id: str) -> RequestState | None:
        """Cancel in any state. Returns the request, or None if unknown / already finished."""
        if request_id in self._waiting:
            request = self._waiting.pop(request_id)
            self._mark_done(request, RequestStatus.CANCELLED, "cancelled")
            self._digests.pop(request_id, None)
            return request
        request = self._running.pop(request_id, None)
        if request is None:
            return None
        self._mark_done(request, RequestStatus.CANCELLED, "cancelled")
        if self._in_flight is not None and request_id in self._in_flight.request_ids:
            self._cancelled_in_flight[request_id] = request  # the runner is using the slot right now
        else:
            self._release(request)
        return request

    # ------------------------------------------------------------------ planning

    def plan(self, hold: frozenset = frozenset()) -> StepPlan | None:
        """The next step's work, or None when idle (freed slots then wait for the next plan). hold: ids of
        running requests whose commits and denoising wait this plan out (their constraint's host work is
        still running); their prefill chunks still go ahead."""
        if self._in_flight is not None:
            raise RuntimeError(f"plan() called while step {self._in_flight.step_id} is in flight; "
                               "call update() with its result first")
        self._admit()
        encode_reqs = self._pick_encode(hold)
        denoise_reqs = self._pick_denoise(hold)
        self._age({r.request_id for r in encode_reqs + denoise_reqs})
        if not encode_reqs and not denoise_reqs:
            return None
        now = self.clock()
        for r in denoise_reqs:
            if r.denoise_started is None:
                r.denoise_started = now
        plan = StepPlan(
            step_id=next(self._step_ids),
            encode=tuple(self._encode_item(r) for r in encode_reqs),
            denoise=tuple(DenoiseItem(r.request_id, r.slot, r.canvas_index, r.denoise_step, r.canvas_start)
                          for r in denoise_reqs),
            freed_slots=tuple(self._freed_slots),
            copies=tuple(self._copies),
            reuse=tuple(self._reuse),
        )
        self._freed_slots, self._reuse, self._copies = [], [], []
        self._in_flight = plan
        return plan

    def _overdue(self, request: RequestState) -> bool:
        return request.plans_waited >= self.max_wait_plans

    def take_done(self) -> list[RequestState]:
        """Requests that finished without a step (a prompt-only request whose whole prompt a slot already
        held), once each; the engine reports them after each `plan`."""
        done, self._done = self._done, []
        return done

    def _admit(self) -> None:
        def key(r: RequestState) -> tuple:  # priority aging: one step up per max_wait_plans plans waited
            return (r.priority - r.plans_waited // self.max_wait_plans, r.arrival)

        for request in sorted(self._waiting.values(), key=key):
            if not self._free_slots or self._kv_used + request.kv_reserved > self.kv_budget_tokens:
                break  # strict FCFS: the head blocks the queue rather than being overtaken forever
            source = self._best_source(request) if self.prefix_caching else None
            if source == "wait":
                continue  # its prefix is being encoded for another request right now
            if request.max_new_tokens == 0 and source is not None and source[1] == request.prompt_len:
                del self._waiting[request.request_id]  # prompt only, and already in a slot: nothing to do
                self._digests.pop(request.request_id, None)
                request.prefilled_len = request.cached_len = request.prompt_len
                self._mark_done(request, RequestStatus.FINISHED, "length")
                self._done.append(request)
                continue
            del self._waiting[request.request_id]
            self._take_slot(request, source)
            self._kv_used += request.kv_reserved
            request.status = (RequestStatus.DENOISING if request.prefilled_len == request.prompt_len
                              else RequestStatus.PREFILLING)
            request.plans_waited = 0
            self._running[request.request_id] = request

    def _digest(self, r: RequestState) -> tuple[int, ...]:
        d = self._digests.get(r.request_id)
        if d is None:
            d = self._digests[r.request_id] = chunk_digest(r.prompt_key, self.prefill_chunk)
        return d

    def _best_source(self, request: RequestState):
        """Where the request's prompt prefix can come from: (slot, L, running) with the largest L, None
        if nowhere, or "wait" when a request still prefilling will have encoded more of it."""
        prompt, digest = request.prompt_key, self._digest(request)
        fit = lambda n: request.reuse_point(n, self.prefill_chunk)  # noqa: E731 - never inside an image
        best = max(((s, self._restorable(s, self._slot_written[s],
                                         fit(self._match(*self._slot_prompt[s], prompt, digest, request.lora))), False)
                    for s in self._free_slots),
                   key=lambda c: (c[1], -self._slot_freed_at[c[0]], -c[0]), default=None)
        pending = 0
        for q in self._running.values():
            qd = self._digest(q)
            now = self._restorable(q.slot, self._written(q), fit(
                self._match(q.prompt_key, q.prefilled_len, qd, q.lora, prompt, digest, request.lora)))
            if best is None or now > best[1]:
                best = (q.slot, now, True)
            if q.needs_prefill:
                pending = max(pending, self._restorable(q.slot, q.prompt_len, fit(self._match(
                    q.prompt_key, q.prompt_len, qd, q.lora, prompt, digest, request.lora))))
        if pending > (best[1] if best else 0):
            return "wait"
        if best is None or best[1] == 0:
            return None
        held = self._slot_prompt[best[0]][0] if not best[2] else self._running_in(best[0]).prompt_key
        if held[:best[1]] != prompt[:best[1]]:  # digests matched but the tokens differ (a hash collision)
            return None
        return best

    def _written(self, request: RequestState) -> int:
        """Positions a running request's slot holds: its prompt so far, then each continuing canvas."""
        done = request.prefilled_len == request.prompt_len
        return request.prefilled_len + (request.canvas_index * self.canvas_length if done else 0)

    def _store_floor(self, slot: int, written: int) -> int:
        """The first position the slot's prefix store still holds when `written` positions are written."""
        return max(self._slot_store_lo[slot], written - self.prefix_store[1]) if self.prefix_store else 0

    def _restorable(self, slot: int, written: int, n: int) -> int:
        """n when a slot that has `written` positions can hand over its first n (its store still holds
        the positions a rebuilt sliding ring needs), else 0."""
        if not n or self.prefix_store is None:
            return n
        return n if n <= written and max(0, n - self.prefix_store[0]) >= self._store_floor(slot, written) else 0

    def _running_in(self, slot: int) -> RequestState:
        return next(q for q in self._running.values() if q.slot == slot)

    def _take_slot(self, request: RequestState, source=None) -> None:
        """Give the request a free slot; with prefix caching, one holding the most of its prompt (or the
        slot freed longest ago, with that prefix copied in from a running request's slot)."""
        if not self.prefix_caching:
            request.slot = heapq.heappop(self._free_slots)
            return
        src, keep, running = source if source is not None else (None, 0, False)
        if src is None or running:
            slot = min(self._free_slots, key=lambda s: (self._slot_freed_at[s], s))
        else:
            slot = src
        if running:
            self._copies.append((src, slot, keep))
            floor = self._store_floor(src, self._written(self._running_in(src)))
        else:
            floor = self._store_floor(slot, self._slot_written[slot]) if keep else 0
        if self.prefix_store is not None:  # the store's copy covers at most its length before `keep`
            floor = max(floor, keep - self.prefix_store[1])
        self._slot_store_lo[slot] = floor
        self._free_slots.remove(slot)
        heapq.heapify(self._free_slots)
        request.slot = slot
        request.prefilled_len = request.cached_len = keep
        self._slot_prompt[slot] = ((), 0, (), 0)  # the new owner's until it is released
        # an owner that took the slot since the last plan and was cancelled before one ran holds no more than the
        # slot's prefix, which bounds this keep: the new owner's entry alone says what the slot keeps
        self._reuse = [(s, n) for s, n in self._reuse if s != slot] + [(slot, keep)]

    def free_slots_holding(self, prompt_ids, lora: int = 0) -> list[int]:
        """The free slots whose KV holds exactly `prompt_ids` (under adapter `lora`) and nothing after it: their
        last owner encoded that prompt and no canvas behind it (prefix caching keeps a freed slot's KV).
        Scoring reads such a slot instead of encoding the prompt again."""
        if not self.prefix_caching:
            return []
        prompt = tuple(prompt_ids)
        return [slot for slot in sorted(self._free_slots)
                if self._slot_prompt[slot][1] == len(prompt) == self._slot_written[slot]
                and self._slot_prompt[slot][3] == lora and self._slot_prompt[slot][0][:len(prompt)] == prompt]

    def reusable(self, slot: int, prompt_ids: tuple[int, ...], lora: int = 0) -> int:
        """How many leading prompt tokens a request (of adapter `lora`) could take from the free `slot`'s KV."""
        prompt_ids = tuple(prompt_ids)
        n = self._match(*self._slot_prompt[slot], prompt_ids, chunk_digest(prompt_ids, self.prefill_chunk), lora)
        n = self._restorable(slot, self._slot_written[slot], n)
        return n if self._slot_prompt[slot][0][:n] == prompt_ids[:n] else 0

    def _match(self, tokens, held: int, digest, lora: int, prompt, prompt_digest, prompt_lora: int) -> int:
        """How many leading tokens of `prompt` KV holding the first `held` tokens of the encoded prompt
        `tokens` can give: whole prefill chunks in common, or all of them when the two are the same
        prompt (its last, partial chunk was encoded just as this prompt's would be); none when they
        were encoded under different LoRA adapters. Compares chunk digests, so the caller checks the
        tokens of the one it picks; this runs for every waiting request against every slot at every
        plan."""
        if lora != prompt_lora:
            return 0
        k, whole = 0, held // self.prefill_chunk
        for a, b in zip(digest[:whole], prompt_digest):
            if a != b:
                break
            k += 1
        n = k * self.prefill_chunk
        if k == whole == len(prompt_digest) and held == len(prompt) and tokens[n:held] == prompt[n:]:
            return held
        return n

    def _pick_encode(self, hold) -> list[RequestState]:
        def key(r: RequestState) -> tuple:
            if self._overdue(r):
                return (0, r.arrival)
            return (1, 0 if r.needs_commit else 1, r.priority, r.arrival)

        ready = [r for r in self._running.values()
                 if r.needs_prefill or (r.needs_commit and r.request_id not in hold)]
        return sorted(ready, key=key)[: self.max_batch]

    def _pick_denoise(self, hold) -> list[RequestState]:
        ready = [r for r in self._running.values() if r.needs_denoise and r.request_id not in hold]
        if len(ready) <= self.max_batch:
            return sorted(ready, key=lambda r: (r.denoise_step, r.priority, r.arrival))
        groups: dict[int, list[RequestState]] = defaultdict(list)
        for r in ready:
            groups[r.denoise_step].append(r)
        group_rank = {step: (-len(members), min((m.priority, m.arrival) for m in members))
                      for step, members in groups.items()}

        def key(r: RequestState) -> tuple:
            if self._overdue(r):
                return (0, r.arrival)
            return (1, group_rank[r.denoise_step], r.priority, r.arrival)

        return sorted(ready, key=key)[: self.max_batch]

    def _age(self, scheduled: set[str]) -> None:
        for r in itertools.chain(self._waiting.values(), self._running.values()):
            r.plans_waited = 0 if r.request_id in scheduled else r.plans_waited + 1

    def _encode_item(self, r: RequestState) -> EncodeItem:
        if r.needs_commit:
            start = r.canvas_start
            return EncodeItem(r.request_id, r.slot, "commit", start, start + r.canvas_length, final=r.out_of_time)
        start = r.prefilled_len
        end = r.prefill_end(start, self.prefill_chunk)  # an image stays in one call (it sees itself both ways)
        return EncodeItem(r.request_id, r.slot, "prefill", start, end, r.prompt_ids[start:end])

    # ------------------------------------------------------------------ results

    def update(self, plan: StepPlan, result: StepResult) -> list[RequestState]:
        """Apply the runner's result for `plan`. Returns the requests that finished in this step."""
        if plan is not self._in_flight:
            raise ValueError(f"update() got step {plan.step_id}, but the plan in flight is "
                             f"{None if self._in_flight is None else self._in_flight.step_id}")
        self._validate(plan, result)  # before any mutation, so a bad result can be fixed and resent
        self._in_flight = None
        finished: list[RequestState] = []
        for item in plan.encode:
            request = self._running.get(item.request_id)
            if request is None:
                continue  # cancelled while the step ran: its result is dropped
            if item.request_id in result.errors:
                finished.append(self._finish(request, "error"))
            elif item.kind == "prefill":
                request.prefilled_len = item.end
                if request.prefilled_len == request.prompt_len and request.max_new_tokens == 0:
                    finished.append(self._finish(request, "length"))  # prompt only: its KV stays for reuse
                elif request.prefilled_len == request.prompt_len:
                    request.status = RequestStatus.DENOISING
            else:
                reason = self._commit(request, result.committed[item.request_id], result.finished.get(item.request_id))
                if reason is not None:
                    finished.append(self._finish(request, reason))
        now = self.clock()
        for item in plan.denoise:
            request = self._running.get(item.request_id)
            if request is None:
                continue
            if item.request_id in result.errors:
                finished.append(self._finish(request, "error"))
                continue
            request.denoise_step += 1
            if request.max_time is not None and now - request.denoise_started >= request.max_time:
                request.out_of_time = True
            if (item.request_id in result.early_stopped or request.denoise_step >= request.max_denoising_steps
                    or request.out_of_time):
                request.canvas_ready = True
        for request in self._cancelled_in_flight.values():
            self._release(request)
        self._cancelled_in_flight.clear()
        return finished

    def _commit(self, request: RequestState, tokens: tuple[int, ...], reason: str | None) -> str | None:
        """Append a committed canvas; returns the finish reason, or None to start the next canvas."""
        room = request.max_new_tokens - len(request.output_ids)
        request.output_ids.extend(tokens[:room])  # the last canvas may overshoot max_new_tokens
        if len(tokens) > room or (reason is None and len(request.output_ids) >= request.max_new_tokens):
            reason = "length"  # an EOS cut off by max_new_tokens never reached the output
        if reason is None:
            request.canvas_index += 1
            request.denoise_step = 0
            request.canvas_ready = False
        return reason

    def _validate(self, plan: StepPlan, result: StepResult) -> None:
        ids = plan.request_ids
        commit_ids = {i.request_id for i in plan.encode if i.kind == "commit"}
        denoise_ids = {i.request_id for i in plan.denoise}
        for name, keys, allowed in [("early_stopped", result.early_stopped, denoise_ids),
                                    ("committed", result.committed, commit_ids),
                                    ("finished", result.finished, commit_ids),
                                    ("errors", result.errors, ids)]:
            extra = set(keys) - allowed
            if extra:
                raise ValueError(f"StepResult.{name} names {sorted(extra)}, which have no matching item in step {plan.step_id}")
        for rid, reason in result.finished.items():
            if reason not in ("stop", "length"):
                raise ValueError(f"StepResult.finished[{rid!r}]={reason!r}; expected 'stop' or 'length'")
        for item in plan.encode:
            if item.final and item.request_id in result.committed and item.request_id not in result.finished:
                raise ValueError(f"StepResult.finished lacks request {item.request_id!r}, whose commit in step "
                                 f"{plan.step_id} is final")
        for rid in commit_ids:
            if rid not in self._running or rid in result.errors:
                continue
            if rid not in result.committed:
                raise ValueError(f"StepResult.committed lacks request {rid!r}, committed in step {plan.step_id}")
            n = len(result.committed[rid])
            continues = rid not in result.finished
            if n > self.canvas_length or (continues and n != self.canvas_length and
                                          len(self._running[rid].output_ids) + n < self._running[rid].max_new_tokens):
                raise ValueError(f"StepResult.committed[{rid!r}] has {n} tokens; expected {self.canvas_length} "
                                 "(fewer only for a canvas that finishes the request)")

    # ------------------------------------------------------------------ bookkeeping

    def _finish(self, request: RequestState, reason: str) -> RequestState:
        del self._running[request.request_id]
        self._mark_done(request, RequestStatus.FINISHED, reason)
        self._release(request)
        return request

    @staticmethod
    def _mark_done(request: RequestState, status: RequestStatus, reason: str) -> None:
        request.status = status
        request.finish_reason = reason

    def _release(self, request: RequestState) -> None:
        """Give back the request's slot and KV reservation (no-op for a never-admitted request)."""
        if request.slot is None:
            return
        heapq.heappush(self._free_slots, request.slot)
        if self.prefix_caching:
            self._remember(request)
        else:
            self._freed_slots.append(request.slot)
        self._digests.pop(request.request_id, None)
        self._kv_used -= request.kv_reserved
        request.slot = None

    def _remember(self, request: RequestState) -> None:
        """Record the prompt prefix the released slot's KV holds (a failed step may have written
        anything: then nothing)."""
        if request.finish_reason == "error":
            self._slot_prompt[request.slot] = ((), 0, (), 0)
        else:
            self._slot_prompt[request.slot] = (request.prompt_key, request.prefilled_len, self._digest(request),
                                               request.lora)
        # a request cancelled while a step ran may have written one more chunk or canvas than it counts
        longest = max(self.prefill_chunk + max((b - a for a, b in request.images.spans), default=0)
                      if request.images is not None else self.prefill_chunk, self.canvas_length)
        extra = longest if request.finish_reason == "cancelled" else 0
        self._slot_written[request.slot] = self._written(request) + extra
        self._slot_freed_at[request.slot] = next(self._releases)
