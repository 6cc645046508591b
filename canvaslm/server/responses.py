"""POST /v1/responses: OpenAI's Responses API over the chat machinery.

A Responses body is translated to a chat completion body (`to_chat`): `instructions` becomes a system
message, `input` messages become chat messages, `function_call` / `function_call_output` items become an
assistant turn's tool calls and the tool results, flat function tools become chat tools, `text.format`
becomes `response_format`, `max_output_tokens` becomes `max_tokens`. The request then runs exactly as
/v1/chat/completions runs it (same prompt, constraints, seeds, engine), and the reply is laid out as a
Response: a `reasoning` item with the reply's thought channel when it wrote one (canvaslm.reasoning;
`reasoning.effort` renders the chat template with `enable_thinking`: "none" and "minimal" off, the
others on; reasoning items sent back as input are dropped, as the template leaves earlier thoughts out;
nothing is summarised or encrypted), a `message` output item with `output_text`, and one
`function_call` item per call.

Responses are kept in memory (`store`, true by default as in OpenAI's API; the last `STORE_SIZE`
of them, oldest dropped first) so that `previous_response_id` continues a conversation: the stored
turns (input and output, without the earlier `instructions`) come before the new input. GET and
DELETE /v1/responses/{id} read and drop one. `truncation: "auto"` cuts the oldest turns from the prompt
until the reply has room (`_prepared`). Streaming sends the Responses event sequence (response.created ... response.completed, each with a
`sequence_number`). Text streams as canvases commit (with `logprobs` asked, each delta
carries its tokens' entries); a reply that may hold tool calls is sent whole once it is complete.

An `input_image` part (`image_url`: a data URL or an http(s) URL; `detail` "low" gives it the smallest
image budget, 70 soft tokens, the others the request's) becomes the chat route's image part, in place
among the message's text; an image that does not load is a 400 naming it (`input[i].content[k]`). A
`file_id` alone is refused (there is no file store).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

from .protocol import ChatCompletionRequest, InputImage, ResponsesRequest
from .serving import (APIError, ServerState, in_band, encode_chat, need_chat_template, need_tokenizer,
                      prepare_translated, off_loop, renamed, run_choices, run_to_end, thought_tokens, usage, validated)
from .tools import auto_problem, auto_tools, call_offsets, reply_message, text_around_calls, tool_replies


CHAT_TO_RESPONSES = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text"}
RENAMED_IN_TEXT = ("max_tokens", "response_format")  # named in other fields' errors too ("messages" is a word)
STORE_SIZE = 1024  # responses kept for previous_response_id / GET (per server process, in memory)


def stored(state: ServerState, rid: str, param: str = "response_id") -> dict:
    entry = state.response_store.get(rid)
    if entry is None:
        raise APIError(404, f"response {rid!r} not found: it was not stored, was dropped (only the last "
                            f"{STORE_SIZE} are kept) or was deleted", param, code="response_not_found")
    return entry


def store(state: ServerState, response: dict, turns: list) -> None:
    state.response_store[response["id"]] = {"response": response, "turns": turns}
    while len(state.response_store) > STORE_SIZE:
        state.response_store.popitem(last=False)


def to_chat(body: ResponsesRequest, history: list | None = None, places: list | None = None,
            drop: frozenset = frozenset()) -> tuple[ChatCompletionRequest, list]:
    """The chat completion body that asks for what `body` asks for, after the `history` turns (chat
    messages), and the turns this request adds (its input, without the instructions); `places` gets where
    each image came from, in prompt order (`image_error_at`). `drop`: indices of turns (history, then input)
    left out of the chat body (`truncation: "auto"`, see `truncations`); the turns returned keep them all."""
    places = [] if places is None else places
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages += [_copy_turn(m) for m in history or []]  # the stored turns stay as they were
    places += ["previous_response_id: an image of an earlier turn"] * sum(map(_image_count, history or []))
    first_new = len(messages)
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for n, item in enumerate(items):
        if isinstance(item, dict):
            messages.append(item)
        elif item.type == "reasoning":  # an earlier thought: the template leaves those out
            continue
        elif item.type == "message":
            content = _content(item.content, f"input[{n}].content", places)
            last = messages[-1] if len(messages) > first_new else None
            if (item.role == "assistant" and last is not None and last["role"] == "assistant" and last.get("tool_calls")
                    and isinstance(content, str) and isinstance(last.get("content") or "", str)):
                # text a reply wrote after its calls (output_items puts it in its own item): the same one turn
                last["content"] = (last.get("content") or "") + content
            else:
                messages.append({"role": item.role, "content": content})
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            # a call joins the assistant message (or call) just before it: a replayed `output` (text, then its
            # calls; a reasoning item between is dropped) renders as one turn, as previous_response_id and chat
            # render it. A stored turn is left as it was (`turns` would miss the call).
            last = messages[-1] if len(messages) > first_new else None
            if last is not None and last["role"] == "assistant":
                last["tool_calls"] = [*(last.get("tool_calls") or []), call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": _content(item.output, f"input[{n}].output", places)})
    if len(messages) == first_new:
        raise APIError(400, "input is empty", "input")
    turns = [_copy_turn(m) for m in messages[first_new:]]
    if drop:
        start, kept, kept_places, at = (1 if body.instructions else 0), [], [], 0
        for k, m in enumerate(messages[start:]):
            n = _image_count(m)
            if k not in drop:
                kept.append(m)
                kept_places += places[at:at + n]
            at += n
        messages[start:], places[:] = kept, kept_places
    fields = dict(model=body.model, messages=messages, stream=body.stream, user=body.user,
                  temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_output_tokens,
                  parallel_tool_calls=body.parallel_tool_calls, seed=body.seed,
                  max_denoising_steps=body.max_denoising_steps, entropy_bound=body.entropy_bound,
                  confidence_threshold=body.confidence_threshold, top_k=body.top_k, min_p=body.min_p,
                  logit_bias=body.logit_bias,
                  priority=body.priority, min_tokens=body.min_tokens, thinking_token_budget=body.thinking_token_budget)
    if (body.reasoning or {}).get("effort") is not None:  # chat's reasoning_effort: the template's enable_thinking
        fields["reasoning_effort"] = body.reasoning["effort"]
    if body.tools:
        fields["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                           for t in body.tools]
    if body.tool_choice is not None:
        choice = body.tool_choice
        fields["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                        "function": {"name": choice.name}}
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "text.format: a json_schema format needs its schema", "text")
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
    elif fmt is not None and fmt.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    return validated(ChatCompletionRequest, fields, "input"), turns


def truncations(roles: list) -> list[frozenset]:
    """`truncation: "auto"`'s candidate cuts for a conversation of turns with these roles, each dropping more
    than the one before: the oldest turns first, so that the kept ones start at a user turn (templates may ask
    roles to alternate), then, once only the newest user turn is left before them, the oldest calls and results
    after it, so that they resume at a call (a tool result never loses its call). Leading system and developer
    turns (a system prompt sent as input), the newest user turn and the newest turn always stay."""
    head = next((k for k, r in enumerate(roles) if r not in ("system", "developer")), len(roles))
    users = [k for k in range(head, len(roles)) if roles[k] == "user"]
    if not users:
        return []
    last = users[-1]
    out = [frozenset(range(head, k)) for k in users if k > head]  # the kept turns start at user turn k
    base = frozenset(range(head, last))  # then: the newest user turn, and from turn k (a call) on
    return out + [base | frozenset(range(last + 1, k)) for k in range(last + 2, len(roles)) if roles[k] != "tool"]


async def _prepared(state: ServerState, body: ResponsesRequest, history: list, roles: list, chat, ids,
                    places: list) -> tuple:
    """`prepare` for the chat body -> (choices, chat body, prompt ids with images expanded). With truncation
    "auto" (OpenAI's: drop turns to fit) and a body that does not fit, the fewest of `truncations(roles)` that
    `prepare` itself accepts, found by a binary search of real tries (each leaves out more than the one
    before, so the prompt only gets shorter): the room for the reply is what `prepare` asks for
    (max_output_tokens or the default, min_tokens, a format's or a forced call's least output, a thought
    first), and images count at their own size. When no cut fits, the 400 of the shortest try."""
    rename = lambda e: renamed(e, CHAT_TO_RESPONSES, RENAMED_IN_TEXT)  # noqa: E731  the Responses fields
    short = body.max_output_tokens is not None and body.max_output_tokens < (body.min_tokens or 0)

    async def attempt(chat, ids, places):
        prompts = [ids]
        choices = await prepare_translated(state, chat, prompts, places, rename=rename)
        return choices, chat, prompts[0]

    async def tried(drop):  # -> (result, None), or (None, the APIError of a prompt with no room for the reply)
        try:
            if not drop:
                return await attempt(chat, ids, places), None
            kept = []
            cut_chat, _ = to_chat(body, history, kept, drop=drop)
            try:
                cut_ids = await off_loop(state, encode_chat, state, cut_chat, "input")
            except APIError as e:  # the template refuses this cut (roles that must alternate): no fit
                return None, e
            return await attempt(cut_chat, cut_ids, kept), None
        except APIError as e:  # no room for the reply (min_tokens over max_output_tokens: never one)
            if e.code != "context_length_exceeded" and (short or not e.message.startswith("min_tokens=")):
                raise
            return None, e

    if body.truncation != "auto":
        return await attempt(chat, ids, places)
    found, error = await tried(frozenset())
    if found is not None:
        return found
    cuts = truncations(roles)
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:  # the fewest dropped turns that fit; the last try of a search that finds none is the shortest
        mid = (lo + hi) // 2
        result, e = await tried(cuts[mid])
        if result is not None:
            best, hi = result, mid - 1
        else:
            lo, error = mid + 1, e
    if best is not None:
        return best
    raise error


def _copy_turn(message: dict) -> dict:
    return dict(message, tool_calls=[dict(c) for c in message["tool_calls"]]) if message.get("tool_calls") \
        else dict(message)


def _content(content, where: str, places: list) -> str | list[dict]:
    """A message item's content -> chat content: its text (parts joined as the chat route joins them), or
    with images the text and image parts in order."""
    if isinstance(content, str):
        return content
    if not any(isinstance(p, InputImage) for p in content):
        return "\n".join(p.text for p in content)
    parts = []
    for k, p in enumerate(content):
        if not isinstance(p, InputImage):
            parts.append({"type": "text", "text": p.text})
            continue
        if not p.image_url:
            what = "only a file_id (this server has no file store)" if p.file_id else "no image_url"
            raise APIError(400, f"{where}[{k}]: an input_image with {what}; send image_url, a data URL "
                                "(data:image/png;base64,...) or an http(s) URL", "input")
        places.append(f"{where}[{k}]")
        detail = "high" if p.detail == "original" else p.detail  # the chat part's values ("low": fewest tokens)
        parts.append({"type": "image_url", "image_url": {"url": p.image_url, "detail": detail}})
    return parts


def _image_count(message: dict) -> int:
    content = message.get("content")
    return sum(p.get("type") == "image_url" for p in content) if isinstance(content, list) else 0


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(thought: str, item_id: str | None = None, status: str = "completed") -> dict:
    """A reply's thought channel as a Responses reasoning item (its text as `reasoning_text` content, as
    open-weight models' servers give it; no summary, nothing encrypted)."""
    return {"type": "reasoning", "id": item_id or _item_id("rs"), "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": thought}], "encrypted_content": None}


