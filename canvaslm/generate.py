"""Block-autoregressive generation for a batch of prompts, end to end.

prefill (encoder over the prompts) -> for each canvas: denoising steps (decoder + sampler) until every
row stopped -> commit the argmax canvas (encoder writes its KV) -> next canvas, until every row hit EOS
or its token budget. With a shared generator, rows stay in every call until the batch is done, as the
reference does, so it draws exactly the reference's random numbers; finished rows commit padding. With one
generator per row (per-request seeds), a row whose canvas stopped leaves the decoder calls until the next
canvas, and a row whose request ended leaves them for good: the outputs are the same, the batch's slowest
canvas no longer costs every row a step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import DiffusionParams
from .kv_cache import KVCache
from .multimodal import encoder_images
from .sampling import logit_bias
from .sampling.penalties import penalty_state
from .sampling.samplers import (CanvasState, SamplerParams, ban_unsampleable, checked_impl, entropy_bound_step, randint,
                                sampleable_vocab)
from .sampling.stopping import new_history


class GenerationError(ValueError):
    """A request cannot be generated as asked (empty prompt, too long, bad parameters)."""


@dataclass(frozen=True)
class RowRequest:
    """One prompt with fully resolved parameters."""

    prompt_ids: list
    params: DiffusionParams
    eos_ids: tuple
    pad_id: int
    constraint: object | None = None  # sampling.constraints.CanvasConstraint, applied to every canvas
    logit_bias: tuple = ()  # ((token id, bias), ...): sampling.logit_bias
    min_tokens: int = 0  # no EOS (eos_ids) before this many output tokens (sampling.logit_bias.ban_before)
    lora: int = 0  # served LoRA adapter id (lora_serving; 0: the base model)
    images: object | None = None  # multimodal.ImageInputs: soft tokens for the prompt's image positions
    thinking: object | None = None  # sampling.thinking.ThinkingBudget: most tokens in the reply's thought


@dataclass
class RowResult:
    token_ids: list = field(default_factory=list)
    finish_reason: str = "length"
    decoder_passes: int = 0
    canvases: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.decoder_passes if self.decoder_passes else 0.0


def check_in_vocab(ids, vocab: int, what: str = "prompt") -> None:
    """GenerationError unless every id is an int in [0, vocab) (`what` names the ids in the message)."""
    bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
    if bad:
        raise GenerationError(f"{what} token ids {bad[:5]} are outside the vocabulary [0, {vocab})")


def check_request(prompt_ids: list, max_new_tokens: int, vocab: int, max_positions: int, canvas: int,
                  limit_name: str = "max_position_embeddings"):
    """GenerationError unless the prompt is non-empty, in the vocabulary, and leaves room for
    max_new_tokens (0: a prompt that is only scored) in whole canvases within `max_positions` (called
    `limit_name` in the message)."""
    if len(prompt_ids) == 0:
        raise GenerationError("prompt is empty: at least one token is needed")
    check_in_vocab(prompt_ids, vocab)
    need = len(prompt_ids) + math.ceil(max_new_tokens / canvas) * canvas
    if need > max_positions:
        raise GenerationError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}, rounded up to "
            f"whole canvases of {canvas}) needs {need} positions, over {limit_name}={max_positions}")


def batch_geometry(rows: list[RowRequest], C: int) -> tuple[int, int]:
    """(prompt columns, KV cache length) a batch of rows is run with."""
    max_prompt = max(len(r.prompt_ids) for r in rows)
    return max_prompt, max_prompt + max(math.ceil(r.params.max_new_tokens / C) for r in rows) * C


def generate_rows(model, rows: list[RowRequest], gens, on_draft: Callable | None = None,
                  on_commit: Callable | None = None, geometry: tuple[int, int] | None = None,
                  drop_stopped: bool = True, sampler_impl: str = "auto") -> list[RowResult]:
    """Generate for a batch of rows. gens: one torch.Generator shared by the batch, or one per row.
    geometry: (prompt columns, KV cache length) at least what the rows need; the default is exactly
    that. Results depend on it in the last bits (the reduction lengths), so a batch split into parts
    that keep the whole batch's geometry gives the whole batch's outputs. Rows may use different LoRA
    adapters of the model (`RowRequest.lora`). drop_stopped: with one generator per row, a row whose canvas
    stopped leaves the decoder calls until the next canvas (False: every row runs every step, as with a
    shared generator; the outputs are the same). sampler_impl: how each step draws its samples
    (`samplers.SAMPLER_IMPLS`; "reference" gives `transformers`' tokens for the same generator)."""
    from .lora_serving import with_adapter

    checked_impl(sampler_impl, "generate_rows: sampler_impl", GenerationError)
    return with_adapter(model, [r.lora for r in rows],
                        lambda m: _generate_rows(m, rows, gens, on_draft, on_commit, geometry, drop_stopped,
                                                 sampler_impl))


@torch.no_grad()
def _generate_rows(model, rows, gens, on_draft, on_commit, geometry, drop_stopped=True,
                   sampler_impl="auto") -> list[RowResult]:
    cfg = model.cfg
    device = model.embed_weight.device
    C, V, B = cfg.canvas_length, cfg.vocab_size, len(rows)
    sampleable = sampleable_vocab(model)  # None: every id (samplers.set_sampleable_vocab)
    for r in rows:
        check_request(r.prompt_ids, r.params.max_new_tokens, V, cfg.max_position_embeddings, C)
    n_canvases = max(math.ceil(r.params.max_new_tokens / C) for r in rows)
    need = batch_geometry(rows, C)
    max_prompt, cache_len = geometry or need
    if max_prompt < need[0] or cache_len < need[1]:
        raise GenerationError(f"generate_rows: geometry {geometry} is below what the rows need {need}")
    cache = KVCache(cfg, B, cache_len, dtype=model.embed_weight.dtype, device=device)
    slots = torch.arange(B, device=device)
    # prefill: right-padded in the token dimension, every row at its own positions 0..len-1
    tokens = torch.full((B, max_prompt), cfg.pad_token_id or 0, dtype=torch.long)
    positions = torch.full((B, max_prompt), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        positions[b, :len(r.prompt_ids)] = torch.arange(len(r.prompt_ids))
    image_embeds, image_mask = encoder_images([(b, r.images, 0, len(r.prompt_ids)) for b, r in enumerate(rows)],
                                              B, max_prompt, device)
    model.encode(tokens.to(device), positions.to(device), slots, cache, fresh=True, image_embeds=image_embeds,
                 image_mask=image_mask)

    sp = SamplerParams.build([r.params for r in rows], device)
    # a row whose threshold is above this depth has max_denoising_steps <= depth: never met, as with its own
    depth = max(r.params.stability_depth for r in rows)
    results = [RowResult() for _ in rows]
    done_rows = torch.zeros(B, dtype=torch.bool, device=device)
    passes = torch.zeros(B, dtype=torch.long, device=device)
    constraints = [r.constraint.for_row() if hasattr(r.constraint, "for_row") else r.constraint for r in rows]
    biases = [logit_bias.dense(r.logit_bias, V, device) for r in rows]
    any_bias = any(b is not None for b in biases)
    penalties = [penalty_state(r.params, r.prompt_ids, r.eos_ids, V, device) for r in rows]
    limits = [r.params.max_time for r in rows]  # latency budgets: DiffusionParams.max_time
    thoughts = [r.thinking.tracker(r.prompt_ids) if r.thinking is not None else None for r in rows]
    out_of_time = [False] * B  # the row's budget ran out: the canvas in progress is its last
    denoise_start = None
    per_row = isinstance(gens, (list, tuple))
    done_host = [False] * B
    for k in range(n_canvases):
        pinned, mask = _constraint_tensors(constraints, k, C, V, device)
        # a shared generator draws for every row, as the reference does; per-row generators skip rows
        # that are done, so each request's random stream is its own
        canvas = randint(V, B, C, gens, device, active=~done_rows if per_row else None)
        if pinned is not None:
            canvas = torch.where(pinned >= 0, pinned, canvas)
        finished = done_rows.clone() if per_row else torch.zeros(B, dtype=torch.bool, device=device)
        st = CanvasState(canvas, canvas, None, finished, new_history(B, depth, C, device), sp.n_steps.clone())
        # with per-row generators, rows that stopped (this canvas or the request) leave the decoder call: a
        # stopped row's state never changes, and each row's result does not depend on its batch mates
        live = [b for b in range(B) if not (per_row and drop_stopped and done_host[b])]
        picked = None  # (live rows, their index, sampler params, generators, mask, pins) while live is unchanged
        for step in range(int(sp.n_steps.max())):
            denoise_start = denoise_start or time.perf_counter()
            passes += ~(st.finished | done_rows)
            if len(live) == B:
                ix, sub_sp, sub_gens, sub_mask, sub_pinned = None, sp, gens, mask, pinned
            else:
                if picked is None or picked[0] != live:
                    at = torch.tensor(live, device=device)
                    picked = (live, at, SamplerParams.build([rows[b].params for b in live], device),
                              [gens[b] for b in live], *(None if t is None else t.index_select(0, at)
                                                         for t in (mask, pinned)))
                ix, sub_sp, sub_gens, sub_mask, sub_pinned = picked[1:]
            sub = st if ix is None else _select_rows(st, ix)
            logits = model.denoise(sub.canvas, slots if ix is None else ix, cache, sc_logits=sub.sc_logits,
                                   max_start=max_prompt + k * C)
            if any_bias:
                logit_bias.apply(logits, [biases[b] for b in live])
            for j, b in enumerate(live):
                if rows[b].min_tokens > k * C:
                    logit_bias.ban_before(logits, j, k * C, rows[b].min_tokens, rows[b].eos_ids)
                if penalties[b] is not None:
                    penalties[b].apply(logits[j], st.argmax[b] if step else None)
                if thoughts[b] is not None:
                    thoughts[b].apply(logits[j], k * C)
            ban_unsampleable(logits, sampleable)  # padded embedding rows past the tokenizer's ids
            new = entropy_bound_step(logits, sub, sub_sp, sub_gens, V, logit_mask=sub_mask, pinned=sub_pinned,
                                     impl=sampler_impl)
            del logits
            new.sc_logits = narrowed_sc_logits(new.sc_logits, model.embed_weight.dtype)
            st = new if ix is None else _merge_rows(st, ix, new)
            _stop_late_rows(st, limits, out_of_time, time.perf_counter() - denoise_start)
            if on_draft is not None:
                on_draft(k, st)
            stopped = st.finished.tolist()  # the one host sync per step: the stop check
            if all(stopped):
                break
            if per_row and drop_stopped:
                live = [b for b in live if not stopped[b]]
        committed = st.argmax.clone()
        if pinned is not None:
            _commit_constraints(constraints, k, committed, st.sc_logits, done_rows)
        for b, r in enumerate(rows):
            if done_host[b]:
                committed[b] = r.pad_id
                continue
            res = results[b]
            res.canvases += 1
            ids = committed[b].tolist()
            cut = next((i for i, t in enumerate(ids) if t in r.eos_ids), None)
            room = r.params.max_new_tokens - len(res.token_ids)
            for seen in (penalties[b], thoughts[b]):  # what the next canvases see as output so far
                if seen is not None:
                    seen.commit(ids[:room if cut is None else min(room, cut + 1)])
            if cut is not None and cut < room:
                res.token_ids += ids[:cut + 1]
                res.finish_reason = "stop"
                committed[b, cut + 1:] = r.pad_id
                done_rows[b] = done_host[b] = True
            else:
                res.token_ids += ids[:room]
                if cut is not None:  # the eos lies past the token budget
                    committed[b, cut + 1:] = r.pad_id
                if len(res.token_ids) >= r.params.max_new_tokens or cut is not None or out_of_time[b]:
                    done_rows[b] = done_host[b] = True
        if on_commit is not None:
            on_commit(k, committed, done_rows)
        if bool(done_rows.all()) or k == n_canvases - 1:
            break
        start = cache.lengths.clone()
        model.encode(committed, start[:, None] + torch.arange(C, device=device), slots, cache,
                     max_position=max_prompt + (k + 1) * C - 1)
    for b, res in enumerate(results):
        res.decoder_passes = int(passes[b])
    return results


def narrowed_sc_logits(sc_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The processed logits (logits / temperature, float32) that self-condition the next step, in the model's
    `dtype`. float16 ends at 65504, which a near-greedy temperature passes (30 / 4e-4): inf, then a NaN softmax
    and NaN everywhere after. So for a dtype of narrower exponent range than the logits', each position's max
    is subtracted first, in place (the softmax and a constraint commit's log-softmax are unchanged, and values
    <= 0 cannot overflow). float32 and bfloat16 (float32's exponent range) are cast as before, bit for bit."""
    if torch.finfo(dtype).max > torch.finfo(sc_logits.dtype).max / 2:
        return sc_logits.to(dtype)
    top = sc_logits.amax(dim=-1, keepdim=True)
    return sc_logits.sub_(top.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)).to(dtype)  # an all-banned row: as is


def _select_rows(st: CanvasState, ix: torch.Tensor) -> CanvasState:
    """The rows `ix` of a batch's state."""
    def pick(t):
        return None if t is None else t.index_select(0, ix)
    return CanvasState(pick(st.canvas), pick(st.argmax), pick(st.sc_logits), pick(st.finished), pick(st.history),
                       pick(st.cur_step))


def _merge_rows(st: CanvasState, ix: torch.Tensor, new: CanvasState) -> CanvasState:
    """The batch's state with rows `ix` replaced by `new` (the other rows had stopped: they keep theirs).
    The [B, C, V] self-conditioning logits are updated in place (no second vocabulary-wide tensor); the
    small per-position tensors are new, so a state an `on_draft` callback kept does not change."""
    def put(full, part):
        return full.index_copy(0, ix, part)
    sc = st.sc_logits
    if sc is None or sc.dtype != new.sc_logits.dtype:  # a first step: rows left out have no logits yet
        sc = new.sc_logits.new_zeros((st.canvas.shape[0], *new.sc_logits.shape[1:]))
    sc.index_copy_(0, ix, new.sc_logits)
    return CanvasState(put(st.canvas, new.canvas), put(st.argmax, new.argmax), sc, put(st.finished, new.finished),
                       put(st.history, new.history), put(st.cur_step, new.cur_step))


def _stop_late_rows(st: CanvasState, limits: list, out_of_time: list, spent: float) -> None:
    """Rows whose latency budget `spent` seconds of denoising used up stop this canvas now (its draft is
    committed) and end after it."""
    late = [b for b, limit in enumerate(limits) if limit is not None and not out_of_time[b] and spent >= limit]
    if late:
        for b in late:
            out_of_time[b] = True
        mask = torch.zeros_like(st.finished)
        mask[late] = True
        st.finished = st.finished | mask


def _constraint_tensors(constraints, k, C, V, device):
    """Stack per-row (pinned, allowed-mask) tensors for canvas k; None where no row has one."""
    if all(c is None for c in constraints):
        return None, None
    pinned = torch.full((len(constraints), C), -1, dtype=torch.long, device=device)
    mask, any_mask = None, False
    per_row = [c.canvas(k, C, V) if c is not None else (None, None) for c in constraints]
    for b, (pin, allowed) in enumerate(per_row):
        if pin is not None:
            pinned[b] = pin.to(device)
        if allowed is not None:
            any_mask = True
    if any_mask:
        mask = torch.ones(len(constraints), C, V, dtype=torch.bool, device=device)
        for b, (_, allowed) in enumerate(per_row):
            if allowed is not None:
                mask[b] = allowed.to(device)
    return pinned, mask


def _commit_constraints(constraints, k, committed, sc_logits, done_rows):
    """Let each row's constraint fix its committed canvas in place (restore pins, make value slots valid)."""
    for b, c in enumerate(constraints):
        if c is not None and hasattr(c, "commit") and not bool(done_rows[b]):
            committed[b] = c.commit(k, committed[b], sc_logits[b] if sc_logits is not None else None)
