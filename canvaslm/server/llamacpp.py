"""llama-server's native routes, for the editors and tools built on llama.cpp: POST /infill (llama.vim,
llama.vscode: code completion at the cursor), POST /completion, and GET /props (the served context
`n_ctx` and slots, which tools probe).

Bodies take llama.cpp's field names (`n_predict`, `repeat_penalty`, `n_indent`, `input_prefix`,
`input_suffix`, `input_extra`, `response_fields`, ...) and answer in its shape (`content`, `stop_type`,
`tokens_cached`, `timings`, ...); each is translated to a `/v1/completions` body and runs through the same
engine path, so every check, limit and canvas feature is the OpenAI route's.

/infill is the `suffix` insert mode (server/infill.py): the text before the cursor is `input_extra` (each
chunk as `# filename`, its text and a blank line), then `input_prefix`, then `prompt` (the cursor line so
far); the middle is written against `input_suffix` with the model's own canvas, not FIM tokens. What does
not fit the context is cut as llama-server cuts it: the suffix keeps its head (at most a quarter of the
context), the prompt its tail (the extra chunks go first), and `truncated` says so.

`n_predict: 0` encodes the prompt into a slot and generates nothing (llama.vim sends it to warm the cache
with its extra context): the next request that starts the same way reuses that KV (prefix caching).
`t_max_predict_ms` limits the generation phase, as in llama-server: once it is spent, the canvas being
denoised is committed as its current draft and generation ends (`stop_type` "limit"; the /v1 bodies'
`max_time`). `n_indent` ends a reply as a stop string does: generation stops at the cut, and `tokens` /
`tokens_predicted` are the fewest ids whose text holds the kept content (whole and streamed alike). Differences,
by design: `t_max_prompt_ms`, `cache_prompt`, `samplers`, `id_slot` and other
llama.cpp-only knobs are accepted and ignored (a prompt is never cut for time); `n_probs` > 0 is refused.
`timings.prompt_ms` runs from submission until the step that finished encoding the prompt, and
`predicted_ms` from there to the end (for /infill: of all candidates, scoring excluded).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .protocol import INT64, CompletionRequest
from .serving import (APIError, ServerState, in_band, context_error, errors_named, need_tokenizer, prepare_off_loop,
                      run_choices, run_to_end)

RANDOM_SEEDS = (-1, 0xFFFFFFFF)  # llama.cpp's "draw a seed"
MAX_STOPS = 16


class ExtraChunk(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    text: str = Field("", max_length=1 << 20)
    filename: str = Field("", max_length=4096)


class LlamaCompletionRequest(BaseModel):
    """llama-server's /completion body (the fields this engine honours; others are ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    prompt: str | list[int] = ""
    n_predict: int = Field(-1, ge=-1, le=INT64, description="tokens to generate; -1: until EOS or the context is full")
    temperature: float | None = Field(None, ge=-INT64, le=10, description="<= 0: greedy, as llama-server")
    top_k: int | None = Field(None, ge=-INT64, le=INT64, description="<= 0: no cut, as llama-server")
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0.01, le=100, description="1: off")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int = Field(-1, ge=-1, le=INT64, description="-1: a random seed")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS)
    stream: bool = False
    n_indent: int = Field(0, ge=0, le=1 << 16, description="stop before a line indented less than this")
    json_schema: dict[str, Any] | None = None
    grammar: str | None = Field(None, max_length=65536)
    ignore_eos: bool = False
    n_probs: int = Field(0, ge=0, le=INT64)
    return_tokens: bool = False
    response_fields: list[str] | None = Field(None, max_length=256)
    model: str | None = Field(None, max_length=256)
    max_denoising_steps: int | None = Field(None, ge=1, le=4096)
    t_max_predict_ms: int = Field(-1, ge=-INT64, le=INT64, description="generation time limit (<= 0: none)")


