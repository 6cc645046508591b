"""`suffix` on /v1/completions: the model writes the text between the prompt and the suffix (insert mode).

This is `LLM.infill` (canvaslm/infill.py) over HTTP. The middle's length is unknown, so every choice is
several engine requests, one per gap length (`infill.default_gaps`: powers of two up to `max_tokens`,
and `max_tokens` itself), each with the suffix and an EOS pinned after its gap; the engine batches them
like any requests. When all are done, the encoder's causal pass scores middle + suffix for each (mean
log-prob per token, one call on the engine thread through `Engine.call`), and the best middle is the
choice's `text`. That call reads the prompt's KV from a candidate's freed slot when prefix caching kept
it (`serving.score_later`), so the prompt is not encoded a second time. Choice i of n draws its
candidates from seeds `seed + i * len(gaps) + k` (choice 0 uses `LLM.infill`'s seeds; as for any
request, the server's KV geometry can move the last bits). Each choice also reports `infill: {gap,
scores}`. With max_time, a candidate its budget ended inside its middle is left out of both (the shortest
middle, at most 2 tokens, lies in the first canvas, which is always committed). A stream sends each
choice's text in one delta once it is chosen (there is nothing to show before the candidates are compared).
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from dataclasses import dataclass

from ..engine.engine import GenerationRequest
from ..infill import best, candidates, check_time_budget, checked_gaps, middle_text, scored_part, whole
from .serving import (APIError, Choice, ServerState, TextTracker, bias_pairs, check_request_basics, context_error,
                      need_tokenizer, resolve_params, run_to_end, score_later)

MAX_ROWS = 64  # engine requests per HTTP request (prompts x n x gaps)


def cut_stops(text: str, stops: list[str]) -> tuple[str, str]:
    """The text before the earliest stop string, and that string ("" when none occurs)."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, ""
    at, word = min(hits)
    return text[:at], word


def cut_middle(tokenizer, prompt_ids: list, middle_ids: list, stops: list[str]) -> tuple[str, str, list]:
    """The middle's text cut before its earliest stop string, that string ("" when none occurs), and the
    middle's ids up to the token that completed it (the later ones are not part of the reply)."""
    text, word = cut_stops(middle_text(tokenizer, prompt_ids, middle_ids), stops)
    if not word:
        return text, "", list(middle_ids)
    lo, hi = 1, len(middle_ids)  # the fewest ids whose text holds it (a prefix's text is a prefix of the text)
    while lo < hi:
        mid = (lo + hi) // 2
        if word in middle_text(tokenizer, prompt_ids, middle_ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return text, word, list(middle_ids[:lo])


@dataclass
class Group:
    """One output choice: its candidate requests, one per gap."""

    index: int
    prompt_ids: list
    suffix_ids: list
    gaps: list
    candidates: list  # [Choice]
    scores: list | None = None  # per gap: mean log-prob of middle + suffix (after run_infill; None: max_time cut it)
    best: int = 0  # the chosen candidate
    middle: list | None = None  # its middle's ids
    limit: int = 0  # the longest middle max_tokens (and the context) allow

    @property
    def at_limit(self) -> bool:
        """Whether the chosen middle used every token it was allowed: `length`, as an autoregressive insert
        stopped by max_tokens reports (it might have gone on)."""
        return self.middle is not None and len(self.middle) >= self.limit


def prepare_infill(state: ServerState, body, prompts: list[list[int]], suffix_ids: list[int] | None = None
                   ) -> list[Group]:
    """The candidates of every choice. suffix_ids: the suffix already tokenized (llama.cpp's /infill, which cuts
    it to fit the context); None: `body.suffix` encoded here."""
    check_request_basics(state, body, prompts)
    bias = bias_pairs(state, body)
    if body.stop_list():
        raise APIError(400, "stop strings would cut the middle before its suffix; send no stop with suffix", "stop")
    if body.stop_token_ids:
        raise APIError(400, "stop_token_ids would end the middle before its suffix; send none with suffix",
                       "stop_token_ids")
    others = body.constraint_fields()
    if others:
        raise APIError(400, f"suffix and {others[0]} both constrain the output; send one", "suffix")
    need_tokenizer(state, "suffix")
    if suffix_ids is None:
        try:
            suffix_ids = state.tokenizer.encode(body.suffix, add_special_tokens=False)
        except ValueError as e:  # text the tokenizer cannot encode: the caller's, as for `prompt`
            raise APIError(400, f"suffix: {e}", "suffix") from None
    C, seed = state.canvas_length, body.seed if body.seed is not None else random.randrange(2**63)
    groups, rows = [], 0
    for ids in prompts:
        base = resolve_params(state, body, len(ids), None)
        room = (state.max_model_len - len(ids)) // C * C
        max_middle = min(base.max_new_tokens, room - len(suffix_ids) - 1)
        if max_middle < 1:
            raise context_error(state, f"The prompt ({len(ids)} tokens) and the suffix ({len(suffix_ids)} tokens) "
                                       "leave no room for a middle", "suffix")
        gaps = checked_gaps(None, max_middle + len(suffix_ids) + 1, len(suffix_ids))
        check_time_budget(base.max_time, gaps, C,  # never with these gaps (the shortest is at most 2)
                          lambda msg: APIError(400, msg.replace("infill: ", "suffix with ", 1), "max_time"))
        rows += len(gaps) * body.n
        if rows > MAX_ROWS:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} x {len(gaps)} middle lengths is over the limit "
                                f"of {MAX_ROWS} candidates; lower n or max_tokens", "n")
        cands = candidates(base, suffix_ids, gaps, state.eos_ids, state.defaults.pad_token_id or 0, state.tokenizer)
        for j in range(body.n):
            reqs = [Choice(k, GenerationRequest(uuid.uuid4().hex, tuple(ids), params,
                                                (seed + j * len(gaps) + k) % 2**63, state.eos_ids, pins,
                                                logit_bias=bias, priority=body.priority,
                                                lora=state.adapter(body.model)),
                           len(groups), TextTracker(state.tokenizer, []))
                    for k, (params, pins) in enumerate(cands)]
            groups.append(Group(len(groups), list(ids), suffix_ids, gaps, reqs, limit=max_middle))
    return groups


