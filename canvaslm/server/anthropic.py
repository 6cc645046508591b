"""POST /v1/messages: Anthropic's Messages API over the chat machinery, for clients that speak it (Claude
Code and other agents pointed at a local server with ANTHROPIC_BASE_URL, the `anthropic` SDK), and
POST /v1/messages/count_tokens.

A Messages body is translated to a chat completion body (`to_chat`): `system` becomes a system message;
a user turn's `tool_result` blocks become tool messages (in order, before the turn's text); an
assistant turn's `tool_use` blocks become its tool calls (input as JSON arguments); `tools` become
function tools (`input_schema` as parameters); `tool_choice` auto / any / tool / none become "auto" /
"required" / the named function / "none"; `max_tokens`, `temperature`, `top_p`, `top_k` keep their
meaning. It then runs exactly as /v1/chat/completions runs it (same prompt, constraints, seeds, engine).
The reply is a message whose content is its blocks in the order the model wrote them: text, one `tool_use`
block per call, and text written between or after calls in its place (a call left unfinished after complete
ones is text too); an empty reply has none: `[]`, and its stream no content block, as Anthropic's. With
`stop_reason` end_turn, max_tokens (first, as Anthropic's: a reply cut short with complete calls says
max_tokens), stop_sequence (and `stop_sequence`) or tool_use, and usage in
Anthropic's names (`cache_read_input_tokens`: prompt tokens from the prefix cache). Structured output
(`output_config.format`, a JSON schema) is the chat route's `response_format` json_schema: the text
always parses and validates, unless a `stop_sequences` entry cuts it. `temperature`, `top_p` and `top_k` (which older clients send) are honoured.

`stop_sequences` (up to 16) cut the text as stop strings do; with a forced call (`any`, `tool`) they are
refused, since they would cut the call's JSON. A stream is Anthropic's event sequence (message_start,
content_block_start / _delta / _stop, message_delta, message_stop): text streams as canvases commit; a
reply that may hold tool calls is sent once complete (its input in one `input_json_delta`). A user
turn's `image` blocks (also inside a `tool_result`) become the chat route's image parts, in place among
the text: a `base64` source as a data URL (`data:{media_type};base64,{data}`), a `url` source as its URL
(`file` sources are refused: there is no file store); an image that does not load is a 400 naming its
block. Document and server-tool blocks are refused by name, and so are tools without `input_schema` and text
blocks whose text is not a string; `tools` with tool_choice auto (or no tool_choice) on a model with no
tool-call tokens are refused with advice in this API's tool_choice terms; thinking blocks in the history
are dropped (the model's template leaves earlier thoughts out too). `thinking` ({"type": "enabled"} or
"adaptive": on; "disabled": off) renders the chat template with `enable_thinking` ("enabled" is refused on a
model with no thought channel; "adaptive" leaves it to the model); a reply's thought channel
(canvaslm.reasoning) comes first as a `thinking` block (its `signature` empty: nothing here checks one),
streamed as `thinking_delta`s; `budget_tokens` caps the thought
(sampling.thinking; `max_tokens` bounds thought and answer together). /v1/messages/count_tokens counts an
image's soft tokens (it loads the images, as a request would). Errors use Anthropic's body, `{"type": "error", "error": {"type",
"message"}}` (app.py).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..multimodal import ImagePrompt
from .protocol import INT64, ChatCompletionRequest
from .serving import (APIError, ServerState, in_band, encode_chat, image_error_at, load_images, need_chat_template,
                      errors_named, off_loop, prepare_translated, run_choices, run_to_end, validated)
from .tools import (arguments_object, auto_problem, auto_tools, call_offsets, reply_message, text_around_calls,
                    tool_replies)

MAX_STOP_SEQUENCES = 16
BASE64 = "the base64 data"  # what a load error calls an image sent as base64 (wrapped here into a data URL)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class AnthropicTool(_Body):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; server tools (web_search_...) are refused


class AnthropicToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int = Field(ge=1, le=INT64)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=4096)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT64)
    tools: list[AnthropicTool] | None = Field(None, max_length=128)
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # {"format": {"type": "json_schema", "schema": {...}}}
    # --- diffusion extensions, as on the OpenAI routes ---
    max_denoising_steps: int | None = Field(None, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, le=INT64)


class CountTokensRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=4096)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = Field(None, max_length=128)
    tool_choice: AnthropicToolChoice | None = None
    thinking: dict[str, Any] | None = None  # the count includes what thinking mode adds to the prompt


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def _content(blocks, where: str, param: str, places: list | None = None) -> str | list[dict]:
    """Chat content for a string or a list of text (and, when `places` is given, image) blocks: the text, or
    the parts in block order when images are among them; each image's place is appended to `places`."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise APIError(400, f"{where}: content must be a string or a list of blocks, got {type(blocks).__name__}",
                       param)
    parts = []
    for k, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            parts.append(_text(b, f"{where}[{k}]", param))
        elif kind == "image" and places is not None:
            parts.append(_image(b, f"{where}[{k}]", places))
        else:
            what = "text and image" if places is not None else "text only"
            raise APIError(400, f"{where}[{k}]: a block of type {kind!r} is not supported here ({what})", param)
    return _joined(parts)


