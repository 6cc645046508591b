"""`echo` and `logprobs` on /v1/completions (OpenAI's legacy format, what lm-evaluation-harness reads for
log-likelihood tasks: echo=true, logprobs=k, max_tokens=0 or 1).

A diffusion step has no single next-token distribution to report, so every log-prob here comes from the
encoder's causal pass (DiffusionGemma's encoder is trained with a next-token loss): after generation (or
at once, with max_tokens=0), prompt + completion are encoded once on the engine thread (`Engine.call`,
`scoring.token_logprobs`) and each token gets log p(token | everything before it) and the `logprobs`
most likely alternatives. With echo the prompt's tokens come first (the very first has no log-prob, as in
OpenAI's format). A final EOS is listed (clients such as lm-evaluation-harness drop the last generated
token's entry, so every generated token must be there) though the text does not show it.

The same encoder pass ranks `best_of` > n completions (the n with the highest mean log-prob per token
are returned, each with its `score`) and gives chat's `logprobs`.
"""

from __future__ import annotations

import asyncio
import uuid

from ..scoring import batch_token_logprobs
from .serving import (APIError, ServerState, by_groups, check_choice_count, check_prompt_only, check_request_basics,
                      need_tokenizer, prepare, renamed, run_to_end, score_later, usage)


def _score_rows(state: ServerState, model: str, seqs: list, starts: list, top_k: int, ranks: bool = False,
                images: list | None = None):
    """A future of `batch_token_logprobs` of the rows on the engine thread with `model`'s adapter, in encoder
    passes of at most one slot's context of positions (serving.by_groups)."""
    images = images or [None] * len(seqs)

    def run(m):
        return by_groups(state, [len(s) for s in seqs], lambda group: batch_token_logprobs(
            m, [seqs[i] for i in group], [starts[i] for i in group], top_k, ranks=ranks,
            images=[images[i] for i in group]))
    return state.engine_call(model, run)


async def complete_scored(state: ServerState, body, prompts: list[list[int]], request) -> dict:
    need_tokenizer(state, "logprobs" if body.logprobs is not None else "echo")
    if body.max_tokens == 0:  # score the prompt only
        await asyncio.to_thread(check_prompt_only, state, body, prompts)  # may compile a constraint, load images
        outputs = [(p, [], "length", 0) for p in prompts for _ in range(body.n)]
        texts = [""] * len(outputs)
    else:
        choices = await asyncio.to_thread(prepare, state, body, prompts)
        await run_to_end(state, choices, request)
        outputs = []
        for c in choices:
            # every token counted is listed (vLLM's way): a final EOS (not in the text), as OpenAI lists its end
            # token, and after a stop string the tokens up to the one that completed it
            ids = list(c.tracker.ids)
            outputs.append((prompts[c.prompt_index], ids, c.finish_reason, c.decoder_passes))
        # the text is the tracker's, as without logprobs (stop strings applied, skip_special_tokens honoured);
        # the ids above only list the tokens
        texts = [c.tracker.text for c in choices]
    top_k = body.logprobs or 0
    seqs = [list(prompt) + ids for prompt, ids, _, _ in outputs]
    scored = [None] * len(outputs)
    if body.logprobs is not None:  # every choice in one engine call, batched encoder passes
        starts = [1 if body.echo else len(prompt) for prompt, _, _, _ in outputs]
        scored = await asyncio.wrap_future(_score_rows(state, body.model, seqs, starts, top_k))
    echoed = echo_texts(state, body, prompts) if body.echo else None
    out = []
    for i, ((prompt, ids, finish, _), seq, text) in enumerate(zip(outputs, seqs, texts)):
        shown = seq if body.echo else ids
        head = echoed[i // body.n] if body.echo else ""  # n choices per prompt, in order
        choice = {"index": i, "text": head + text, "finish_reason": finish, "logprobs": None}
        if scored[i] is not None:
            logprobs, tops = scored[i]
            choice["logprobs"] = _legacy_logprobs(state.tokenizer, shown, body.echo, logprobs, tops, top_k,
                                                  skip_special=body.skip_special_tokens,
                                                  prompt=(len(prompt), head) if body.echo else None)
        out.append(choice)
    use = usage(choices, prompts) if body.max_tokens != 0 else {
        "prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0,
        "total_tokens": sum(len(p) for p in prompts), "decoder_passes": 0, "prompt_tokens_details": {"cached_tokens": 0}}
    return _response(state, body, out, use)


async def complete_best_of(state: ServerState, body, prompts: list[list[int]], request) -> dict:
    """best_of > n: generate best_of completions per prompt and return the n with the highest mean log-prob
    per token under the encoder (OpenAI's rule), most likely first. Usage counts every completion made."""
    check_request_basics(state, body, prompts)  # the request as sent (the widened one always has best_of == n)
    try:
        check_choice_count(prompts, body.best_of)
    except APIError as e:
        raise renamed(e, {"n": "best_of"}) from None
    wide = body.model_copy(update={"n": body.best_of})
    choices = await asyncio.to_thread(prepare, state, wide, prompts)
    await run_to_end(state, choices, request)
    out = []
    for p_index, prompt in enumerate(prompts):
        group = [c for c in choices if c.prompt_index == p_index]
        conts = [list(c.tracker.ids) for c in group]
        scores = await asyncio.wrap_future(score_later(state, body.model, prompt, conts))
        order = sorted(range(len(group)), key=lambda k: (-scores[k] if conts[k] else float("inf"), k))[:body.n]
        out += [{"index": len(out) + r, "text": group[k].tracker.text, "finish_reason": group[k].finish_reason,
                 "logprobs": None, "score": scores[k]} for r, k in enumerate(order)]
    return _response(state, body, out, usage(choices, prompts))


def _response(state: ServerState, body, choices: list, use: dict) -> dict:
    """The completion reply; `use`: its usage, as serving.usage() gives every other reply's."""
    return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "model": state.reply_name(body.model),
            "choices": choices, "usage": use}