async def run_infill(state: ServerState, body, prompts, request, suffix_ids: list[int] | None = None) -> list[Group]:
    """Generate every group's candidates, score them on the engine thread and pick each group's best (suffix_ids:
    as prepare_infill)."""
    groups = await asyncio.to_thread(prepare_infill, state, body, prompts, suffix_ids)
    flat = [c for g in groups for c in g.candidates]
    for i, c in enumerate(flat):  # run_choices tells choices apart by index
        c.index = i
    await run_to_end(state, flat, request)
    for g in groups:
        keep = whole([len(c.tracker.ids) for c in g.candidates], g.gaps)  # middles a spent max_time cut are out
        middles = [g.candidates[i].tracker.ids[:g.gaps[i]] for i in keep]
        conts = [scored_part(m, g.suffix_ids, state.eos_ids[0]) for m in middles]
        fut = score_later(state, body.model, g.prompt_ids, conts)
        scores = await asyncio.wrap_future(fut)
        g.scores = [None] * len(g.gaps)
        for i, sc in zip(keep, scores):
            g.scores[i] = sc
        j = best([g.gaps[i] for i in keep], scores)
        g.best, g.middle = keep[j], middles[j]
    return groups


async def complete_infill(state: ServerState, body, prompts, request) -> dict:
    """The completion response for a request with `suffix` (after every candidate is generated and scored)."""
    groups = await run_infill(state, body, prompts, request)
    out = [{"index": g.index, "text": middle_text(state.tokenizer, g.prompt_ids, g.middle),
            "finish_reason": "length" if g.at_limit else "stop",
            "logprobs": None, "infill": {"gap": g.gaps[g.best], "scores": {  # middles max_time cut: not scored
                str(gap): s for gap, s in zip(g.gaps, g.scores) if s is not None}}}
           for g in groups]
    prompt_tokens, completion = sum(len(p) for p in prompts), sum(len(g.middle) for g in groups)
    cached = [0] * len(prompts)  # per prompt: the most any of its candidates reused (as serving.usage counts)
    for g in groups:
        p = g.index // body.n
        cached[p] = max([cached[p]] + [c.cached_tokens for c in g.candidates])
    return {"choices": out, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                      "total_tokens": prompt_tokens + completion,
                                      "decoder_passes": sum(c.decoder_passes for g in groups for c in g.candidates),
                                      "prompt_tokens_details": {"cached_tokens": sum(cached)}}}


def stream_events(response: dict, rid: str, created: int, model: str, include_usage):
    """SSE lines for a finished infill response: each choice's text in one delta, then its finish. include_usage:
    True for the usage on a last line, "continuous" for it on every line too (all was generated before the first
    line, so the totals are the usage so far)."""
    def line(choices, usage=None):
        data = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if include_usage:
            data["usage"] = response["usage"] if include_usage == "continuous" else usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    for ch in response["choices"]:
        yield line([{"index": ch["index"], "text": ch["text"], "finish_reason": None, "logprobs": None}])
        yield line([{"index": ch["index"], "text": "", "finish_reason": ch["finish_reason"], "logprobs": None,
                     "infill": ch["infill"]}])
    if include_usage:
        yield line([], response["usage"])
    yield "data: [DONE]\n\n"


__all__ = ["prepare_infill", "run_infill", "complete_infill", "stream_events", "MAX_ROWS"]
