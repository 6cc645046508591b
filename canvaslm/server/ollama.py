"""Ollama's API (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`, `/api/tags`, `/api/show`,
`/api/ps`, `/api/version`, and `GET /`'s "Ollama is running"), for the local front-ends and tools built on it
(Open WebUI, Continue, Page Assist, the `ollama` client libraries): point them at this server as their Ollama
host.

Each body is translated to the OpenAI request with the same meaning and runs through the same path:
`/api/chat` is a chat completion (`messages`, `tools`, `format`: "json" or a JSON schema); `/api/generate`
is the chat template around `system` + `prompt` (as Ollama applies the model's template), or with
`raw: true` a plain completion of `prompt` (`format` applies to it too), or with `suffix` insert mode
(server/infill.py); as Ollama's, raw mode refuses `template`, `system` and `context`, and this server
refuses a Go `template` everywhere (it renders the checkpoint's own Jinja template). `options` keep Ollama's
names: `num_predict` (absent, -1 or -2: until EOS or the context is full, as Ollama's), `temperature`, `top_k`,
`top_p`, `min_p`, `seed`, `stop`, `repeat_penalty`, `presence_penalty`, `frequency_penalty`; the ones
with no meaning here (`num_ctx`, `num_gpu`, `num_thread`, `mirostat`, ... and `keep_alive`) are
ignored: the model stays loaded and the context is the server's `max_model_len` (an empty request answers
`done_reason` "load", or "unload" with a zero `keep_alive`, as Ollama's: nothing is unloaded). Values Go reads
leniently are read so: `content: null` is "", an integral float is the integer in an integer option. `think` (true,
or a level "high" / "medium" / "low" / "max": on; false: off; a model with no thought channel refuses it, as
Ollama's refuses a model without the thinking capability) renders the chat template with `enable_thinking`,
and a reply's thought channel (canvaslm.reasoning) comes back as `thinking` (chat: in `message`), streamed
before the answer.
`images` (base64, as Ollama's clients send them) become the chat route's image parts (data URLs): a
message's images go before its text, as Ollama puts them; /api/generate's go into the templated user
message likewise, and with `raw: true` where the prompt holds the image token's text (one per image), or
else one each at the prompt's start (a raw prompt names no image, so they lead it). An image that does
not load is a 400 naming it (`messages[i].images[k]`, `images[k]`); `suffix` takes no images. `/api/show`
lists the `vision` capability when the model has a vision tower.

Replies are Ollama's: streamed by default (`stream` true) as NDJSON, one object per committed canvas
with the new text, then a last one with `done: true`, `done_reason` ("stop" or "length"), the token
counts (`prompt_eval_count`: prompt tokens encoded, the prefix cache's left out; `eval_count`) and the
durations in nanoseconds (prompt: submission to the end of its encoding); a templated /api/generate
reply also carries the deprecated `context` (prompt and reply ids), which a request may send back to go
on from it. An empty /api/embed or /api/embeddings request answers with no vectors (it loads the model, as
Ollama's), and /api/embed's `dimensions` cuts each vector and L2-normalises it again, as Ollama's does. A
model is named by the served name, with or without a `:tag`. Errors are `{"error": message}` with the
status code.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from datetime import datetime, timezone
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..multimodal import ImagePrompt
from .protocol import INT64, ChatCompletionRequest, CompletionRequest
from .serving import (APIError, ServerState, in_band, check_in_vocab, encode_chat, need_chat_template, need_tokenizer,
                      prepare_translated, errors_named, off_loop, run_choices, run_to_end, validated)
from .tools import arguments_object, reply_message, tool_replies

VERSION = "0.12.0"  # the Ollama API version these routes follow (clients check it for features)
RUNNING = "Ollama is running"  # GET / and HEAD /: the liveness answer its clients probe the base URL for


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Options(_Body):
    num_predict: int | None = Field(None, ge=-2, le=INT64)
    temperature: float | None = Field(None, ge=0, le=10)
    top_k: int | None = Field(None, ge=-1, le=INT64)  # -1 or 0: no cut
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-1, le=INT64)
    stop: list[str] | None = Field(None, max_length=16)
    repeat_penalty: float | None = Field(None, ge=0.01, le=100)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    @field_validator("num_predict", "top_k", "seed", mode="before")
    @classmethod
    def _whole(cls, value):
        """A JSON number with no fraction (4.0) is the integer, as Ollama's Go server reads options (a client that
        keeps every number a float sends these); 4.5 is still refused."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