def _text(block: dict, where: str, param: str) -> dict:
    """A text block's chat part (a block of type text whose text is not a string is named as such, not as an
    unsupported block)."""
    text = block.get("text")
    if not isinstance(text, str):
        got = "no text field" if "text" not in block else "null" if text is None else type(text).__name__
        raise APIError(400, f"{where}.text must be a string, got {got}", param)
    return {"type": "text", "text": text}


def _joined(parts: list[dict]) -> str | list[dict]:
    """Text parts -> their text, joined as the chat route joins a message's parts; with images, the parts."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")  # what Anthropic's API takes


def _image(block: dict, where: str, places: list) -> dict:
    """An image block -> the chat route's image part; its place (the field a load error names) is noted."""
    src = block.get("source")
    kind = src.get("type") if isinstance(src, dict) else None
    if kind == "base64" and isinstance(src.get("media_type"), str) and isinstance(src.get("data"), str):
        if src["media_type"] not in MEDIA_TYPES:
            raise APIError(400, f"{where}.source.media_type: {src['media_type']!r} is not one of "
                                f"{', '.join(MEDIA_TYPES)}", "messages")
        url, field = f"data:{src['media_type']};base64,{src['data']}", "data"
    elif kind == "url" and isinstance(src.get("url"), str) and src["url"]:
        url, field = src["url"], "url"
    elif kind in ("base64", "url"):
        need = "media_type and data" if kind == "base64" else "a url"
        raise APIError(400, f"{where}.source: a {kind} image source needs {need}", "messages")
    else:
        raise APIError(400, f"{where}.source.type: {kind!r} image sources are not supported (this server takes "
                            "base64 and url sources; it has no file store)", "messages")
    places.append(f"{where}.source.{field}")
    return {"type": "image_url", "image_url": {"url": url}}