class LlamaInfillRequest(LlamaCompletionRequest):
    """llama-server's /infill body: /completion's fields plus the text around the cursor."""

    input_prefix: str = Field("", max_length=1 << 22)
    input_suffix: str = Field("", max_length=1 << 22)
    input_extra: list[ExtraChunk] = Field(default_factory=list, max_length=1024)


def _model(state: ServerState, body) -> str:
    """The served model or adapter `model` names; the base model for any other name or none: a llama-server
    serves one model and ignores the field on its own routes (llama.vim sends its `model_fim` setting)."""
    return body.model if body.model in state.served_names() else state.model_name


def _openai_body(state: ServerState, body: LlamaCompletionRequest, ids: list[int], suffix: str | None = None):
    """The /v1/completions body with the same meaning (stop strings are applied by the caller)."""
    if body.n_probs:
        raise APIError(400, "n_probs is not supported; use /v1/completions with logprobs", "n_probs")
    try:
        return CompletionRequest(
            model=_model(state, body), prompt=ids, max_tokens=None if body.n_predict < 0 else body.n_predict,
            temperature=None if body.temperature is None else max(body.temperature, 0.0),
            top_k=None if body.top_k is None else max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p,
            repetition_penalty=body.repeat_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, seed=None if body.seed in RANDOM_SEEDS else body.seed,
            ignore_eos=body.ignore_eos, guided_json=body.json_schema, guided_grammar=body.grammar or None,
            max_denoising_steps=body.max_denoising_steps, suffix=suffix,
            max_time=body.t_max_predict_ms / 1e3 if body.t_max_predict_ms > 0 else None)
    except ValueError as e:  # pydantic's: a value the OpenAI body bounds tighter
        raise APIError(400, f"invalid request: {e}") from None


def cut_indent(text: str, n_indent: int) -> tuple[str, bool]:
    """The text before the first line after the first whose content starts left of column n_indent."""
    if n_indent <= 0:
        return text, False
    at = text.find("\n")
    while at >= 0:
        end = text.find("\n", at + 1)
        line = text[at + 1:] if end < 0 else text[at + 1:end]
        body = line.lstrip(" \t")
        if body and len(line) - len(body) < n_indent:
            return text[:at], True
        at = end
    return text, False


def fewest_ids(decode, ids: list[int], text: str) -> list[int]:
    """The fewest of `ids` whose text (`decode`) holds `text`, a cut of their whole text: the ids of what an n_indent
    cut kept, as a stop string's reply keeps the ids up to the token that completed it (a search over prefixes; a
    prefix's text is a prefix of the whole text)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(ids[:mid]).startswith(text):
            hi = mid
        else:
            lo = mid + 1
    return list(ids[:lo])


def select_fields(response: dict, fields: list[str] | None) -> dict:
    """llama-server's `response_fields`: only these paths ("timings/prompt_n"), each as a top-level key."""
    if fields is None:
        return response
    out = {}
    for path in fields:
        node = response
        for key in path.split("/"):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            out[path] = node
    return out