class OllamaMessage(_Body):
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _null_is_empty(cls, value):
        """null is "", as Ollama's Go server reads it (clients send it for an assistant turn of tool calls only)."""
        return "" if value is None else value


class ChatBody(_Body):
    model: str = Field(min_length=1, max_length=256)
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=4096)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    think: bool | str | None = None
    keep_alive: str | int | float | None = None


class GenerateBody(_Body):
    model: str = Field(min_length=1, max_length=256)
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    images: list[str] | None = None
    think: bool | str | None = None
    keep_alive: str | int | float | None = None
    context: list[int] | None = Field(None, max_length=1 << 22,
                                      description="deprecated: the `context` of an earlier reply, to go on from")
    template: str | None = None  # an Ollama Go template: refused (this server renders the checkpoint's own)


class EmbedBody(_Body):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = Field(None, ge=0, le=INT64)  # each vector cut to its first n, re-normalised (0: whole)


class LegacyEmbedBody(_Body):
    model: str = Field(min_length=1, max_length=256)
    prompt: str = ""


class ShowBody(_Body):
    model: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=256)  # older clients' name for it


def served(state: ServerState, model: str) -> str:
    """The served name `model` stands for (Ollama names carry a tag: "name:latest"); a 404 otherwise."""
    for name in (model, model.rsplit(":", 1)[0]):
        if name in state.served_names():
            return name
    raise APIError(404, f"model '{model}' not found; this server serves {state.served_names()}", "model")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# Go's duration units, in nanoseconds
DURATION_UNITS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}
DURATION_PART = r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)"


def _load_reason(keep_alive) -> str:
    """The done_reason of an empty request: "unload" when `keep_alive` is a zero duration (seconds as a number, or a
    Go duration string: "0", "0s", "0m"), as Ollama answers the request that unloads a model; else "load". The
    model stays loaded here either way."""
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        zero = 0 <= keep_alive * 1e9 < 1  # Go keeps whole nanoseconds
    elif isinstance(keep_alive, str):
        text = keep_alive.lstrip("+-")  # a negative duration keeps the model loaded; "-0s" is zero still
        zero = text == "0" or (re.fullmatch(f"(?:{DURATION_PART})+", text) is not None and
                               sum(float(n) * DURATION_UNITS[u] for n, u in re.findall(DURATION_PART, text)) < 1)
    else:
        zero = False
    return "unload" if zero else "load"


THINK_LEVELS = ("high", "medium", "low", "max")  # Ollama's levels: each is thinking on here (no effort scale)


def _check_think(state: ServerState, body, templated: bool = True) -> None:
    """Ollama's refusals of `think`: a value it does not take, thinking without the chat template (`templated`
    false: a raw prompt or an insert), or asked of a model that cannot think (no thought channel tokens:
    /api/show lists no 'thinking'), which would otherwise answer without a thought."""
    if isinstance(body.think, str) and body.think not in THINK_LEVELS:
        raise APIError(400, f"invalid think value: {body.think!r} (must be \"high\", \"medium\", \"low\", "
                            "\"max\", true, or false)", "think")
    if body.think in (None, False):
        return
    if not templated:
        raise APIError(400, "think needs the chat template: send raw: false and no suffix", "think")
    from ..reasoning import ThoughtSplitter

    if ThoughtSplitter.for_tokenizer(state.tokenizer) is None:  # the vocabulary's (--reasoning-parser none still
        # thinks: the thought stays in the text)
        raise APIError(400, f"\"{body.model}\" does not support thinking (its tokenizer has no thought channel "
                            "tokens; /api/show lists no 'thinking' capability)", "think")