async def chat_logprobs(state: ServerState, model: str, prompt: list, output_ids: list, top_k: int) -> dict:
    """Chat's `logprobs` object for a reply: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"},
    scored by the request's `model` (the base or a LoRA adapter)."""
    return (await chat_logprobs_many(state, model, [(prompt, output_ids)], top_k))[0]


async def chat_logprobs_many(state: ServerState, model: str, replies: list, top_k: int) -> list:
    """`chat_logprobs` of many (prompt, output ids) replies, in one engine call."""
    eos = set(state.eos_ids)
    outs = [list(ids[:-1]) if ids and ids[-1] in eos else list(ids) for _, ids in replies]
    seqs = [list(prompt) + ids for (prompt, _), ids in zip(replies, outs)]
    starts = [len(prompt) for prompt, _ in replies]
    images = [getattr(prompt, "images", None) for prompt, _ in replies]  # an image prompt's soft tokens
    scored = await asyncio.wrap_future(_score_rows(state, model, seqs, starts, top_k, images=images))

    def entry(t, lp):  # bytes: the token's own (a byte token's one byte, not its text's replacement character)
        token = state.tokenizer.decode([t], skip_special_tokens=False)
        return {"token": token, "logprob": lp, "bytes": list(state.tokenizer.token_bytes(t))}

    return [{"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in (tops[k] if top_k else [])]}
                         for k, (t, lp) in enumerate(zip(ids, logprobs))], "refusal": None}
            for ids, (logprobs, tops) in zip(outs, scored)]


async def completion_logprobs(state: ServerState, model: str, prompt: list, output_ids: list, top_k: int,
                              skip_special: bool = True) -> dict:
    """The legacy `logprobs` object of a completion's tokens so far (streamed completions send its new
    entries with each chunk); text_offset counts a special token's text unless `skip_special`."""
    fut = state.engine_call(model, lambda m: batch_token_logprobs(m, [list(prompt) + list(output_ids)],
                                                                  [len(prompt)], top_k))
    logprobs, tops = (await asyncio.wrap_future(fut))[0]
    return _legacy_logprobs(state.tokenizer, list(output_ids), False, logprobs, tops, top_k, skip_special=skip_special)