def output_items(message: dict, status: str = "completed", logprobs: list | None = None,
                 thought: str = "", calls_at: list | None = None) -> list[dict]:
    """A chat reply message -> Responses output items (its thought, its text, with `logprobs` when asked,
    then one item per tool call). `calls_at` (tools.call_offsets): where in the text each call sat, so text
    written between or after calls is a message item in its place (white space around calls is none)."""
    text, calls = message.get("content") or "", message.get("tool_calls") or []
    items = [reasoning_item(thought)] if thought else []

    def said(part: str, logprobs=None) -> list[dict]:
        return [{"type": "message", "id": _item_id("msg"), "status": status, "role": "assistant",
                 "content": [_text_part(part, logprobs)]}]

    if not calls:  # an empty message too when nothing was generated (an immediate EOS), as OpenAI sends
        return items + said(text, logprobs)
    pieces = text_around_calls(message, calls_at)
    items += said(pieces[0], logprobs) if pieces[0].strip() else []
    for call, piece in zip(calls, pieces[1:]):
        items.append({"type": "function_call", "id": _item_id("fc"), "call_id": call["id"], "status": "completed",
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"]})
        items += said(piece) if piece.strip() else []
    return items


def _text_part(text: str, logprobs: list | None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return part


async def _logprobs(state: ServerState, body: ResponsesRequest, prompt: list, c, message: dict) -> list | None:
    """The output text's log-probs in the Responses format (chat's entries: token, logprob, bytes,
    top_logprobs; a thought's tokens left out), or None if not asked; none for a reply read as tool calls."""
    if not body.wants_logprobs():
        return None
    if message.get("tool_calls"):
        return []
    return await _content_logprobs(state, body, prompt, c)


async def _content_logprobs(state: ServerState, body: ResponsesRequest, prompt: list, c) -> list:
    """The log-prob entries of the choice's content tokens so far (a thought's left out)."""
    from .scored import chat_logprobs

    need_tokenizer(state, "top_logprobs")
    entries = (await chat_logprobs(state, body.model, prompt, c.tracker.ids, body.top_logprobs or 0))["content"]
    return [entries[i] for i in c.tracker.content_positions() if i < len(entries)]  # a final EOS has none


def response_object(state: ServerState, body: ResponsesRequest, rid: str, created: int, output: list,
                    finish: str | None, use: dict | None, reasoning_tokens: int = 0) -> dict:
    status = "in_progress" if finish is None else "incomplete" if finish == "length" else "completed"
    out = {"id": rid, "object": "response", "created_at": created, "status": status,
           "model": state.reply_name(body.model),
           "output": output, "error": None,
           "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
           "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
           "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
           "previous_response_id": body.previous_response_id,
           "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": (body.reasoning or {}).get("summary")}
           if body.reasoning else None, "store": body.store is not False,
           "temperature": body.temperature, "top_p": body.top_p,
           "text": {"format": {"type": "text"}} if body.text is None or body.text.format is None
           else {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)},
           "tool_choice": body.tool_choice if isinstance(body.tool_choice, str) or body.tool_choice is None
           else body.tool_choice.model_dump(), "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
           "truncation": body.truncation or "disabled", "user": body.user, "usage": None}
    if out["tool_choice"] is None:
        out["tool_choice"] = "auto" if body.tools else "none"
    if use is not None:
        out["usage"] = {"input_tokens": use["prompt_tokens"], "output_tokens": use["completion_tokens"],
                        "total_tokens": use["total_tokens"],
                        "input_tokens_details": {"cached_tokens": use["prompt_tokens_details"]["cached_tokens"]},
                        "output_tokens_details": {"reasoning_tokens": reasoning_tokens}}
    return out


AUTO_TERMS = ('tool_choice "auto" (the default with tools)',
              'send tool_choice "required" (the model picks one of the tools), {"type": "function", "name": ...}, '
              'or "none"')


async def create_response(state: ServerState, body: ResponsesRequest, request):
    problem = body.unsupported()
    if problem is not None:
        raise APIError(400, problem[1], problem[0])
    need_chat_template(state, "input")
    history = stored(state, body.previous_response_id, "previous_response_id")["turns"] \
        if body.previous_response_id is not None else []
    places = []
    chat, turns = to_chat(body, history, places)
    problem = auto_problem(state.tokenizer, AUTO_TERMS) if auto_tools(chat) else None
    if problem is not None:  # in this API's terms: the chat route would advise chat's tool_choice shape
        raise APIError(400, problem, "tool_choice")
    ids = await off_loop(state, encode_chat, state, chat, "input")
    choices, chat, ids = await _prepared(state, body, history, [m["role"] for m in history + turns], chat, ids,
                                         places)  # ids: images expanded to their soft tokens
    replies = tool_replies(state, chat, choices)
    rid, created = _item_id("resp"), int(time.time())
    if body.stream:
        from fastapi.responses import StreamingResponse

        return StreamingResponse(_stream(state, body, choices, [ids], replies, rid, created, history + turns),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await run_to_end(state, choices, request)
    c = choices[0]
    message = reply_message(c, replies)
    logprobs = await _logprobs(state, body, ids, c, message)
    out = response_object(state, body, rid, created, output_items(message, logprobs=logprobs, thought=c.tracker.reasoning,
                                                                  calls_at=call_offsets(c, replies, message)),
                          c.finish_reason, usage(choices, [ids]), thought_tokens(c))
    if body.store is not False:
        store(state, out, history + turns + [message])
    return out


async def _stream(state, body, choices, prompts, replies, rid, created, turns):
    seq = 0

    def event(kind: str, **data) -> str:
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **data}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    c = choices[0]
    yield event("response.created", response=response_object(state, body, rid, created, [], None, None))
    yield event("response.in_progress", response=response_object(state, body, rid, created, [], None, None))
    try:
        if replies:  # tool calls are read from the whole reply: send it once complete
            async with contextlib.aclosing(run_choices(state, choices)) as events:
                async for _ in events:
                    pass
            message = reply_message(c, replies)  # once: a parsed call's id is drawn when its message is built
            logprobs = await _logprobs(state, body, prompts[0], c, message)
            items = output_items(message, logprobs=logprobs, thought=c.tracker.reasoning,
                                 calls_at=call_offsets(c, replies, message))
            for k, item in enumerate(items):
                for line in _item_events(event, k, item):
                    yield line
        else:  # a thought streams as item 0 (before the answer, as the model writes it), the message after it
            msg_id, rs_id, thought, items = _item_id("msg"), _item_id("rs"), None, []
            part = {"type": "output_text", "text": "", "annotations": []}

            def close_thought():
                items.append(reasoning_item(thought, rs_id))
                return _reasoning_closed(event, 0, items[0])

            def open_message():
                yield event("response.output_item.added", output_index=len(items), item={
                    "type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []})
                yield event("response.content_part.added", item_id=msg_id, output_index=len(items), content_index=0,
                            part=part)

            text, started, late = "", False, ""  # late: a thought written after the answer began
            scored = 0  # log-prob entries already sent on the deltas
            async with contextlib.aclosing(run_choices(state, choices)) as events:
                async for kind, _, payload in events:
                    if kind == "reasoning" and started:
                        late += payload
                    elif kind == "reasoning":
                        if thought is None:
                            thought = ""
                            for line in _reasoning_opened(event, 0, rs_id):
                                yield line
                        thought += payload
                        yield _reasoning_delta(event, 0, rs_id, payload)
                    elif kind == "delta" and payload:
                        if not started:
                            for line in (close_thought() if thought is not None else ()):
                                yield line
                            for line in open_message():
                                yield line
                            started = True
                        text += payload
                        new = []
                        if body.wants_logprobs():  # each delta carries its own tokens' entries, as OpenAI's do:
                            # one encoder pass over prompt and reply so far per commit, as chat's stream costs
                            entries = await _content_logprobs(state, body, prompts[0], c)
                            new, scored = entries[scored:], max(scored, len(entries))
                        yield event("response.output_text.delta", item_id=msg_id, output_index=len(items),
                                    content_index=0, delta=payload, logprobs=new)
            if not started:
                for line in (close_thought() if thought is not None else ()):
                    yield line
                for line in open_message():
                    yield line
            k = len(items)
            message = reply_message(c, replies)
            logprobs = await _logprobs(state, body, prompts[0], c, message)  # all of them on the done events
            part = _text_part(text, logprobs)
            yield event("response.output_text.done", item_id=msg_id, output_index=k, content_index=0, text=text,
                        logprobs=logprobs or [])
            yield event("response.content_part.done", item_id=msg_id, output_index=k, content_index=0, part=part)
            items.append({"type": "message", "id": msg_id, "status": "completed", "role": "assistant",
                          "content": [part]})
            yield event("response.output_item.done", output_index=k, item=items[k])
            if late:  # its own item after the message (the answer's item was already open)
                items.append(reasoning_item(late))
                for line in _item_events(event, k + 1, items[-1]):
                    yield line
        final = response_object(state, body, rid, created, items, c.finish_reason, usage(choices, prompts),
                                thought_tokens(c))
        if body.store is not False:
            store(state, final, turns + [message])
        yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                    response=final)
    except Exception as exc:  # headers are sent: report in-band
        e = in_band(exc)
        yield event("error", code=e.code or e.type, message=e.message, param=e.param)


def _reasoning_opened(event, k: int, item_id: str) -> tuple[str, str]:
    """A reasoning item's first events: the item (in progress, empty) and its reasoning_text part."""
    return (event("response.output_item.added", output_index=k,
                  item={**reasoning_item("", item_id, "in_progress"), "content": []}),
            event("response.content_part.added", item_id=item_id, output_index=k, content_index=0,
                  part={"type": "reasoning_text", "text": ""}))


def _reasoning_delta(event, k: int, item_id: str, text: str) -> str:
    return event("response.reasoning_text.delta", item_id=item_id, output_index=k, content_index=0, delta=text)


def _reasoning_closed(event, k: int, item: dict) -> tuple[str, str, str]:
    """A reasoning item's last events: its text, its part and the item, done."""
    part = item["content"][0]
    return (event("response.reasoning_text.done", item_id=item["id"], output_index=k, content_index=0,
                  text=part["text"]),
            event("response.content_part.done", item_id=item["id"], output_index=k, content_index=0, part=part),
            event("response.output_item.done", output_index=k, item=item))


def _item_events(event, k: int, item: dict):
    """The added / delta / done events of one whole output item."""
    if item["type"] == "reasoning":
        yield from _reasoning_opened(event, k, item["id"])
        yield _reasoning_delta(event, k, item["id"], item["content"][0]["text"])
        yield from _reasoning_closed(event, k, item)
        return
    if item["type"] == "function_call":
        yield event("response.output_item.added", output_index=k, item={**item, "arguments": "",
                                                                          "status": "in_progress"})
        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=k,
                    delta=item["arguments"])
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=k,
                    name=item["name"], arguments=item["arguments"])
        yield event("response.output_item.done", output_index=k, item=item)
        return
    part = item["content"][0]
    yield event("response.output_item.added", output_index=k, item={**item, "status": "in_progress", "content": []})
    yield event("response.content_part.added", item_id=item["id"], output_index=k, content_index=0,
                part={**part, "text": ""})
    if part["text"]:  # one delta with the whole text: it carries all the entries, as the done event does
        yield event("response.output_text.delta", item_id=item["id"], output_index=k, content_index=0,
                    delta=part["text"], logprobs=part.get("logprobs", []))
    yield event("response.output_text.done", item_id=item["id"], output_index=k, content_index=0,
                text=part["text"], logprobs=part.get("logprobs", []))
    yield event("response.content_part.done", item_id=item["id"], output_index=k, content_index=0, part=part)
    yield event("response.output_item.done", output_index=k, item=item)
