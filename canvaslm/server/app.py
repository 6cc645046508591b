"""The FastAPI app: OpenAI-compatible routes, SSE streaming with optional draft events, errors, auth.

Routes: POST /v1/completions, POST /v1/chat/completions, POST /v1/responses (server/responses.py), Anthropic's
POST /v1/messages and /v1/messages/count_tokens (server/anthropic.py),
POST /tokenize, POST /detokenize, GET /v1/models, GET /health, GET /metrics, and llama-server's native
POST /completion and POST /infill (server/llamacpp.py: editor plugins such as llama.vim and llama.vscode),
Ollama's /api/chat, /api/generate, /api/embed, /api/tags, /api/show, /api/ps, /api/version and its liveness answer
at GET / (server/ollama.py),
plus FastAPI's /openapi.json. Every client mistake is a 4xx with an OpenAI-style body
{"error": {"message", "type", "param", "code"}}; only engine failures are 5xx. With an API key, every
route but /health needs `Authorization: Bearer <key>`.

Stream format (text/event-stream): `data: <chunk JSON>` per committed canvas; with stream_drafts, draft
chunks in between, shaped like ordinary chunks with empty text/delta plus a top-level
`"draft": {"index", "canvas_index", "denoise_step", "text"}` (the argmax text of the canvas being
denoised), so any OpenAI client still parses them; the last chunk of a choice has its finish_reason;
with stream_options.include_usage a final chunk with empty choices carries usage (with
continuous_usage_stats, vLLM's, every chunk also carries the usage so far); then `data: [DONE]`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import ollama
from .anthropic import CountTokensRequest, MessagesRequest
from .llamacpp import LlamaCompletionRequest, LlamaInfillRequest
from .metrics import render_metrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, ErrorResponse,
                       LoadLoRARequest, ResponsesRequest, TokenizeRequest, UnloadLoRARequest)
from .serving import (APIError, ServerState, in_band, check_in_vocab, encode_chat, image_prompt, load_images,
                      need_tokenizer, off_loop, prepare_off_loop, run_choices, run_to_end, usage, validation_message)
from .tools import tool_replies

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 500, 503)}


def _error(status: int, message: str, param=None, type="invalid_request_error", code=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, param, type, code).body(), status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    if not errs:
        return _error(400, "invalid request body")
    if errs[0].get("type") == "json_invalid":
        return _error(400, f"the body is not valid JSON: {errs[0].get('msg')}", code="invalid_json")
    message, param, code = validation_message(errs, getattr(exc, "body", None))
    return _error(400, message, param, code=code)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="CanvasLM", version="0.1.0",
                  description="OpenAI-compatible server for block-diffusion language models")
    app.state.canvas = state

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):
        return _in_dialect(request, _validation_error(exc))

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return _in_dialect(request, JSONResponse(exc.body(), status_code=exc.status))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's, e.g. bad UTF-8
            return _in_dialect(request, _error(400, "the body is not valid JSON: it must be UTF-8 text",
                                               code="invalid_json"))
        response = _in_dialect(request, _error(exc.status_code, str(exc.detail),
                                               type="invalid_request_error" if exc.status_code < 500 else "server_error"))
        response.headers.update(getattr(exc, "headers", None) or {})  # a 405's Allow (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def on_bug(request, exc):
        return _in_dialect(request, _error(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    app.add_middleware(_BodyChecks, state=state)  # inside the key check: a 401 comes first
    app.add_middleware(_ApiKeyCheck, state=state)
    app.add_middleware(_BodiesAreJson)

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return _error(503, "the engine thread is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        from .. import __version__

        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        body, content_type = render_metrics(state.engine)
        return PlainTextResponse(body, media_type=content_type)

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize(body: TokenizeRequest):
        """Token ids of a prompt exactly as the completion routes encode it (vLLM's route); messages with
        images give the expanded ids (each image's soft tokens), the images loaded as a request loads them.
        Encoding and the reply's JSON run in worker threads: a document of megabytes takes seconds, and
        the event loop keeps every stream and /health answering meanwhile."""
        tok = _tokenizer_for(state, body.model, "prompt" if body.messages is None else "messages")
        chat, text_ids = await off_loop(state, _tokenize, state, tok, body)
        if chat is not None and chat.image_parts():
            prompts = [image_prompt(text_ids, chat)]
            await off_loop(state, load_images, state, chat, prompts, True, prompts=prompts)  # counted: no tower
            text_ids = list(prompts[0])
        return await off_loop(state, _tokenize_reply, state, tok, text_ids, body.return_token_strs, body.with_pieces)

    @app.post("/detokenize", responses=ERRORS)
    async def detokenize(body: DetokenizeRequest):
        """The text of token ids: `prompt` as vLLM names it, and `content` as llama-server's /detokenize does
        (decoded and written out in a worker thread, as /tokenize)."""
        tok = _tokenizer_for(state, body.model, "tokens")
        return await off_loop(state, _detokenize_reply, state, tok, body.tokens)

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [_model_card(state, name) for name in state.served_names()]}

    @app.get("/v1/models/{model:path}", responses=ERRORS)  # repo ids hold a "/"
    async def model(model: str):
        state.adapter(model)  # a 404 unless served
        return _model_card(state, model)

    if state.lora_updates:  # vLLM's runtime adapter routes; off unless asked (they read server-side paths)
        @app.post("/v1/load_lora_adapter", responses=ERRORS, response_class=PlainTextResponse)
        async def load_lora(body: LoadLoRARequest):
            from .lora import load_adapter

            await load_adapter(state, body.lora_name, body.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", responses=ERRORS, response_class=PlainTextResponse)
        async def unload_lora(body: UnloadLoRARequest):
            from .lora import unload_adapter

            await unload_adapter(state, body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/embeddings", responses=ERRORS)
    async def embeddings(body: EmbeddingRequest):
        from .embeddings import create_embeddings

        return await create_embeddings(state, body, await off_loop(state, _completion_prompts, state, body.input,
                                                                          "input"))

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        prompts = await off_loop(state, _completion_prompts, state, body.prompt)  # a long prompt: not on the loop
        if body.suffix:
            return await _respond_infill(state, body, prompts, request)
        if (body.scored() and not body.stream) or body.ranked():  # streamed logprobs ride on the chunks
            from .scored import complete_best_of, complete_scored

            run = complete_best_of if body.ranked() else complete_scored
            result = {"created": int(time.time()), **await run(state, body, prompts, request)}
            return await _with_prompt_logprobs(state, body, prompts, result, chat=False)
        return await _respond(state, body, prompts, request, chat=False)

    @app.post("/completion", responses=ERRORS)
    async def llama_completion(body: LlamaCompletionRequest, request: Request):
        """llama-server's native completion route (server/llamacpp.py)."""
        from .llamacpp import completion

        return await completion(state, body, request)

    @app.get("/props")
    async def llama_props():
        """llama-server's properties: the served context (n_ctx), slots, chat template."""
        from .llamacpp import props

        return props(state)

    @app.post("/infill", responses=ERRORS)
    async def llama_infill(body: LlamaInfillRequest, request: Request):
        """llama-server's code-infill route, as llama.vim and llama.vscode call it (server/llamacpp.py)."""
        from .llamacpp import infill

        return await infill(state, body, request)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _respond(state, body, [await off_loop(state, encode_chat, state, body)], request, chat=True)

    if state.allowed_origins:  # added last, so outermost: it answers preflights before the key check
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(state.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.post("/v1/messages", responses=ERRORS)
    async def messages(body: MessagesRequest, request: Request):
        """Anthropic's Messages API, served through the chat machinery (server/anthropic.py)."""
        from .anthropic import create_message

        return await create_message(state, body, request)

    @app.post("/v1/messages/count_tokens", responses=ERRORS)
    async def messages_count_tokens(body: CountTokensRequest):
        from .anthropic import count_tokens

        return await count_tokens(state, body)

    @app.post("/api/chat", responses=ERRORS)
    async def ollama_chat(body: ollama.ChatBody, request: Request):
        """Ollama's chat route (server/ollama.py)."""
        return await ollama.chat(state, body, request)

    @app.post("/api/generate", responses=ERRORS)
    async def ollama_generate(body: ollama.GenerateBody, request: Request):
        return await ollama.generate(state, body, request)

    @app.post("/api/embed", responses=ERRORS)
    async def ollama_embed(body: ollama.EmbedBody):
        return await ollama.embed(state, body)

    @app.post("/api/embeddings", responses=ERRORS)
    async def ollama_embeddings(body: ollama.LegacyEmbedBody):
        return await ollama.embeddings(state, body)

    @app.get("/", response_class=PlainTextResponse)
    async def ollama_running():
        """Ollama's liveness answer: its clients (the `ollama` CLI, Page Assist) probe the base URL first."""
        return ollama.RUNNING

    # HEAD too, kept out of the OpenAPI schema (one function under two methods gave a duplicate operation id)
    app.add_api_route("/", ollama_running, methods=["HEAD"], response_class=PlainTextResponse,
                      include_in_schema=False)

    @app.get("/api/tags")
    async def ollama_tags():
        return ollama.tags(state)

    @app.get("/api/ps")
    async def ollama_ps():
        return ollama.ps(state)

    @app.post("/api/show", responses=ERRORS)
    async def ollama_show(body: ollama.ShowBody):
        return ollama.show(state, body)

    @app.get("/api/version")
    async def ollama_version():
        return {"version": ollama.VERSION}

    @app.post("/v1/responses", responses=ERRORS)
    async def responses(body: ResponsesRequest, request: Request):
        """OpenAI's Responses API, served through the chat machinery (server/responses.py)."""
        from .responses import create_response

        return await create_response(state, body, request)

    @app.get("/v1/responses/{response_id}", responses=ERRORS)
    async def get_response(response_id: str):
        from .responses import stored

        return stored(state, response_id)["response"]

    @app.delete("/v1/responses/{response_id}", responses=ERRORS)
    async def delete_response(response_id: str):
        from .responses import stored

        stored(state, response_id)
        del state.response_store[response_id]
        return {"id": response_id, "object": "response", "deleted": True}

    return app


class _ApiKeyCheck:
    """--api-key: a 401 for requests without the key (not /health). Plain ASGI: Starlette's
    `@app.middleware("http")` kind hides a client's disconnect from `request.is_disconnected()`, and a
    non-streamed request whose client left would run to its end."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        key = self.state.api_key
        if scope["type"] == "http" and key and scope["path"] != "/health":
            request = Request(scope)
            header = request.headers.get("authorization", "")
            other = request.headers.get("x-api-key", "")  # Anthropic's clients send the key here
            # compared in constant time, so response timing does not leak how much of a guess was right
            if not (hmac.compare_digest(header.encode(), f"Bearer {key}".encode())
                    | hmac.compare_digest(other.encode(), key.encode())):
                response = _in_dialect(request, _error(401, "missing or wrong API key: send 'Authorization: Bearer "
                                                            "<key>' (or 'x-api-key: <key>')",
                                                       type="authentication_error", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(value, path: str = "") -> str | None:
    """The place (`messages[0].content`) of a string in parsed JSON that holds a lone UTF-16 surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key) is not None:
            return f"{path}.{key!r}" if path else repr(key)
        where = _lone_surrogate(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if where is not None:
            return where
    return None


class _BodyChecks:
    """Reads a POST body whole, as the route would, and answers before the route when it cannot be served:

    * a body over --max-request-bytes (state.max_request_bytes) gets a 413 naming the limit, as soon as its
      Content-Length or the bytes received pass it (FastAPI reads the whole body and parses its JSON on the event
      loop: an unbounded body would stall every other request and hold its size in memory);
    * a JSON body may spell a lone UTF-16 surrogate (`"\\ud800"`), which Python's json reads into a str that is
      no text: it cannot be tokenised or sent back (a Responses body's `metadata` is echoed: that was a 500 after
      the generation ran). A 400 names the field. Only bodies that spell a surrogate escape at all are parsed."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.state.max_request_bytes
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if limit and declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, receive, send, limit)
        chunks, first, size = [], None, 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                first = message
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit and size > limit:  # chunked, or a Content-Length that understated it
                return await self._too_large(scope, receive, send, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if first is None and _SURROGATE_ESCAPE.search(body):
            try:
                where = _lone_surrogate(json.loads(body))
            except ValueError:  # not JSON: the route says so
                where = None
            if where is not None:
                response = _in_dialect(Request(scope), _error(400, f"{where}: holds a lone UTF-16 surrogate "
                                                                   "(a \\ud800-\\udfff escape not in a pair), which is "
                                                                   "not text", where))
                return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first or {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope, receive, send, limit: int) -> None:
        response = _in_dialect(Request(scope), _error(
            413, f"the request body is over the server's limit of {limit} bytes ({limit / (1 << 20):g} MiB, "
                 "--max-request-bytes)", type="invalid_request_error", code="request_too_large"))
        response.headers["connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


class _BodiesAreJson:
    """Every route takes a JSON body, whatever its Content-Type says: `curl -d '{...}'` sends
    application/x-www-form-urlencoded, and Ollama's and llama-server's own examples (which those servers take)
    send no JSON header. A body that is not JSON is still a 400 saying so."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            kind = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if b"json" not in kind and not kind.startswith(b"multipart/"):
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def _in_dialect(request, response: JSONResponse) -> JSONResponse:
    """An error response in the body the route's clients parse: Anthropic's on /v1/messages, Ollama's on
    /api/..., else OpenAI's."""
    path = request.url.path
    if not path.startswith(("/v1/messages", "/api/")):
        return response
    message = json.loads(response.body)["error"]["message"]
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=response.status_code)
    from .anthropic import error_body

    return JSONResponse(error_body(response.status_code, message), status_code=response.status_code)


def _tokenize(state: ServerState, tok, body: TokenizeRequest) -> tuple:
    """(the chat body or None, the text's token ids) of a /tokenize request; 400s name the field."""
    if body.content is not None or body.add_special is not None:  # llama-server's names
        if body.prompt is not None or body.messages is not None:
            theirs = "content" if body.content is not None else "add_special"
            ours = "prompt" if body.prompt is not None else "messages"
            raise APIError(400, f"{theirs} (llama-server's body) was sent with {ours}: send content with "
                                "add_special, or prompt / messages with add_special_tokens", theirs)
        body = body.model_copy(update={"prompt": body.content, "add_special_tokens": bool(body.add_special)})
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send one of prompt (text) or messages (chat)", "prompt")
    if body.messages is None:
        try:
            return None, tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as e:
            raise APIError(400, f"prompt: {e}", "prompt") from None
    try:
        chat = ChatCompletionRequest(model=state.model_name, messages=body.messages, tools=body.tools,
                                     add_generation_prompt=body.add_generation_prompt,
                                     continue_final_message=body.continue_final_message,
                                     chat_template_kwargs=body.chat_template_kwargs,
                                     mm_processor_kwargs=body.mm_processor_kwargs)
        problem = chat.unsupported()
        if problem is not None and problem[0] == "chat_template_kwargs":
            raise APIError(400, problem[1], problem[0])
        return chat, tok.encode_chat(chat.message_dicts(state.image_placeholder), tools=chat.tool_dicts(),
                                     **chat.template_kwargs())
    except ValueError as e:
        raise APIError(400, f"messages: {e}", "messages") from None


def _tokenize_reply(state: ServerState, tok, text_ids: list, token_strs: bool, pieces: bool = False) -> JSONResponse:
    """/tokenize's reply, its JSON written here (in the caller's worker thread, not on the event loop).
    pieces: llama-server's `with_pieces`, each token as {id, piece}."""
    tokens = [{"id": i, "piece": token_piece(tok, i)} for i in text_ids] if pieces else text_ids
    out = {"tokens": tokens, "count": len(text_ids), "max_model_len": state.max_model_len}
    if token_strs:
        out["token_strs"] = [tok.id_to_token(i) for i in text_ids]
    return JSONResponse(out)


def token_piece(tok, token_id: int):
    """One token's text as llama-server's `with_pieces` gives it: the decoded string, or the list of its bytes
    when they are not valid UTF-8 on their own (a byte token `<0xE2>` -> [226])."""
    raw = tok.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _detokenize_reply(state: ServerState, tok, tokens: list) -> JSONResponse:
    check_in_vocab(state, tokens, "tokens", "token ids")
    text = tok.decode(tokens, skip_special_tokens=False)
    return JSONResponse({"prompt": text, "content": text})


def _tokenizer_for(state: ServerState, model: str | None, param: str):
    if model is not None:
        state.adapter(model)  # a 404 unless served
    if state.tokenizer is None:
        raise APIError(400, "this checkpoint has no tokenizer.json", param)
    if param == "messages" and getattr(state.tokenizer, "chat_template", None) is None:
        raise APIError(400, "this checkpoint has no chat template", param)
    return state.tokenizer


def _model_card(state: ServerState, name: str) -> dict:
    """The base model's card, or a LoRA adapter's (vLLM's fields: `parent` the base, `root` its directory).
    The context is under vLLM's name `max_model_len` and the `context_length` other clients read."""
    card = {"id": name, "object": "model", "created": state.created, "owned_by": "canvaslm",
            "max_model_len": state.max_model_len, "context_length": state.max_model_len,
            "canvas_length": state.canvas_length}
    if name in state.loras:
        card.update(parent=state.model_name, root=str(state.loras[name][1]))
    return card


def _completion_prompts(state: ServerState, prompt, field: str = "prompt") -> list[list[int]]:
    """A prompt field (a text, a token id list, or a list of either) -> token id lists; 400s name `field`."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, f"{field} is empty", field)
    out = []
    for p in prompt:
        if isinstance(p, str):
            if state.tokenizer is None:
                raise APIError(400, f"this checkpoint has no tokenizer.json: send the {field} as token ids", field)
            try:
                out.append(state.tokenizer.encode(p))
            except ValueError as e:
                raise APIError(400, f"{field}: {e}", field) from None
        else:
            out.append(list(p))
    return out


def _usage_mode(body):
    """stream_options: False (no usage), True (on a last chunk) or "continuous" (on every chunk too)."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return "continuous" if include_usage and body.stream_options.continuous_usage_stats else include_usage


async def _respond_infill(state: ServerState, body, prompts, request: Request):
    from .infill import complete_infill, stream_events

    result = await complete_infill(state, body, prompts, request)
    rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
    if body.stream:
        include_usage = _usage_mode(body)
        return StreamingResponse(stream_events(result, rid, created, state.reply_name(body.model), include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return {"id": rid, "object": "text_completion", "created": created, "model": state.reply_name(body.model), **result}


async def _respond(state: ServerState, body, prompts, request: Request, chat: bool):
    # in a worker thread: a constraint can take seconds to compile (a JSON schema's slot automata over a
    # large vocabulary), and the event loop keeps every other stream flowing meanwhile
    choices = await prepare_off_loop(state, body, prompts)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    replies = tool_replies(state, body, choices) if chat else {}  # choice index -> ToolReply
    if body.stream:
        include_usage = _usage_mode(body)
        top = ((body.top_logprobs or 0) if body.logprobs else None) if chat else body.logprobs
        echo = None  # the prompts' texts, sent first, then the completion's
        if not chat and body.echo:
            from .scored import echo_texts

            need_tokenizer(state, "echo")
            echo = echo_texts(state, body, prompts)
        gen = _stream(state, choices, prompts, rid, created, state.reply_name(body.model), chat, include_usage,
                      replies, top, echo, thoughts=chat and body.include_reasoning,
                      skip_special=body.skip_special_tokens)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await run_to_end(state, choices, request)  # the trackers accumulate the text
    if replies:
        out = [{"index": c.index, "message": replies[c.index].message(c.tracker),
                "finish_reason": replies[c.index].finish_reason(c.finish_reason, c.tracker),
                "logprobs": None}
               for c in choices]
        obj = "chat.completion"
    elif chat:
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.tracker.text},
                "finish_reason": c.finish_reason, "logprobs": None} for c in choices]
        obj = "chat.completion"
    else:
        out = [{"index": c.index, "text": c.tracker.text, "finish_reason": c.finish_reason, "logprobs": None}
               for c in choices]
        obj = "text_completion"
    for c, o in zip(choices, out):
        if chat and c.tracker.reasoning and body.include_reasoning:  # vLLM's names, old and new
            o["message"] = {**o["message"], "reasoning_content": c.tracker.reasoning, "reasoning": c.tracker.reasoning}
    if chat and body.logprobs:  # a tool reply's too: the log-probs of the tokens it was read from
        from .scored import chat_logprobs_many

        need_tokenizer(state, "logprobs")
        scored = await chat_logprobs_many(state, body.model, [(prompts[c.prompt_index], c.tracker.ids)
                                                              for c in choices], body.top_logprobs or 0)
        for o, lp in zip(out, scored):
            o["logprobs"] = lp
    result = {"id": rid, "object": obj, "created": created, "model": state.reply_name(body.model), "choices": out,
              "usage": usage(choices, prompts)}
    return await _with_prompt_logprobs(state, body, prompts, result, chat)


async def _with_prompt_logprobs(state: ServerState, body, prompts, result: dict, chat: bool) -> dict:
    """vLLM's `prompt_logprobs` (server/scored.py): on the response for chat (one prompt), on each choice (from
    its prompt: n choices per prompt, in order) for completions."""
    if body.prompt_logprobs is None:
        return result
    from .scored import prompt_logprobs

    scored = await prompt_logprobs(state, body.model, prompts, body.prompt_logprobs)
    if chat:
        result["prompt_logprobs"] = scored[0]
    else:
        for choice in result["choices"]:
            choice["prompt_logprobs"] = scored[choice["index"] // body.n]
    return result


async def _stream(state: ServerState, choices, prompts, rid, created, model, chat, include_usage, replies,
                  top_logprobs: int | None = None, echo: list[str] | None = None, thoughts: bool = True,
                  skip_special: bool = True):
    """top_logprobs: `logprobs` (chat's, or completions' legacy object) with this many alternatives on the
    chunks, None for none: each chunk a commit produces carries the log-probs of the tokens committed
    since the last one that did. echo: each prompt's text (scored.echo_texts), sent before its completion."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    texts = {c.index: "" for c in choices}  # streamed text so far (tool replies read it whole)
    by_index = {c.index: c for c in choices}
    scored = {c.index: 0 for c in choices}  # log-prob entries already sent, per choice
    passes = {c.index: 0 for c in choices}  # decoder passes shown so far (continuous usage), per choice

    def running_usage() -> dict:
        """The usage so far: a running request's passes read from the engine, each choice's count never
        shown lower than before (its request leaves the engine a moment before its Finish is counted)."""
        for c in choices:
            live = state.engine.runner.decoder_passes(c.request.request_id) if c.finish_reason is None else 0
            passes[c.index] = max(passes[c.index], c.decoder_passes + live)
        return usage(choices, prompts, sum(passes.values()))

    async def new_logprobs(i) -> dict | None:
        if top_logprobs is None:
            return None
        from .scored import chat_logprobs, completion_logprobs

        c = by_index[i]
        if not chat:  # legacy: parallel lists, offsets into the whole completion's text
            full = await completion_logprobs(state, model, prompts[c.prompt_index], c.tracker.ids, top_logprobs,
                                             skip_special)
            new, scored[i] = {k: v[scored[i]:] for k, v in full.items()}, len(full["tokens"])
            return new if new["tokens"] else None
        full = await chat_logprobs(state, model, prompts[c.prompt_index], c.tracker.ids, top_logprobs)
        new, scored[i] = full["content"][scored[i]:], len(full["content"])
        return {"content": new, "refusal": None} if new else None  # null on a chunk with no new token

    def chunk(i=None, text=None, finish=None, draft=None, role=False, delta=None, logprobs=None) -> str:
        if delta is not None or (i in replies and text is None):  # a tool reply's delta
            tracker = by_index[i].tracker
            reason = replies[i].finish_reason(finish, tracker) if finish else None
            ch = {"index": i, "delta": delta or {}, "finish_reason": reason, "logprobs": logprobs}
        elif chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            ch = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            ch = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        data = {"id": rid, "object": obj, "created": created, "model": model, "choices": [ch]}
        if include_usage:  # null on the chunks, the totals on a last one; or the running totals on each
            data["usage"] = running_usage() if include_usage == "continuous" else None
        if draft is not None:
            data["draft"] = draft
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        if chat:
            for c in choices:
                yield chunk(c.index, delta=replies[c.index].first_delta()) if replies else chunk(c.index, "", role=True)
        elif echo is not None:
            for c in choices:
                yield chunk(c.index, echo[c.prompt_index])
        async with contextlib.aclosing(run_choices(state, choices)) as events:  # closing it cancels
            async for kind, i, payload in events:
                if kind == "delta" and replies:
                    texts[i] += payload
                    lp = await new_logprobs(i)
                    for d in replies[i].deltas(texts[i], by_index[i].tracker):
                        yield chunk(i, delta=d, logprobs=lp)
                        lp = None
                    if lp is not None:
                        yield chunk(i, delta={}, logprobs=lp)
                elif kind == "reasoning":  # a chat reply's thought channel (reasoning.py), vLLM's names
                    if thoughts:
                        yield chunk(i, delta={"reasoning_content": payload, "reasoning": payload})
                elif kind == "delta":
                    yield chunk(i, payload, logprobs=await new_logprobs(i))
                elif kind == "draft":
                    yield chunk(i, None if chat else "", draft=payload)
                else:
                    lp = await new_logprobs(i)
                    for d in replies[i].final_deltas(by_index[i].tracker) if replies else ():
                        yield chunk(i, delta=d, logprobs=lp)
                        lp = None
                    yield chunk(i, None if chat else "", finish=payload, logprobs=lp)
        if include_usage:
            data = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                    "usage": usage(choices, prompts)}
            yield f"data: {json.dumps(data)}\n\n"
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        yield f"data: {json.dumps(in_band(exc).body())}\n\n"
    yield "data: [DONE]\n\n"