def _messages(body, places: list | None = None) -> list[dict]:
    """The chat messages for a Messages (or count_tokens) body; `places` gets where each image came from,
    in prompt order."""
    places = [] if places is None else places
    out = [{"role": "system", "content": _content(body.system, "system", "system")}] if body.system else []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}].content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts, calls, results, result_places, own_places = [], [], [], [], []
        for k, b in enumerate(m.content):
            kind = b.get("type")
            if kind == "text":
                parts.append(_text(b, f"{where}[{k}]", "messages"))
            elif kind == "image" and m.role == "user":
                parts.append(_image(b, f"{where}[{k}]", own_places))
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise APIError(400, f"{where}[{k}]: a tool_use block needs a name and an input object", "messages")
                calls.append({"id": str(b.get("id") or f"toolu_{uuid.uuid4().hex[:24]}"), "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
            elif kind == "tool_result" and m.role == "user":
                content = b.get("content", "")
                content = _content(content, f"{where}[{k}].content", "messages", result_places) if content else ""
                if b.get("is_error"):
                    content = f"Error: {content}" if isinstance(content, str) else \
                        [{"type": "text", "text": "Error:"}, *content]
                results.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")), "content": content})
            elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # this server writes none; a client may send back another model's
            else:
                raise APIError(400, f"{where}[{k}]: {kind!r} blocks are not supported in {m.role} turns "
                                    "(user turns take text, image and tool_result blocks; assistant turns text "
                                    "and tool_use blocks)", "messages")
        out += results  # the tool results come first: their images too
        places += result_places + own_places
        if m.role == "assistant":
            out.append({"role": "assistant", "content": _joined(parts) or None, **({"tool_calls": calls} if calls
                                                                                   else {})})
        elif parts or not results:
            out.append({"role": "user", "content": _joined(parts)})
    return out


def _tools(body) -> dict:
    fields = {}
    if body.tools:
        for i, t in enumerate(body.tools):
            if t.type not in (None, "custom"):
                raise APIError(400, f"tools[{i}]: {t.name!r} is a server tool ({t.type}); this server runs custom "
                                    "tools (name, description, input_schema) only", "tools")
            if t.input_schema is None:
                raise APIError(400, f"tools[{i}].input_schema is required (the JSON schema of {t.name}'s input)",
                               "tools")
        fields["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}), "parameters": t.input_schema}}
            for t in body.tools]
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, "tool_choice: type 'tool' needs the tool's name", "tool_choice")
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:  # at most one tool_use block
            fields["parallel_tool_calls"] = False
    return fields


def to_chat(body: MessagesRequest, places: list | None = None) -> ChatCompletionRequest:
    """The chat completion body for `body`; `places` gets where each image came from (`image_error_at`)."""
    fields = dict(model=body.model, messages=_messages(body, places), max_tokens=body.max_tokens,
                  temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                  max_denoising_steps=body.max_denoising_steps, stream=body.stream, **_tools(body), **_prefill(body))
    fields.update(_thinking(body))
    fmt = (body.output_config or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise APIError(400, "output_config.format: expected {\"type\": \"json_schema\", \"schema\": {...}}",
                           "output_config")
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    return validated(ChatCompletionRequest, fields, "messages")


def _prefill(body) -> dict:
    """A final assistant message (text, no tool use) is a prefill: the reply goes on from it, as Anthropic's does."""
    last = body.messages[-1]
    if last.role != "assistant" or (isinstance(last.content, list) and any(
            isinstance(b, dict) and b.get("type") != "text" for b in last.content)):
        return {}
    return {"continue_final_message": True, "add_generation_prompt": False}


def _thinking(body) -> dict:
    """The chat fields for the body's `thinking`: the template's enable_thinking (none without it)."""
    if body.thinking is None:
        return {}
    kind = body.thinking.get("type")
    if kind not in ("enabled", "adaptive", "disabled"):
        raise APIError(400, f"thinking.type {kind!r}: expected enabled, adaptive or disabled", "thinking")
    fields = {"chat_template_kwargs": {"enable_thinking": kind != "disabled"}}
    budget = body.thinking.get("budget_tokens")
    if kind == "enabled" and budget is not None:  # enforced: at most this many tokens of thought
        if not isinstance(budget, int) or isinstance(budget, bool) or not 0 <= budget <= INT64:
            raise APIError(400, f"thinking.budget_tokens must be an integer in [0, {INT64}], got {budget!r}",
                           "thinking")
        fields["thinking_token_budget"] = budget
    return fields


# "auto" and the tool_choice values to send instead of it, in the Messages API's terms (tools.auto_problem)
AUTO_TERMS = ('tool_choice {"type": "auto"} (the default with tools)',
              'send tool_choice {"type": "any"} (the model picks one of the tools), {"type": "tool", "name": ...}, '
              'or {"type": "none"}')


def _check_model(state: ServerState, body: MessagesRequest, chat: ChatCompletionRequest) -> None:
    """What this model cannot do, refused in the Messages API's terms before the chat route sees it (it would
    advise chat fields, or run on without a thought): thinking asked of a model with no thought channel, and
    calls in the model's own syntax with no tool-call tokens in its vocabulary."""
    from ..reasoning import ThoughtSplitter

    thinks = ThoughtSplitter.for_tokenizer(state.tokenizer) is not None  # with --reasoning-parser none too (the
    # thought then stays in the text)
    if (body.thinking or {}).get("type") == "enabled" and not thinks:
        raise APIError(400, f"thinking: {body.model!r} does not support thinking (its tokenizer has no thought "
                            "channel tokens); send thinking {\"type\": \"disabled\"} or none", "thinking")
    problem = auto_problem(state.tokenizer, AUTO_TERMS) if auto_tools(chat) else None
    if problem is not None:
        raise APIError(400, problem, "tool_choice")


# what an error about the translated chat body names, in the Messages body's own terms
MESSAGES_NAMES = {"thinking_token_budget": "thinking.budget_tokens", "response_format": "output_config.format",
                  "stop": "stop_sequences", "tool_choice 'required'": "tool_choice 'any'"}
messages_names = errors_named(MESSAGES_NAMES, in_text=tuple(MESSAGES_NAMES))


@messages_names
async def count_tokens(state: ServerState, body: CountTokensRequest) -> dict:
    """The prompt's length as a request would run it: images count their soft tokens (they are loaded and
    expanded here, in a worker thread, as `prepare` does)."""
    need_chat_template(state, "messages")
    state.adapter(body.model)
    places = []
    chat = validated(ChatCompletionRequest, {"model": body.model, "messages": _messages(body, places),
                                             **_tools(body), **_thinking(body), **_prefill(body)}, "messages")
    prompts = [await off_loop(state, encode_chat, state, chat)]
    if isinstance(prompts[0], ImagePrompt):
        try:
            await off_loop(state, load_images, state, chat, prompts, True, prompts=prompts)  # counted: no tower
        except APIError as e:
            raise image_error_at(e, places, BASE64) from None
    return {"input_tokens": len(prompts[0])}


def _reply_blocks(c, replies: dict) -> list[dict]:
    """A finished choice's Messages content blocks (the whole message's, and the stream's of a tool reply)."""
    message = reply_message(c, replies)
    return _blocks(message, c.tracker.reasoning, c.tracker.thought_at(), call_offsets(c, replies, message))


def _blocks(message: dict, thinking: str = "", thought_at: int | None = None, calls_at: list | None = None) -> list[dict]:
    """A chat reply message (and its thought) -> Messages content blocks, in the order the model wrote them:
    `thought_at` (TextTracker.thought_at) is where in the text a thought begun after it sits; `calls_at`
    (ToolReply.call_offsets) is where in the text each tool call sat, so text written between or after calls
    (an unfinished call cut by max_tokens is text too) is a text block in its place, not joined to the first.
    A text with calls around it is a block only where it holds more than white space (Anthropic refuses
    white-space text blocks sent back in a conversation)."""
    think = [{"type": "thinking", "thinking": thinking, "signature": ""}] if thinking else []
    text = message.get("content") or ""
    calls = [{"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
              "input": arguments_object(call["function"]["arguments"])} for call in message.get("tool_calls") or []]

    def said(part: str) -> list[dict]:  # an empty text is no block (as the stream opens none for it)
        return [{"type": "text", "text": part}] if part and (part.strip() or not calls) else []

    pieces = text_around_calls(message, calls_at)  # the text before each call, then after the last
    if thought_at is None or not think:
        blocks = think + said(pieces[0])
    elif calls:  # the calls' text is not the tracker's: the first text, then the thought
        blocks = said(pieces[0]) + think
    else:
        blocks = said(text[:thought_at]) + think + said(text[thought_at:])
    for call, piece in zip(calls, pieces[1:]):
        blocks += [call, *said(piece)]
    return blocks


def _stop(c, blocks: list) -> tuple[str, str | None]:
    """stop_reason and stop_sequence. max_tokens comes first, as Anthropic's: a reply cut short says so even
    when it holds complete tool_use blocks (the chat route's finish_reason is "length" too)."""
    if c.finish_reason == "length":
        return "max_tokens", None
    if any(b["type"] == "tool_use" for b in blocks):
        return "tool_use", None
    if c.tracker.stopped:
        return "stop_sequence", c.tracker.stop_word
    return "end_turn", None


def _usage(c, prompt_len: int, output: bool = True) -> dict:
    return {"input_tokens": prompt_len - c.cached_tokens, "cache_read_input_tokens": c.cached_tokens,
            "cache_creation_input_tokens": 0, "output_tokens": len(c.tracker.ids) if output else 0}


@messages_names
async def create_message(state: ServerState, body: MessagesRequest, request):
    need_chat_template(state, "messages")
    places = []
    chat = to_chat(body, places)
    _check_model(state, body, chat)
    ids = await off_loop(state, encode_chat, state, chat, "messages")
    stops = [s for s in body.stop_sequences or [] if s]
    if stops and chat.tools and chat.tool_choice not in (None, "auto", "none"):
        raise APIError(400, "stop_sequences would cut a forced tool call's input; send none with tool_choice "
                            "any or tool", "stop_sequences")
    prompts = [ids]
    choices = await prepare_translated(state, chat, prompts, places, BASE64)
    ids = prompts[0]  # images expanded to their soft tokens
    replies = tool_replies(state, chat, choices)
    c = choices[0]
    c.tracker.stops = stops
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        from fastapi.responses import StreamingResponse

        return StreamingResponse(_stream(state, body, c, replies, len(ids), mid), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await run_to_end(state, choices, request)
    blocks = _reply_blocks(c, replies)
    reason, seq = _stop(c, blocks)
    return {"id": mid, "type": "message", "role": "assistant", "model": body.model, "content": blocks,
            "stop_reason": reason, "stop_sequence": seq, "usage": _usage(c, len(ids))}


async def _stream(state: ServerState, body, c, replies, prompt_len: int, mid: str):
    def event(kind: str, **data) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"

    start = {"id": mid, "type": "message", "role": "assistant", "model": body.model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": _usage(c, prompt_len, output=False)}
    yield event("message_start", message=start)
    try:
        if replies:  # calls are read from the whole reply: sent once complete
            async with contextlib.aclosing(run_choices(state, [c])) as events:
                async for _ in events:
                    pass
            blocks = []
            for b in _reply_blocks(c, replies):
                if b["type"] in ("thinking", "text"):
                    lines = _open_block(event, blocks, b["type"])
                    blocks[-1] = b
                    lines.append(event("content_block_delta", index=len(blocks) - 1,
                                       delta={"type": b["type"] + "_delta", b["type"]: b[b["type"]]}))
                else:
                    lines = _close_block(event, blocks)
                    blocks.append(b)
                    lines += [event("content_block_start", index=len(blocks) - 1, content_block={**b, "input": {}}),
                              event("content_block_delta", index=len(blocks) - 1,
                                    delta={"type": "input_json_delta", "partial_json": json.dumps(b["input"])})]
                for line in lines:
                    yield line
            for line in _close_block(event, blocks):
                yield line
        else:  # blocks stream in the order the model writes them: a thought, then the text (a thought begun
            # after the text is a block of its own after it); an empty reply has no block, as the whole message has
            # none (Anthropic's own stream then goes from message_start to message_delta)
            blocks = []
            async with contextlib.aclosing(run_choices(state, [c])) as events:
                async for kind, _, payload in events:
                    if kind not in ("reasoning", "delta") or not payload:
                        continue
                    field = "thinking" if kind == "reasoning" else "text"
                    if not blocks or field not in blocks[-1]:
                        for line in _open_block(event, blocks, field):
                            yield line
                    blocks[-1][field] += payload
                    yield event("content_block_delta", index=len(blocks) - 1,
                                delta={"type": field + "_delta", field: payload})
            for line in _close_block(event, blocks):
                yield line
        reason, seq = _stop(c, blocks)
        # the whole usage, as Anthropic's message_delta carries it: the prefix cache is known only now
        yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": seq}, usage=_usage(c, prompt_len))
        yield event("message_stop")
    except Exception as exc:  # headers are sent: report in-band, as Anthropic does
        e = in_band(exc)
        yield f"event: error\ndata: {json.dumps(error_body(e.status, e.message))}\n\n"


def _open_block(event, blocks: list, field: str) -> list[str]:
    """Close the open block (if any), then start a new `field` ("thinking" or "text") block after it."""
    lines = _close_block(event, blocks)
    blocks.append({"type": "thinking", "thinking": "", "signature": ""} if field == "thinking" else
                  {"type": "text", "text": ""})
    return lines + [event("content_block_start", index=len(blocks) - 1, content_block=dict(blocks[-1]))]


def _close_block(event, blocks: list) -> list[str]:
    """The last block's end (a thinking block's empty signature first: nothing here checks one)."""
    if not blocks:
        return []
    k = len(blocks) - 1
    sign = [event("content_block_delta", index=k, delta={"type": "signature_delta", "signature": ""})] \
        if blocks[-1]["type"] == "thinking" else []
    return sign + [event("content_block_stop", index=k)]


__all__ = ["MessagesRequest", "CountTokensRequest", "create_message", "count_tokens", "to_chat", "error_body"]