def _response(state: ServerState, body, *, content: str, ids: list[int], prompt_ids: list[int], stop_type: str,
              stopping_word: str = "", cached: int = 0, prompt_s: float = 0.0, total_s: float = 0.0,
              truncated: bool = False, params=None, seed=None) -> dict:
    n_prompt, n_pred = len(prompt_ids) - cached, len(ids)
    prompt_ms, pred_ms = prompt_s * 1e3, max(total_s - prompt_s, 0.0) * 1e3
    settings = {"n_predict": body.n_predict, "seed": seed, "stop": body.stop, "n_indent": body.n_indent}
    if params is not None:
        settings.update(max_new_tokens=params.max_new_tokens, max_denoising_steps=params.max_denoising_steps,
                        temperature=[params.t_max, params.t_min], top_k=params.top_k, top_p=params.top_p,
                        min_p=params.min_p, repeat_penalty=params.repetition_penalty,
                        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)
    return {
        "index": 0, "content": content, "tokens": ids if body.return_tokens else [], "id_slot": -1, "stop": True,
        "model": _model(state, body), "tokens_predicted": n_pred, "tokens_evaluated": len(prompt_ids),
        "generation_settings": settings, "prompt": _prompt_text(state, body, prompt_ids),
        "has_new_line": "\n" in content,
        "truncated": truncated, "stop_type": stop_type, "stopping_word": stopping_word, "tokens_cached": cached,
        "timings": {"cache_n": cached, "prompt_n": n_prompt, "prompt_ms": prompt_ms,
                    "prompt_per_token_ms": prompt_ms / n_prompt if n_prompt else 0.0,
                    "prompt_per_second": n_prompt / prompt_s if prompt_s > 0 else 0.0,
                    "predicted_n": n_pred, "predicted_ms": pred_ms,
                    "predicted_per_token_ms": pred_ms / n_pred if n_pred else 0.0,
                    "predicted_per_second": n_pred * 1e3 / pred_ms if pred_ms > 0 else 0.0}}


def _prompt_text(state: ServerState, body, prompt_ids: list[int]) -> str:
    """The prompt as text, for the reply's `prompt`; not decoded when `response_fields` leaves it out (llama.vim
    asks for a few fields of a reply whose prompt holds tens of thousands of tokens of context)."""
    wanted = body.response_fields is None or any(f.split("/")[0] == "prompt" for f in body.response_fields)
    return state.tokenizer.decode(prompt_ids) if wanted else ""


def _send(body, response: dict) -> dict | StreamingResponse:
    """The whole response, or (stream) one chunk with the content and a last one with the rest."""
    if not body.stream:
        return select_fields(response, body.response_fields)

    def events():
        yield _sse({"index": 0, "content": response["content"], "tokens": response["tokens"], "stop": False,
                    "id_slot": -1})
        yield _sse(select_fields(dict(response, content="", tokens=[]), body.response_fields))
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _encode(state: ServerState, text: str, field: str, special: bool = True) -> list[int]:
    try:
        return state.tokenizer.encode(text, add_special_tokens=special)
    except ValueError as e:
        raise APIError(400, f"{field}: {e}", field) from None


# --- /props ------------------------------------------------------------------------------------------------

def props(state: ServerState) -> dict:
    """llama-server's GET /props, which tools probe for the served context (`n_ctx`) and slots."""
    from .. import __version__

    d = state.defaults
    template = getattr(state.tokenizer, "chat_template", None)
    return {"default_generation_settings": {"n_ctx": state.max_model_len, "params": {
                "n_predict": -1, "temperature": d.t_max, "top_k": d.top_k, "top_p": d.top_p,
                "min_p": d.min_p, "max_denoising_steps": d.max_denoising_steps}},
            "total_slots": state.engine.config.slots, "model_alias": state.model_name, "model_path": state.model_name,
            "chat_template": template if isinstance(template, str) else "",
            "modalities": {"vision": state.vision is not None and state.vision.available, "audio": False},
            "build_info": f"canvaslm {__version__}"}


# --- /completion -------------------------------------------------------------------------------------------

# what an error about the translated /v1 body names, in the llama.cpp body's own terms
LLAMA_PARAMS = {"max_tokens": "n_predict", "max_time": "t_max_predict_ms", "guided_grammar": "grammar",
                "guided_json": "json_schema", "repetition_penalty": "repeat_penalty"}


# named in other fields' errors too ("max_tokens=5000 is over it")
llama_names = errors_named(LLAMA_PARAMS, in_text=("max_tokens", "guided_grammar", "guided_json"))