def _check_generate(state: ServerState, body: GenerateBody) -> None:
    """What /api/generate cannot do with its body, refused by name rather than dropped: a raw prompt or an insert
    (`suffix`) is sent as is, so there is nothing to put a system message or an earlier context into, and the
    chat template is the checkpoint's own (Jinja): an Ollama Go `template` cannot replace it."""
    if body.raw and (body.template or body.system or body.context):
        given = [k for k in ("template", "system", "context") if getattr(body, k)]
        raise APIError(400, f"raw mode does not support template, system, or context (got {', '.join(given)})",
                       given[0])
    if body.suffix and (body.system or body.context):
        field = "system" if body.system else "context"
        raise APIError(400, f"{field} cannot be combined with suffix (insert mode fills the gap between prompt and "
                            "suffix, with no chat template around them)", field)
    if body.template:
        raise APIError(400, "template: this server renders the checkpoint's own chat template (Jinja) and cannot "
                            "take an Ollama Go template; send none (or raw: true with the prompt already templated)",
                       "template")
    if body.context:
        check_in_vocab(state, body.context, "context", "context token ids")
    _check_think(state, body, templated=not (body.raw or body.suffix))


def _sampling(body, fields: dict) -> dict:
    o = body.options or Options()
    if body.think is not None and "messages" in fields:  # true or a level: on (_check_think took the value)
        fields["chat_template_kwargs"] = {"enable_thinking": body.think is not False}
    fields.update(max_tokens=None if o.num_predict is None or o.num_predict < 0 else o.num_predict or None,
                  temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, min_p=o.min_p,
                  seed=None if o.seed is None or o.seed < 0 else o.seed, repetition_penalty=o.repeat_penalty,
                  presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty)
    fmt = body.format
    if fmt == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise APIError(400, f"format {fmt!r}: expected \"json\" or a JSON schema object", "format")
    return {k: v for k, v in fields.items() if v is not None}


BASE64 = "the base64 image"  # what a load error calls an image (wrapped here into a data URL)


def _image_parts(images: list[str], where: str, places: list) -> list[dict]:
    """Ollama's base64 images -> the chat route's image parts (data URLs); their places are noted."""
    places += [f"{where}[{k}]" for k in range(len(images))]
    return [{"type": "image_url", "image_url": {"url": f"data:image/*;base64,{data}"}} for data in images]


def _without_images(ids: list, vision) -> list:
    """A context's ids without the images shown in them (each expanded image: its begin marker, soft tokens and
    end marker; an image token the reply wrote), as Ollama's context keeps the text only: sent back, it goes
    on without the images."""
    if vision is None or vision.cfg.image_token_id not in ids:
        return ids
    img, boi, eoi = vision.cfg.image_token_id, vision.cfg.boi_token_id, vision.cfg.eoi_token_id
    out, k = [], 0
    while k < len(ids):
        if ids[k] == boi and k + 1 < len(ids) and ids[k + 1] == img:
            k += 1
            while k < len(ids) and ids[k] == img:
                k += 1
            if k < len(ids) and ids[k] == eoi:
                k += 1
        elif ids[k] == img:
            k += 1
        else:
            out.append(ids[k])
            k += 1
    return out


def _keep_images(prompt, ids: list) -> list:
    """`ids` (`prompt` changed: an earlier context before it) with `prompt`'s images, if it has any."""
    return ImagePrompt(ids, prompt.sources) if isinstance(prompt, ImagePrompt) else ids