async def prompt_logprobs(state: ServerState, model: str, prompts: list, top_k: int) -> list:
    """vLLM's `prompt_logprobs` of each prompt, in one engine call: [None, {token id: {"logprob", "rank",
    "decoded_token"}}, ...], one entry per prompt token (the first has nothing before it), holding the
    token itself (its rank among the whole vocabulary) and the top_k most likely tokens there."""
    need_tokenizer(state, "prompt_logprobs")
    images = [getattr(p, "images", None) for p in prompts]
    scored = await asyncio.wrap_future(_score_rows(state, model, [list(p) for p in prompts], [1] * len(prompts), top_k,
                                                   ranks=True, images=images))

    def entry(lp, rank, t):
        return {"logprob": lp, "rank": rank, "decoded_token": state.tokenizer.decode([t], skip_special_tokens=False)}

    out = []
    for prompt, (logprobs, tops, ranks) in zip(prompts, scored):
        rows = [None]
        for k, (t, lp, rank) in enumerate(zip(prompt[1:], logprobs, ranks)):
            row = {str(t): entry(lp, rank, t)}
            for r, (a, alp) in enumerate(tops[k] if top_k else [], 1):
                row.setdefault(str(a), entry(alp, r, a))
            rows.append(row)
        out.append(rows)
    return out


def echo_texts(state: ServerState, body, prompts: list) -> list[str]:
    """Each prompt's text as `echo` returns it: a text prompt as it was sent (OpenAI's and vLLM's echo: its
    special tokens too), a token-id prompt (or a text that truncate_prompt_tokens cut) decoded, its special
    tokens kept unless skip_special_tokens."""
    sent = body.prompt
    if isinstance(sent, str) or (sent and isinstance(sent[0], int)):  # one prompt (as the route reads it)
        sent = [sent]
    return [text if isinstance(text, str) and body.truncate_prompt_tokens is None else
            state.tokenizer.decode(list(ids), skip_special_tokens=body.skip_special_tokens)
            for text, ids in zip(sent, prompts)]


def _legacy_logprobs(tokenizer, ids: list, echo: bool, logprobs: list, tops: list, top_k: int,
                     skip_special: bool = True, prompt: tuple | None = None) -> dict:
    """OpenAI's completions `logprobs` object: tokens, token_logprobs, top_logprobs (each position's token
    itself first, then the top_k most likely: up to top_k + 1 entries, as OpenAI and vLLM give), and
    text_offset (each token's start in the returned text). prompt: (n, text) when the first n ids are an echoed
    prompt shown as `text` (`echo_texts`): a token there spans its own text where `text` shows it (a special
    token typed into a text prompt, or kept by skip_special_tokens false), else its text without special tokens
    (one the tokenizer added, as BOS); the rest are the completion's, decoded with `skip_special`."""
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    lead = [None] if echo else []  # the first prompt token has nothing before it
    n, head = prompt or (0, "")
    offsets, pos = [], 0
    for k, t in enumerate(ids):
        if k == n:  # the completion starts where the echoed text ends
            pos = len(head)
        offsets.append(pos)
        shown = k < n and head.startswith(tokens[k], pos)
        pos += len(tokens[k]) if shown else len(tokenizer.decode([t], skip_special_tokens=k < n or skip_special))
    top = []
    for k, lp in enumerate(logprobs):
        row = {tokens[k + len(lead)]: lp}  # the token taken there, whether or not among the top_k
        for t, alp in (tops[k] if top_k else []):
            row.setdefault(tokenizer.decode([t], skip_special_tokens=False), alp)
        top.append(row)
    return {"tokens": tokens, "token_logprobs": lead + logprobs, "top_logprobs": lead + top, "text_offset": offsets}


__all__ = ["complete_scored", "complete_best_of", "chat_logprobs", "completion_logprobs", "echo_texts"]