@llama_names
async def completion(state: ServerState, body: LlamaCompletionRequest, request: Request):
    need_tokenizer(state, "prompt")
    ids = _encode(state, body.prompt, "prompt") if isinstance(body.prompt, str) else list(body.prompt)
    if not ids:
        raise APIError(400, "the prompt is empty: at least one token is needed", "prompt")
    oa = _openai_body(state, body, ids)
    oa._fill_context = body.n_predict < 0  # llama-server's -1: until EOS or the context is full
    if body.n_predict == 0:
        return await _warm(state, body, ids, request)
    choice, settings = await _completion_choice(state, body, oa, ids)
    if body.stream:
        return StreamingResponse(_stream_completion(state, body, choice, ids, settings),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await _run_to_cut(state, body, choice, request)
    return select_fields(_finished(state, body, choice, ids, settings), body.response_fields)


async def _warm(state: ServerState, body, ids: list[int], request, truncated: bool = False):
    """`n_predict: 0`: encode the prompt into a slot and generate nothing (an engine prompt-only request),
    so that the next request sharing its start reuses its KV (prefix caching). llama.vim sends this with
    its extra context chunks whenever they change."""
    import uuid

    from ..engine.engine import GenerationRequest
    from .serving import Choice, TextTracker, check_in_vocab, check_prompt_fits

    check_in_vocab(state, ids, "prompt", "prompt token ids")
    check_prompt_fits(state, ids)
    if not ids or not state.engine.prefix_caching:  # nothing to encode, or nothing would keep it
        return _send(body, _response(state, body, content="", ids=[], prompt_ids=ids, stop_type="limit",
                                     truncated=truncated))
    req = GenerationRequest(uuid.uuid4().hex, tuple(ids), state.defaults, 0, state.eos_ids,
                            lora=state.adapter(_model(state, body)), prompt_only=True)
    choice = Choice(0, req, 0, TextTracker(state.tokenizer, []))
    await run_to_end(state, [choice], request)
    return _send(body, _response(state, body, content="", ids=[], prompt_ids=ids, stop_type="limit",
                                 cached=choice.cached_tokens, prompt_s=choice.prompt_seconds,
                                 total_s=choice.seconds, truncated=truncated))


async def _completion_choice(state: ServerState, body, oa: CompletionRequest, ids: list[int]):
    """The engine request of a plain completion, with llama.cpp's stop strings (more than OpenAI's 4), and
    the generation settings its reply reports."""
    (choice,) = await prepare_off_loop(state, oa, [ids])  # a grammar compiles on the compile pool
    choice.tracker.stops = [s for s in body.stop if s]  # llama-server skips empty words
    return choice, dict(params=choice.request.params, seed=choice.request.seed)


def _kept_ids(state: ServerState, choice, text: str) -> list[int]:
    """The fewest of a completion's ids whose text holds `text` (a cut of the reply's text, as the tracker reads
    it: a completion has no thought channel)."""
    skip = choice.tracker.skip_special
    return fewest_ids(lambda part: state.tokenizer.decode(part, skip_special_tokens=skip), choice.tracker.ids, text)


def _finished(state: ServerState, body, choice, ids: list[int], settings: dict) -> dict:
    """The reply of a finished completion. An n_indent cut lies before any stop string (that one cut the text
    after it): the reply ends there as at a limit, with the ids its text needs."""
    text, indented = cut_indent(choice.tracker.text, body.n_indent)
    word = "" if indented else choice.tracker.stop_word
    stop_type = "word" if word else "limit" if indented or choice.finish_reason == "length" else "eos"
    out = _kept_ids(state, choice, text) if indented else choice.tracker.ids
    return _response(state, body, content=text, ids=out, prompt_ids=ids, stop_type=stop_type,
                     stopping_word=word, cached=choice.cached_tokens, prompt_s=choice.prompt_seconds,
                     total_s=choice.seconds, **settings)


async def _cut_run(state: ServerState, body, choice, is_disconnected=None):
    """Run a completion, yielding its text so far each time it grows (with n_indent, its last line is held back
    until that line's indent is known). An n_indent cut ends the request as a stop string does: the engine stops
    generating it, and its Finish still comes (its passes and timings are counted); what is committed meanwhile is
    left out of the reply (_finished cuts the text and the ids again)."""
    acc, sent = "", 0  # the stop-safe text run_choices handed out; how much of it was yielded
    async with contextlib.aclosing(run_choices(state, [choice], is_disconnected)) as events:
        async for kind, _, payload in events:
            if kind != "delta" or acc is None:
                continue
            acc += payload
            text, indented = cut_indent(acc, body.n_indent)
            safe = text if indented or body.n_indent <= 0 or "\n" not in text else text[:text.rfind("\n")]
            if len(safe) > sent:
                yield safe
                sent = len(safe)
            if indented:
                acc = None  # the reply is complete
                state.engine.cancel(choice.request.request_id, "stop")


async def _run_to_cut(state: ServerState, body, choice, request) -> None:
    """Run a completion to its end or its n_indent cut (not streamed: the tracker holds the text); a 499 if the
    client left."""
    async with contextlib.aclosing(_cut_run(state, body, choice, request.is_disconnected)) as texts:
        async for _ in texts:
            pass
    if choice.finish_reason is None:
        raise APIError(499, "client closed the request", type="client_closed")


async def _stream_completion(state: ServerState, body, choice, ids: list[int], settings: dict):
    """A chunk per committed canvas; with n_indent, the last line is held back until its indent is known, and
    each chunk carries the ids of its text (return_tokens), so that the chunks' ids are the whole reply's."""
    sent, sent_ids = 0, 0  # characters and ids sent

    def new_ids(text: str | None = None) -> list[int]:  # return_tokens: the ids of `text` (None: all) not yet sent
        nonlocal sent_ids
        if not body.return_tokens:
            return []
        held = body.n_indent > 0 and text is not None  # later ids may belong to a line n_indent will cut
        ids = (_kept_ids(state, choice, text) if held else choice.tracker.ids)[sent_ids:]
        sent_ids += len(ids)
        return ids

    try:
        async with contextlib.aclosing(_cut_run(state, body, choice)) as texts:
            async for safe in texts:
                yield _sse({"index": 0, "content": safe[sent:], "tokens": new_ids(safe), "stop": False, "id_slot": -1})
                sent = len(safe)
        if choice.finish_reason is None:  # ended without its Finish (not expected: the loop runs until it comes)
            choice.finish_reason = "length"
        final = _finished(state, body, choice, ids, settings)
        rest, ids_left = final["content"][sent:], final["tokens"][sent_ids:]
        if rest or ids_left:
            yield _sse({"index": 0, "content": rest, "tokens": ids_left, "stop": False, "id_slot": -1})
        yield _sse(select_fields(dict(final, content="", tokens=[]), body.response_fields))
    except Exception as exc:  # headers are sent: report in-band
        yield _sse(in_band(exc).body())


# --- /infill -----------------------------------------------------------------------------------------------

def render_extra(chunks: list[ExtraChunk]) -> str:
    """The extra context before the prefix: each chunk as `# filename`, its text, then a blank line."""
    parts = []
    for c in chunks:
        text = c.text if c.text.endswith("\n") or not c.text else c.text + "\n"
        parts.append((f"# {c.filename}\n" if c.filename else "") + text + "\n")
    return "".join(parts)


def fit_infill(state: ServerState, prompt_ids: list[int], suffix_ids: list[int], head: list[int],
               n_predict: int) -> tuple[list[int], list[int], bool]:
    """Cut the prompt (its tail kept, after the tokenizer's leading special tokens `head`) and the suffix
    (its head kept) so the middle, the suffix and its pinned EOS fit in whole canvases behind the prompt."""
    C, limit = state.canvas_length, state.max_model_len
    truncated = False
    if len(suffix_ids) > limit // 4:
        suffix_ids, truncated = suffix_ids[:limit // 4], True
    middle = n_predict if n_predict >= 0 else state.defaults.max_new_tokens  # 0: a warm-up, no middle
    budget = limit - -(-(middle + len(suffix_ids) + 1) // C) * C  # the whole middle fits
    if budget <= len(head):  # it cannot: room for the prompt and a shorter middle
        budget = limit - -(-(len(suffix_ids) + 2) // C) * C
    if len(prompt_ids) > budget:
        keep = head if prompt_ids[:len(head)] == head else []
        if budget <= len(keep):
            raise context_error(state, f"The suffix ({len(suffix_ids)} tokens) leaves no room for the prompt",
                                "input_suffix")
        prompt_ids, truncated = keep + prompt_ids[len(prompt_ids) - (budget - len(keep)):], True
    return prompt_ids, suffix_ids, truncated


@llama_names
async def infill(state: ServerState, body: LlamaInfillRequest, request: Request):
    from ..infill import middle_text
    from .infill import cut_middle, run_infill

    need_tokenizer(state, "input_prefix")
    before = render_extra(body.input_extra) + body.input_prefix
    if isinstance(body.prompt, str):
        ids = _encode(state, before + body.prompt, "input_prefix")
    else:
        ids = _encode(state, before, "input_prefix") + list(body.prompt)
    suffix_ids = _encode(state, body.input_suffix, "input_suffix", special=False)
    whole_suffix = len(suffix_ids)
    ids, suffix_ids, truncated = fit_infill(state, ids, suffix_ids, _encode(state, "", "prompt"), body.n_predict)
    if body.n_predict == 0:
        return await _warm(state, body, ids, request, truncated)
    if not ids:
        raise APIError(400, "input_extra, input_prefix and prompt are all empty: at least one token is needed",
                       "input_prefix")
    if not suffix_ids:  # nothing after the cursor: a plain completion of the prefix
        choice, settings = await _completion_choice(state, body, _openai_body(state, body, ids), ids)
        await _run_to_cut(state, body, choice, request)
        return _send(body, dict(_finished(state, body, choice, ids, settings), truncated=truncated))
    suffix = body.input_suffix if len(suffix_ids) == whole_suffix else state.tokenizer.decode(suffix_ids)
    # the body is checked with a one-character stand-in for the suffix (CompletionRequest caps `suffix` at 64 Ki
    # characters; /infill takes what fit_infill kept, up to a quarter of the context), then given the real one;
    # the candidates are built from the fitted ids themselves, not from that text encoded again
    oa = _openai_body(state, body, ids, suffix=suffix[:1] or " ").model_copy(update={"suffix": suffix})
    start = time.perf_counter()
    (group,) = await run_infill(state, oa, [ids], request, suffix_ids=suffix_ids)
    total = time.perf_counter() - start
    text, word, middle = cut_middle(state.tokenizer, ids, group.middle, body.stop)
    text, indented = cut_indent(text, body.n_indent)
    if indented:  # before the stop string, if any: the middle ends there, with the ids its text needs
        word, middle = "", fewest_ids(lambda part: middle_text(state.tokenizer, ids, part), middle, text)
    cands = group.candidates
    chosen = cands[group.best].request
    return _send(body, _response(
        state, body, content=text, ids=middle, prompt_ids=ids,
        stop_type="word" if word else "limit" if indented or group.at_limit else "eos", stopping_word=word,
        cached=min(c.cached_tokens for c in cands), prompt_s=max(c.prompt_seconds for c in cands), total_s=total,
        truncated=truncated, params=chosen.params,
        seed=chosen.seed if oa.seed is None else oa.seed))  # the request's seed replays the reply (candidates offset it)


__all__ = ["LlamaCompletionRequest", "LlamaInfillRequest", "completion", "infill", "props", "cut_indent",
           "select_fields", "render_extra", "fit_infill"]