def _chat_messages(messages: list[OllamaMessage], places: list) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        msg = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["content"] = m.content or None
            msg["tool_calls"] = []
            for k, c in enumerate(m.tool_calls):
                fn = c.get("function") or {}
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(400, f"messages[{i}].tool_calls[{k}]: a call needs function.name", "messages")
                args = fn.get("arguments", {})
                msg["tool_calls"].append({"id": f"call_{i}_{k}", "type": "function", "function": {
                    "name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
        if m.images:  # before the text, as Ollama puts them
            text = [{"type": "text", "text": m.content}] if m.content else []
            msg["content"] = _image_parts(m.images, f"messages[{i}].images", places) + text
        if m.role == "tool":  # Ollama answers a call by the tool's name; chat templates take an id
            msg["tool_call_id"] = m.tool_name or ""
        out.append(msg)
    return out


def ollama_message(message: dict) -> dict:
    """A chat reply message -> Ollama's (tool call arguments as objects)."""
    out = {"role": "assistant", "content": message.get("content") or ""}
    calls = [{"function": {"name": c["function"]["name"], "arguments": arguments_object(c["function"]["arguments"])}}
             for c in message.get("tool_calls") or []]
    if calls:
        out["tool_calls"] = calls
    return out


def _stats(c, prompt_len: int, start: float) -> dict:
    total = time.perf_counter() - start
    return {"total_duration": int(total * 1e9), "load_duration": 0,
            "prompt_eval_count": prompt_len - c.cached_tokens, "prompt_eval_duration": int(c.prompt_seconds * 1e9),
            "eval_count": len(c.tracker.ids), "eval_duration": int(max(c.seconds - c.prompt_seconds, 0) * 1e9)}


# what an error about the translated /v1 body names, in Ollama's terms ("max_tokens=5000 is over it")
ollama_names = errors_named({"max_tokens": "num_predict", "response_format": "format"},
                            in_text=("max_tokens", "response_format"))


@ollama_names
async def chat(state: ServerState, body: ChatBody, request):
    name = served(state, body.model)
    need_chat_template(state, "messages")
    _check_think(state, body)
    if not body.messages:  # Ollama loads the model and answers at once
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": _load_reason(body.keep_alive)}
    places = []
    fields = _sampling(body, {"model": name, "messages": _chat_messages(body.messages, places)})
    if body.tools:
        from .tools import auto_problem

        if auto_problem(state.tokenizer) is not None:  # Ollama has no tool_choice: the model calls in its syntax
            raise APIError(400, f"{name} does not support tools: its tokenizer has no tool-call tokens "
                                "(/api/show lists no 'tools' capability)", "tools")
        fields["tools"] = body.tools
    last = body.messages[-1]
    if last.role == "assistant" and not last.tool_calls:  # a prefill: the reply goes on from it, as Ollama's does
        fields.update(continue_final_message=True, add_generation_prompt=False)
    oa = validated(ChatCompletionRequest, fields, "messages")
    ids = await off_loop(state, encode_chat, state, oa)
    return await _run(state, body, oa, ids, request, chat=True, places=places)


@ollama_names
async def generate(state: ServerState, body: GenerateBody, request):
    name = served(state, body.model)
    need_tokenizer(state, "prompt")
    _check_generate(state, body)
    if not body.prompt and not body.suffix:  # Ollama loads the model and answers at once (an empty suffix is none)
        return {"model": body.model, "created_at": _now(), "response": "", "done": True,
                "done_reason": _load_reason(body.keep_alive)}
    places, images = [], body.images or []
    vision = state.vision
    if body.context and vision is not None and vision.cfg.image_token_id in body.context:
        raise APIError(400, "context holds a turn that showed images, and this deprecated field carries token ids "
                            "only: go on with /api/chat, sending the conversation with its images", "context")
    if images and body.suffix:
        raise APIError(400, "images cannot be combined with suffix (insert mode takes text only)", "images")
    if body.suffix or body.raw:
        fields = _sampling(body, {"model": name, "prompt": body.prompt, "suffix": body.suffix or None})
        if body.suffix and fields.get("response_format"):
            raise APIError(400, "format cannot be combined with suffix (insert mode fills a gap; its text is not "
                                "the whole output a format describes)", "format")
        oa = validated(CompletionRequest, {**fields, "prompt": [0]}, "prompt")  # ids are set below
        prompt, mark = body.prompt, state.image_placeholder
        if images and mark not in prompt:  # a raw prompt that names no image: they lead it
            prompt = mark * len(images) + prompt
        try:
            ids = state.tokenizer.encode(prompt)
        except ValueError as e:
            raise APIError(400, f"prompt: {e}", "prompt") from None
        if body.suffix:
            return await _infill(state, body, oa, ids, request)
        if images:
            ids = ImagePrompt(ids, [p["image_url"]["url"] for p in _image_parts(images, "images", places)])
        return await _run(state, body, oa, _keep_images(ids, list(body.context or ()) + ids), request, chat=False,
                          places=places)
    text = [{"type": "text", "text": body.prompt}] if body.prompt else []
    content = _image_parts(images, "images", places) + text if images else body.prompt
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
        [{"role": "user", "content": content}]
    need_chat_template(state, "prompt")
    oa = validated(ChatCompletionRequest, _sampling(body, {"model": name, "messages": messages}), "prompt")
    ids = await off_loop(state, encode_chat, state, oa, "prompt")
    if body.context:  # Ollama's deprecated conversational memory: this turn goes on from the earlier one
        bos = state.tokenizer.bos_id
        ids = _keep_images(ids, list(body.context) + (ids[1:] if bos is not None and ids[:1] == [bos] else ids))
    return await _run(state, body, oa, ids, request, chat=False, context=True, places=places)


async def _run(state: ServerState, body, oa, ids: list, request, chat: bool, context: bool = False,
               places: list = ()):
    """context: the final line carries Ollama's `context` (the prompt's and the reply's ids: a templated
    /api/generate reply, which a client may send back to go on from it). places: where each image came
    from (load errors name it)."""
    start = time.perf_counter()
    predict = body.options.num_predict if body.options else None
    oa._fill_context = predict is not None and predict < 0  # -1, -2: until EOS or the context is full (absent: the
    # server's default, which is that too unless a flag set one)
    prompts = [ids]
    choices = await prepare_translated(state, oa, prompts, places, BASE64)
    ids = prompts[0]  # images expanded to their soft tokens
    replies = tool_replies(state, oa, choices) if chat else {}
    c = choices[0]
    c.tracker.stops = [s for s in (body.options.stop if body.options else None) or [] if s]

    def line(text: str = "", final: bool = False, thinking: str = "") -> dict:
        """One NDJSON object: new text or thought, or (final) the reply's end: the whole text and thought
        when not streamed."""
        out = {"model": body.model, "created_at": _now()}
        if final and not body.stream:
            text, thinking = c.tracker.text, c.tracker.reasoning
        if chat:
            out["message"] = ollama_message(reply_message(c, replies)) if final and replies else \
                {"role": "assistant", "content": text}
            if thinking:
                out["message"]["thinking"] = thinking
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        out["done"] = final
        if final:
            out.update(done_reason="length" if c.finish_reason == "length" else "stop", **_stats(c, len(ids), start))
            if context:
                out["context"] = _without_images(list(ids) + list(c.tracker.ids), state.vision)
        return out

    async def events():
        try:
            async with contextlib.aclosing(run_choices(state, choices)) as evs:
                async for kind, _, payload in evs:
                    if kind == "reasoning":
                        yield json.dumps(line(thinking=payload), ensure_ascii=False) + "\n"
                    elif kind == "delta" and payload and not replies:  # calls come whole, at the end
                        yield json.dumps(line(payload), ensure_ascii=False) + "\n"
            yield json.dumps(line(final=True), ensure_ascii=False) + "\n"
        except Exception as exc:  # a stream's headers are sent: reported in-band, as Ollama does
            yield json.dumps({"error": in_band(exc).message}) + "\n"

    if body.stream:
        return StreamingResponse(events(), media_type="application/x-ndjson")
    await run_to_end(state, choices, request)  # as the OpenAI routes: a client that leaves cancels it
    return line(final=True)


async def _infill(state: ServerState, body, oa, ids: list, request):
    from .infill import cut_middle, run_infill

    start = time.perf_counter()
    (group,) = await run_infill(state, oa, [ids], request)
    stops = (body.options.stop if body.options else None) or []
    text, word, middle = cut_middle(state.tokenizer, ids, group.middle, stops)
    c = group.candidates[group.best]
    stats = _stats(c, len(ids), start)
    stats["eval_count"] = len(middle)
    done = {"model": body.model, "created_at": _now(), "response": text, "done": True,
            "done_reason": "length" if group.at_limit and not word else "stop", **stats}
    if not body.stream:
        return done
    head = {"model": body.model, "created_at": done["created_at"], "response": text, "done": False}
    lines = [json.dumps(head, ensure_ascii=False) + "\n", json.dumps(dict(done, response=""), ensure_ascii=False) + "\n"]
    return StreamingResponse(iter(lines), media_type="application/x-ndjson")


async def embed(state: ServerState, body: EmbedBody):
    from .embeddings import create_embeddings
    from .protocol import EmbeddingRequest

    name = served(state, body.model)
    if body.dimensions and body.dimensions > state.hidden_size:
        raise APIError(400, f"dimensions={body.dimensions} is over this model's {state.hidden_size} (a vector can only "
                            "be cut shorter)", "dimensions")
    texts = ([body.input] if body.input else []) if isinstance(body.input, str) else body.input
    if not texts:  # as Ollama: an empty request loads the model and answers at once
        return {"model": body.model, "embeddings": []}
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise APIError(400, f"input[{empty[0]}] is empty: every input of a list needs text", "input")
    need_tokenizer(state, "input")
    start = time.perf_counter()
    try:
        prompts = [state.tokenizer.encode(t) for t in texts]
    except ValueError as e:
        raise APIError(400, f"input: {e}", "input") from None
    if body.truncate:  # Ollama's default: an input over the context loses its end (false: an error, as is)
        prompts = [p[:state.max_model_len] for p in prompts]
    out = await create_embeddings(state, EmbeddingRequest(model=name, input=texts), prompts)
    return {"model": body.model, "embeddings": [_shortened(d["embedding"], body.dimensions) for d in out["data"]],
            "total_duration": int((time.perf_counter() - start) * 1e9), "load_duration": 0,
            "prompt_eval_count": sum(len(p) for p in prompts)}


async def embeddings(state: ServerState, body: LegacyEmbedBody) -> dict:
    """The deprecated /api/embeddings: one prompt's vector (an empty prompt loads the model: an empty one)."""
    out = await embed(state, EmbedBody(model=body.model, input=body.prompt))
    return {"embedding": out["embeddings"][0] if out["embeddings"] else []}


def _shortened(vector: list[float], dimensions: int | None) -> list[float]:
    """Ollama's `dimensions`: the vector's first n values, L2-normalised again (as its server does, whether or
    not the model was trained for shorter vectors; /v1/embeddings refuses a cut it was not trained for)."""
    if not dimensions or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = max(math.sqrt(sum(x * x for x in head)), 1e-12)
    return [x / norm for x in head]


def _details(state: ServerState) -> dict:
    """/api/tags' and /api/show's `details`: the weights' count as unquantised (packed int4 counts two a
    byte) and `quantization_level`: "INT4" (canvaslm's group-wise int4) or "FP8" (e4m3) for quantised
    weights, else the model dtype ("BF16", "FLOAT32", ...)."""
    from ..quant import parameter_count
    from ..quant_io import INT4_METHOD, quantization_config

    model = state.engine.runner.model
    params = parameter_count(model)
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    qc = quantization_config(model)
    if qc is not None:
        dtype = "INT4" if qc["quant_method"] == INT4_METHOD else "FP8"
    else:
        dtype = str(model.embed_weight.dtype).removeprefix("torch.").upper().replace("BFLOAT16", "BF16")
    return {"parent_model": "", "format": "safetensors", "family": "diffusion_gemma", "families": ["diffusion_gemma"],
            "parameter_size": size, "quantization_level": dtype}


def tags(state: ServerState) -> dict:
    created = datetime.fromtimestamp(state.created, timezone.utc).isoformat().replace("+00:00", "Z")
    details = _details(state)
    return {"models": [{"name": f"{n}:latest", "model": f"{n}:latest", "modified_at": created, "size": 0,
                        "digest": "", "details": details} for n in state.served_names()]}


def show(state: ServerState, body: ShowBody) -> dict:
    if not (body.model or body.name):
        raise APIError(400, "model is required", "model")
    name = served(state, body.model or body.name)
    template = getattr(state.tokenizer, "chat_template", None) or ""
    caps = ["completion", "insert", "embedding"]
    from .tools import auto_problem

    if template and auto_problem(state.tokenizer) is None:
        caps.append("tools")
    if template and state.thoughts is not None:  # Open WebUI offers its think toggle for these
        caps.append("thinking")
    if state.vision is not None and state.vision.available:  # a vision tower and its weights: clients offer
        caps.append("vision")  # image upload for these
    d = state.defaults
    return {"modelfile": f"FROM {name}\n", "template": template if isinstance(template, str) else "",
            "parameters": f"temperature {d.t_max}\nnum_predict {-1 if state.fill_context else d.max_new_tokens}",
            "details": _details(state), "capabilities": caps,
            "model_info": {"general.architecture": "diffusion_gemma", "diffusion_gemma.context_length": state.max_model_len,
                           "diffusion_gemma.canvas_length": state.canvas_length,
                           "diffusion_gemma.embedding_length": state.hidden_size}}


def ps(state: ServerState) -> dict:
    return {"models": [dict(m, size_vram=0, expires_at="0001-01-01T00:00:00Z") for m in tags(state)["models"]]}


__all__ = ["ChatBody", "GenerateBody", "EmbedBody", "LegacyEmbedBody", "ShowBody", "chat", "generate", "embed",
           "embeddings", "tags", "show", "ps", "served", "ollama_message", "VERSION", "RUNNING"]
