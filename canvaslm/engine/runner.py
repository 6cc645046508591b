"""Executes a scheduler `StepPlan` on the model: one batched encoder call, one batched decoder call.

Owns every tensor of the running requests: a persistent `KVCache(num_slots, max_model_len)` and, per
cache slot, the canvas being denoised, its argmax draft, its self-conditioning embeddings, its
stability history, and the hidden state of the last position its KV holds (`prompt_head`: infill
scoring reads a freed slot's prompt instead of encoding it again). Per request it holds the sampling
setup (resolved `DiffusionParams`, its own `torch.Generator` seeded from the request seed, EOS ids, an
optional canvas constraint).

A request's output depends only on its prompt, parameters and seed, never on what it is batched
with: randomness comes from its own generator, drawn in the order `generate.generate_rows` draws it
for a single row (canvas init, then per step: sample, renoise), and rows that join a decoder call at
their first step get zero self-conditioning, which the model maps to exactly "none".

Self-conditioning is kept as soft embeddings [C, d] per slot (computed right after each step) rather
than logits [C, V]: the same maths, but a step only gathers/scatters d-wide rows.

A canvas constraint's host work (its mask for a new canvas, its commit pass over a finished one: about a
second each for JSON at a 65k vocabulary on a CPU) can run on a worker thread (`host_worker`; by default
where the model is on a GPU), started as soon as its inputs exist: the first mask when the request is added, the next one when a canvas is committed, the commit
pass when a canvas stops denoising. `held()` names the requests waiting for theirs; an engine leaves
them out of its plans (`Scheduler.plan(hold=...)`) so the other requests keep stepping. A plan that
includes one anyway just waits for its result, so every caller gets the same outputs. When that work
raises, only its request fails (`StepResult.errors`, naming the mask or commit pass); the rest of the
step goes on.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import DiffusionParams
from ..generate import narrowed_sc_logits
from ..kernels.philox import seeded_generator
from ..kv_cache import KVCache
from ..multimodal import encoder_images
from ..sampling import logit_bias as bias_lib
from ..sampling.penalties import PenaltyState, penalty_state
from ..sampling.thinking import ThinkingBudget, ThoughtTracker
from ..sampling.samplers import (CanvasState, SamplerParams, ban_unsampleable, checked_impl, entropy_bound_step,
                                 randint, sampleable_vocab)
from .scheduler import EncodeItem, StepPlan, StepResult

log = logging.getLogger("canvaslm.engine")

@dataclass(frozen=True)
class Draft:
    """The current argmax canvas of a request that asked for drafts (after one denoising step)."""

    request_id: str
    canvas_index: int
    denoise_step: int  # steps done on this canvas, >= 1
    token_ids: tuple[int, ...]  # the full canvas argmax, before EOS truncation


@dataclass(frozen=True)
class StepOutput:
    result: StepResult
    drafts: tuple[Draft, ...] = ()


@dataclass
class _Request:
    """Sampling setup and counters of one request (its tensors live in the slot buffers)."""

    params: DiffusionParams
    eos_ids: frozenset
    generator: torch.Generator
    constraint: object | None
    drafts: bool
    slot: int | None = None
    canvas_index: int = 0  # the canvas last denoised (the one a commit item commits)
    last_logits: torch.Tensor | None = None  # [C, V] processed logits of the last step (constraint commits)
    num_committed: int = 0
    decoder_passes: int = 0
    canvas_constraint: tuple | None = None  # (canvas_index, pinned [C] | None, allowed [C, V] | None)
    bias: torch.Tensor | None = None  # [V] logit bias (sampling.logit_bias)
    min_tokens: int = 0  # no EOS before this many output tokens
    lora: int = 0  # served LoRA adapter id (lora_serving), 0: the base model
    host_job: tuple | None = None  # (kind "mask" | "commit", canvas index, Future): constraint work in flight
    penalty: PenaltyState | None = None  # frequency / presence / repetition penalties (sampling.penalties)
    images: object | None = None  # multimodal.ImageInputs: soft tokens for the prompt's image positions
    thought: ThoughtTracker | None = None  # a thinking budget's progress (sampling.thinking)


MIN_ROWS = 16  # see Runner._encode


class RunnerError(ValueError):
    """A request cannot be run as registered (e.g. parameters the runner's buffers cannot hold)."""


class Runner:
    def __init__(self, model, num_slots: int, max_model_len: int, history_depth: int = 1,
                 prefix_caching: bool = False, host_worker: bool | None = None, prefix_store_len: int | None = None,
                 kv_dtype: torch.dtype | None = None, sampler_impl: str = "auto"):
        """prefix_caching: the cache keeps what `StepPlan.reuse` needs (the prefix store: a longer copy of
        the sliding rings, `prefix_store_len` positions; None: every position). kv_dtype: what the cache
        stores K and V in (default: the model's dtype; kv_cache). sampler_impl: how each step draws its
        samples (`samplers.SAMPLER_IMPLS`).
        host_worker: constraint masks and commit passes on a worker thread (False: inside the step). None:
        on where the model is on a GPU, whose steps are short next to that work; on a CPU a step takes
        about as long, and a request that waits for its work then waits out a whole step too
        (bench/constraint_worker.py)."""
        cfg = model.cfg
        if num_slots < 1 or max_model_len <= cfg.canvas_length:
            raise RunnerError(f"Runner: num_slots={num_slots} must be >= 1 and max_model_len={max_model_len} "
                              f"must exceed canvas_length={cfg.canvas_length}")
        self.model, self.cfg = model, cfg
        self.sampler_impl = checked_impl(sampler_impl, "Runner: sampler_impl", RunnerError)
        self.device, self.dtype = model.embed_weight.device, model.embed_weight.dtype
        self.num_slots, self.max_model_len, self.history_depth = num_slots, max_model_len, history_depth
        C, d, S = cfg.canvas_length, cfg.hidden_size, num_slots
        # one extra scratch slot: the target of all-padding rows that keep small encoder calls batch-invariant
        self.cache = KVCache(cfg, S + 1, max_model_len, dtype=kv_dtype or self.dtype, device=self.device,
                             prefix_store=prefix_caching, store_len=prefix_store_len, compute_dtype=self.dtype)
        self.canvas = torch.zeros(S, C, dtype=torch.long, device=self.device)  # [S, C]
        self.argmax = torch.zeros(S, C, dtype=torch.long, device=self.device)  # [S, C]
        self.sc_embeds = torch.zeros(S, C, d, dtype=self.dtype, device=self.device)  # [S, C, d]
        self.history = torch.full((S, history_depth, C), -1, dtype=torch.long, device=self.device)  # [S, D, C]
        self.requests: dict[str, _Request] = {}
        self._errors: dict[str, str] = {}  # request id -> message: constraint work that failed in this step
        self.host_worker = self.device.type == "cuda" if host_worker is None else host_worker
        self._host: ThreadPoolExecutor | None = None  # one worker: constraint objects may share caches
        self.on_host_done: Callable[[], None] | None = None  # called (on the worker) when a job ends
        self._slot_params: list[DiffusionParams | None] = [None] * S
        # per slot, the final-normed hidden state of the last position its KV holds (set by every encode):
        # scoring a continuation of exactly that KV needs it for the continuation's first token
        self.last_hidden = torch.zeros(S + 1, d, dtype=self.dtype, device=self.device)  # [S + 1, d]
        self.last_pos = [-1] * (S + 1)  # its position (host), -1: none
        if model.lora_serving is not None:  # the adapter table covers every slot and the padding one
            model.lora_serving.ensure_slots(S)

    # ------------------------------------------------------------------ registration

    def add(self, request_id: str, params: DiffusionParams, seed: int, eos_ids, constraint=None,
            drafts: bool = False, logit_bias: tuple = (), min_tokens: int = 0, lora: int = 0,
            prompt_ids=None, images=None, thinking: ThinkingBudget | None = None) -> None:
        """Register a request before the scheduler plans it. lora: a served adapter's id (0: none).
        prompt_ids: what a repetition penalty counts besides the output (needed when it is set).
        images: multimodal.ImageInputs for the prompt's image positions. thinking: the most tokens its
        thought channel may take (sampling.thinking)."""
        if request_id in self.requests:
            raise RunnerError(f"request id {request_id!r} is already registered with the runner")
        if params.stability_depth > self.history_depth:  # a threshold it caps is never met at history_depth
            raise RunnerError(f"stability_threshold={params.stability_threshold} (with max_denoising_steps="
                              f"{params.max_denoising_steps}) exceeds the runner's history_depth={self.history_depth}")
        gen = seeded_generator(seed, self.device)  # all 64 bits count, on a CPU too (as LLM.generate's)
        if constraint is not None and hasattr(constraint, "for_row"):  # per-request slot states
            constraint = constraint.for_row()
        try:
            pairs = bias_lib.normalize(logit_bias, "logit_bias", self.cfg.vocab_size)
        except bias_lib.LogitBiasError as e:
            raise RunnerError(f"request {request_id!r}: {e}") from None
        bias = bias_lib.dense(pairs, self.cfg.vocab_size, self.device)
        if min_tokens < 0:
            raise RunnerError(f"request {request_id!r}: min_tokens={min_tokens} must be >= 0")
        if params.repetition_penalty != 1 and prompt_ids is None:
            raise RunnerError(f"request {request_id!r}: a repetition penalty needs the prompt ids")
        penalty = penalty_state(params, prompt_ids or (), eos_ids, self.cfg.vocab_size, self.device)
        served = self.model.lora_serving
        if lora and served is None:
            raise RunnerError(f"request {request_id!r}: LoRA adapter id {lora} is not served by this model")
        if served is not None:  # counts the adapter's users, so unloading it waits for them
            try:
                served.started(lora)
            except ValueError as e:
                raise RunnerError(f"request {request_id!r}: {e}") from None
        thought = None if thinking is None else thinking.tracker(prompt_ids or ())
        req = self.requests[request_id] = _Request(params, frozenset(eos_ids), gen, constraint, drafts, bias=bias,
                                                   min_tokens=min_tokens, lora=lora, penalty=penalty, images=images,
                                                   thought=thought)
        if constraint is not None:
            self._start_mask(req, 0)

    def remove(self, request_id: str) -> None:
        """Forget a finished or cancelled request (its slot is reset when the scheduler frees it)."""
        req = self.requests.pop(request_id, None)
        if req is not None and req.host_job is not None:
            req.host_job[2].cancel()  # a job already running ends unread
        if req is not None and self.model.lora_serving is not None:
            self.model.lora_serving.finished(req.lora)

    # ------------------------------------------------------------------ constraint host work

    def held(self) -> frozenset:
        """Requests whose constraint work (a mask or a commit pass) is still running. Jobs are started,
        read and listed on the engine thread only; the worker just runs them."""
        return frozenset(rid for rid, r in self.requests.items()
                         if r.host_job is not None and not r.host_job[2].done())

    def _mask_job(self, req: _Request, k: int):
        C, V = self.cfg.canvas_length, self.cfg.vocab_size
        return lambda: req.constraint.canvas(k, C, V)

    def _commit_job(self, req: _Request, canvas: torch.Tensor):
        k, logits = req.canvas_index, req.last_logits
        return lambda: req.constraint.commit(k, canvas, logits)

    def _start(self, req: _Request, kind: str, k: int, job) -> None:
        """Run job() on the worker as the request's (kind, k) work."""
        if self._host is None:
            self._host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="canvaslm-constraint")
        fut = self._host.submit(job)
        req.host_job = (kind, k, fut)
        if self.on_host_done is not None:
            fut.add_done_callback(lambda _: self.on_host_done())

    def _start_mask(self, req: _Request, k: int) -> None:
        if self.host_worker:
            self._start(req, "mask", k, self._mask_job(req, k))

    def _start_commit(self, req: _Request, slot: int) -> None:
        if self.host_worker:
            self._start(req, "commit", req.canvas_index, self._commit_job(req, self.argmax[slot].clone()))

    def _result(self, rid: str, req: _Request, kind: str, k: int, job):
        """The result of the request's (kind, k) work: its worker job's (waiting for it if needed), or
        job() run here when none was started. If the work raises, the request fails alone: its error is
        kept for this step's result and None comes back."""
        started = req.host_job
        try:
            if started is None or started[:2] != (kind, k):
                return job()
            req.host_job = None
            return started[2].result()
        except Exception as e:  # noqa: BLE001 - a constraint bug or limit fails its own request only
            log.exception("request %s: constraint %s for canvas %d failed", rid, kind, k)
            what = "mask" if kind == "mask" else "commit pass"
            self._errors[rid] = f"the output constraint's {what} for canvas {k} failed: {type(e).__name__}: {e}"
            return None

    def close(self) -> None:
        """Stop the constraint worker (jobs in flight end unread)."""
        if self._host is not None:
            self._host.shutdown(wait=False, cancel_futures=True)
            self._host = None

    def prompt_head(self, slot: int, prompt_len: int) -> torch.Tensor | None:
        """The hidden state [d] of position prompt_len - 1 when it is the last one the slot's KV holds (so a
        continuation can be scored against that KV: scoring.score_continuations' `held`), else None."""
        return self.last_hidden[slot] if self.last_pos[slot] == prompt_len - 1 else None

    def decoder_passes(self, request_id: str) -> int:
        r = self.requests.get(request_id)
        return r.decoder_passes if r is not None else 0

    # ------------------------------------------------------------------ one engine step

    @torch.no_grad()
    def execute(self, plan: StepPlan) -> StepOutput:
        served = self.model.lora_serving
        with served.by_slot() if served is not None else contextlib.nullcontext():  # rows' adapters by slot
            return self._execute(plan)

    def _execute(self, plan: StepPlan) -> StepOutput:
        self._errors = {}
        if plan.freed_slots:
            self.cache.reset(list(plan.freed_slots))
        for src, dst, n in plan.copies:  # prefix caching: a running request's prompt prefix, for a newcomer
            self.cache.copy_prefix(src, dst, n)
        if plan.reuse:  # prefix caching: a new owner keeps the prompt prefix the slot already holds
            self.cache.keep_prefix([s for s, _ in plan.reuse], [n for _, n in plan.reuse])
        for slot in plan.freed_slots:
            self.last_pos[slot] = -1
        for src, dst, n in plan.copies:  # the copy ends where the source's last encode did: its state holds
            self.last_pos[dst] = n - 1 if self.last_pos[src] == n - 1 else -1
            self.last_hidden[dst] = self.last_hidden[src]
        for slot, n in plan.reuse:
            if self.last_pos[slot] >= n:
                self.last_pos[slot] = -1
        for item in (*plan.encode, *plan.denoise):
            req = self._get(item.request_id)
            if req.slot != item.slot:
                req.slot = item.slot
                self._slot_params[item.slot] = req.params
                if self.model.lora_serving is not None:  # the slot's rows use the request's adapter
                    self.model.lora_serving.assign(item.slot, req.lora)
        committed, finished = self._commit_and_prefill(plan.encode)
        early, drafts = self._denoise(plan)
        errors = self._errors
        early = early - errors.keys()
        drafts = tuple(d for d in drafts if d.request_id not in errors)
        return StepOutput(StepResult(early_stopped=early, committed=committed, finished=finished, errors=errors),
                          drafts)

    def _get(self, request_id: str) -> _Request:
        req = self.requests.get(request_id)
        if req is None:
            raise RunnerError(f"request {request_id!r} is in the plan but was never added to the runner")
        return req

    def _commit_and_prefill(self, items: tuple[EncodeItem, ...]):
        """Decide each commit (EOS / budget), then encode prefill chunks and continuing canvases together."""
        C = self.cfg.canvas_length
        commits = [i for i in items if i.kind == "commit"]
        committed, finished, encode = {}, {}, [i for i in items if i.kind == "prefill"]
        if commits:
            slots = torch.tensor([i.slot for i in commits], device=self.device)
            canvases = self.argmax.index_select(0, slots)  # [N, C]
            for n, item in enumerate(commits):  # a constraint fixes its canvas (pins, valid value slots)
                req = self.requests[item.request_id]
                if req.constraint is not None and hasattr(req.constraint, "commit"):
                    fixed = self._result(item.request_id, req, "commit", req.canvas_index,
                                         self._commit_job(req, canvases[n]))
                    if fixed is not None:
                        canvases[n] = fixed.to(canvases.device)
                        self.argmax[item.slot] = canvases[n]
            for item, ids in zip(commits, canvases.tolist()):  # the one host sync for commits
                if item.request_id in self._errors:  # its commit pass failed: nothing is committed
                    continue
                req = self.requests[item.request_id]
                room = req.params.max_new_tokens - req.num_committed
                cut = next((j for j, t in enumerate(ids) if t in req.eos_ids), None)
                if cut is not None and cut < room:  # EOS inside the budget: keep it, stop
                    tokens, reason = ids[:cut + 1], "stop"
                elif room <= C or item.final:  # budget or time reached (an EOS past it never shows)
                    tokens, reason = ids[:room], "length"
                else:
                    tokens, reason = ids, None
                    encode.append(item)
                    if req.constraint is not None:  # the next canvas's mask, while this one is encoded
                        self._start_mask(req, req.canvas_index + 1)
                committed[item.request_id] = tokens
                req.num_committed += len(tokens)
                if req.penalty is not None and reason is None:  # what the next canvases see as output so far
                    req.penalty.commit(tokens)
                if req.thought is not None and reason is None:
                    req.thought.commit(tokens)
                if reason is not None:
                    finished[item.request_id] = reason
        # One call per token length: right-padding would change the attention's reduction length and so
        # the low bits of a row's result, and a request's output would depend on its batch-mates.
        # A request's first prefill chunk skips its slot's empty cache rows (`fresh`), so first chunks
        # are grouped apart from the rest for the same reason.
        by_len: dict[tuple[int, bool], list[EncodeItem]] = {}
        for item in encode:
            by_len.setdefault((item.num_tokens, _is_first_chunk(item)), []).append(item)
        for (_, fresh), group in by_len.items():
            self._encode(group, fresh)
        return committed, finished

    def _encode(self, items: list[EncodeItem], fresh: bool = False) -> None:
        n, T = len(items), max(i.num_tokens for i in items)
        # BLAS picks row-count-dependent kernels under MIN_ROWS rows (B * T): pad the batch with rows of
        # padding only (they write nothing), so a prompt's KV never depends on what it is encoded with
        B = max(n, -(-MIN_ROWS // T))
        tokens = torch.full((B, T), self.cfg.pad_token_id or 0, dtype=torch.long)  # [B, T], right-padded
        positions = torch.full((B, T), -1, dtype=torch.long)  # [B, T], -1 = padding
        for b, item in enumerate(items):
            positions[b, :item.num_tokens] = torch.arange(item.start, item.end)
            if item.kind == "prefill":
                tokens[b, :item.num_tokens] = torch.tensor(item.token_ids)
        tokens = tokens.to(self.device)
        rows = [b for b, i in enumerate(items) if i.kind == "commit"]
        if rows:  # committed canvases come straight from the device-side argmax buffer
            slots = torch.tensor([items[b].slot for b in rows], device=self.device)
            tokens[torch.tensor(rows, device=self.device), :self.cfg.canvas_length] = self.argmax.index_select(0, slots)
        meta = torch.tensor([[i.slot for i in items] + [self.num_slots] * (B - n),  # one transfer: [2, B]
                             [i.num_tokens - 1 for i in items] + [0] * (B - n)], device=self.device)
        slots, last = meta[0], meta[1, :n]
        image_embeds, image_mask = encoder_images(
            [(b, getattr(self.requests.get(i.request_id), "images", None), i.start, i.end)
             for b, i in enumerate(items) if i.kind == "prefill"], B, T, self.device)
        hidden = self.model.encode(tokens, positions.to(self.device), slots, self.cache, fresh=fresh,
                                   max_position=max(i.end for i in items) - 1, image_embeds=image_embeds,
                                   image_mask=image_mask)  # [B, T, d]
        # each row's last position: the state that scores what follows it (prompt_head)
        self.last_hidden.index_copy_(0, slots[:n], hidden[torch.arange(n, device=self.device), last].to(self.dtype))
        for item in items:
            self.last_pos[item.slot] = item.end - 1

    def _denoise(self, plan: StepPlan):
        items = plan.denoise
        if not items:
            return frozenset(), ()
        C, V, B = self.cfg.canvas_length, self.cfg.vocab_size, len(items)
        reqs = [self.requests[i.request_id] for i in items]
        gens = [r.generator for r in reqs]
        meta = torch.tensor([[i.slot for i in items], [i.canvas_start for i in items],
                             [i.denoise_step for i in items]], device=self.device)  # [3, B]
        slots, starts, steps = meta[0], meta[1], meta[2]
        pinned, allowed = self._constraints(items, reqs)

        fresh = [b for b, i in enumerate(items) if i.denoise_step == 0]
        if fresh:  # a new canvas: uniform noise (pinned tokens in place), empty history, no self-conditioning
            fs = slots[fresh]
            noise = randint(V, len(fresh), C, [gens[b] for b in fresh], self.device)  # [F, C]
            if pinned is not None:
                noise = torch.where(pinned[fresh] >= 0, pinned[fresh], noise)
            self.canvas[fs] = noise
            self.argmax[fs] = noise
            self.history[fs] = -1
            self.sc_embeds[fs] = 0
        canvas = self.canvas.index_select(0, slots)  # [B, C]
        sc = None if len(fresh) == B else self.sc_embeds.index_select(0, slots)  # [B, C, d]
        logits = self.model.denoise(canvas, slots, self.cache, sc_embeds=sc, canvas_start=starts,
                                    max_start=max(i.canvas_start for i in items))  # [B, C, V]
        if any(r.bias is not None for r in reqs):
            bias_lib.apply(logits, [r.bias for r in reqs])
        for b, (item, r) in enumerate(zip(items, reqs)):
            if r.min_tokens > item.canvas_index * C:  # host values only: no sync
                bias_lib.ban_before(logits, b, item.canvas_index * C, r.min_tokens, sorted(r.eos_ids))
            if r.penalty is not None:  # the draft: this slot's argmax after the canvas's previous step
                r.penalty.apply(logits[b], self.argmax[item.slot] if item.denoise_step else None)
            if r.thought is not None:
                r.thought.apply(logits[b], item.canvas_index * C)
        ban_unsampleable(logits, sampleable_vocab(self.model))  # padded embedding rows past the tokenizer's ids

        sp = SamplerParams.build([r.params for r in reqs], self.device)
        st = CanvasState(canvas, self.argmax.index_select(0, slots), None,
                         torch.zeros(B, dtype=torch.bool, device=self.device),
                         self.history.index_select(0, slots), sp.n_steps - steps.to(sp.n_steps.dtype))
        new = entropy_bound_step(logits, st, sp, gens, V, logit_mask=allowed, pinned=pinned, impl=self.sampler_impl)
        del logits
        self.canvas.index_copy_(0, slots, new.canvas)
        self.argmax.index_copy_(0, slots, new.argmax)
        self.history.index_copy_(0, slots, new.history)
        sc_new = getattr(new, "sc_embeds", None)  # a fused sampler may hand back soft embeddings directly
        if sc_new is None:  # (shifts new.sc_logits in place where the model's dtype is float16: see there)
            sc_new = self.model.soft_embeddings(narrowed_sc_logits(new.sc_logits, self.dtype))
        self.sc_embeds.index_copy_(0, slots, sc_new.to(self.dtype))
        for b, (item, r) in enumerate(zip(items, reqs)):
            r.decoder_passes += 1
            r.canvas_index = item.canvas_index
            if r.constraint is not None and new.sc_logits is not None:
                r.last_logits = new.sc_logits[b].to(self.dtype)

        want = [b for b, r in enumerate(reqs) if r.drafts]
        if want:  # one transfer carries the stop flags and the drafts
            host = torch.cat([new.finished[:, None].long(), new.argmax], dim=1).tolist()
            stopped = [row[0] for row in host]
            drafts = tuple(Draft(items[b].request_id, items[b].canvas_index, items[b].denoise_step + 1,
                                 tuple(host[b][1:])) for b in want)
        else:
            stopped, drafts = new.finished.tolist(), ()  # the one host sync per step: the stop check
        early = frozenset(i.request_id for i, s in zip(items, stopped) if s)
        for item, r, s in zip(items, reqs, stopped):  # a finished canvas's commit pass starts now
            if (r.constraint is not None and hasattr(r.constraint, "commit")
                    and (s or item.denoise_step + 1 >= r.params.max_denoising_steps)):
                self._start_commit(r, item.slot)
        return early, drafts

    def _constraints(self, items, reqs):
        """(pinned [B, C] | None, allowed [B, C, V] | None) for this decoder call, cached per canvas."""
        if all(r.constraint is None for r in reqs):
            return None, None
        C, V, B = self.cfg.canvas_length, self.cfg.vocab_size, len(items)
        per_row = []
        for item, r in zip(items, reqs):
            if r.constraint is None:
                per_row.append((None, None))
                continue
            if r.canvas_constraint is None or r.canvas_constraint[0] != item.canvas_index:
                got = self._result(item.request_id, r, "mask", item.canvas_index,
                                   self._mask_job(r, item.canvas_index))
                if got is None:  # its mask failed: the row runs unconstrained, its result is dropped
                    per_row.append((None, None))
                    continue
                pin, allow = got
                r.canvas_constraint = (item.canvas_index,
                                       None if pin is None else pin.to(self.device),
                                       None if allow is None else allow.to(self.device))
            per_row.append(r.canvas_constraint[1:])
        pinned = torch.full((B, C), -1, dtype=torch.long, device=self.device)
        for b, (pin, _) in enumerate(per_row):
            if pin is not None:
                pinned[b] = pin
        allowed = None
        if any(a is not None for _, a in per_row):
            allowed = torch.ones(B, C, V, dtype=torch.bool, device=self.device)
            for b, (_, a) in enumerate(per_row):
                if a is not None:
                    allowed[b] = a
        return pinned, allowed


def _is_first_chunk(item: EncodeItem) -> bool:
    """The first prompt chunk of a request: its slot holds nothing yet (a new request starts over)."""
    return item.kind == "prefill" and item.start == 0
