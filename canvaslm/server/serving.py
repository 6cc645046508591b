"""From a validated OpenAI request to engine requests, and from engine events back to choices.

`prepare` resolves sampling parameters (exactly as `LLM.generate` does for the same SamplingParams, so
outputs match for the same seed), checks the context and builds one `GenerationRequest` per choice.
`run_choices` consumes the engine's events for all choices of one HTTP request and yields plain
tuples -- ("delta", i, text), ("draft", i, dict), ("finish", i, reason) -- that the streaming and the
non-streaming paths format; both go through the same `TextTracker`, so streamed text always equals
non-streamed text. Leaving the generator early (client gone) cancels every unfinished choice.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import math
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import ConfigError, DiffusionParams
from ..engine.engine import Commit, Draft, Engine, EngineClosed, Finish, GenerationRequest
from ..generate import GenerationError
from ..llm import SamplingParams
from ..multimodal import ImageError, ImagePrompt, image_spans
from ..sampling import logit_bias
from ..sampling.schedules import GREEDY_TEMPERATURE  # temperature=0 scales the schedule by this
from ..sampling.thinking import (ThinkingBudget, answer_need, answer_room, answer_seed, answer_time, closed_thought,
                                 thought_reserve, thought_room)
from .protocol import _Common
from .tools import auto_problem, auto_tools, chosen_tools, forced_tool
from .vllm_compat import MAX_REQUEST_BYTES

DISCONNECT_CHECK_S = 1.0  # how often a non-streamed request looks whether its client is still there


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def in_band(e: Exception) -> APIError:
    """What a stream whose headers are sent reports in-band before it ends (its [DONE] or the dialect's
    last line): an APIError as it is; anything else as the 500 a request that did not stream would get
    (app's handler), logged with its traceback, so no stream is cut off without a word."""
    if isinstance(e, APIError):
        return e
    logging.getLogger("canvaslm.server").error("a stream failed", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def closed_error(e: EngineClosed) -> APIError:
    """The 503 for work an engine that is shut down (or whose thread stopped) will not run, as a generation
    it refuses gets; a stream reports it in-band, then [DONE]."""
    return APIError(503, e.reason, type="server_error")


def engine_future(engine: Engine, fn) -> concurrent.futures.Future:
    """`engine.call(fn)` for a route: EngineClosed (at once, or on a call the engine dropped unrun at its
    end) becomes `closed_error`'s 503 instead of a 500. Cancelling the returned future (its awaiting task
    was cancelled) cancels the call where it has not started."""
    try:
        call = engine.call(fn)
    except EngineClosed as e:
        raise closed_error(e) from None
    out: concurrent.futures.Future = concurrent.futures.Future()

    def relay(done: concurrent.futures.Future) -> None:  # on the engine thread
        if done.cancelled():
            out.cancel()
            return
        e = done.exception()
        try:
            if e is None:
                out.set_result(done.result())
            else:
                out.set_exception(closed_error(e) if isinstance(e, EngineClosed) else e)
        except concurrent.futures.InvalidStateError:  # the caller cancelled it meanwhile
            pass

    call.add_done_callback(relay)
    out.add_done_callback(lambda f: f.cancelled() and call.cancel())
    return out


@dataclass
class ServerState:
    engine: Engine
    tokenizer: object  # canvaslm.tokenizer.Tokenizer
    model_name: str
    defaults: DiffusionParams
    eos_ids: tuple[int, ...]
    vocab_size: int  # ids requests may name: [0, vocab_size) (a padded embedding's extra rows excluded)
    canvas_length: int
    max_model_len: int
    api_key: str | None = None
    created: int = 0
    max_denoising_steps: int = 1024  # per-request cap on the max_denoising_steps extension
    regex_timeout: float = 10.0  # seconds a guided_regex may take to compile (sampling.regex_fsm)
    allowed_origins: tuple[str, ...] = ()  # CORS: browser origins that may call the API ("*": any)
    max_request_bytes: int | None = MAX_REQUEST_BYTES  # larger request bodies get a 413 (None: any size)
    response_store: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # /v1/responses
    loras: dict = field(default_factory=dict)  # served LoRA adapters: model name -> (adapter id, directory)
    lora_updates: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter are served
    hidden_size: int = 0  # the width of /v1/embeddings vectors
    embedding_pooling: str = "mean"  # /v1/embeddings: "mean" over the input's tokens or its "last" token's
    aliases: tuple[str, ...] = ()  # more names of the base model (vLLM's --served-model-name A B ...)
    reasoning: bool = True  # read chat replies' thought channels where the tokenizer has them
    thinking_token_budget: int | None = None  # requests that set none get this one (--reasoning-budget)
    fill_context: bool = True  # an unconstrained output without max_tokens runs until EOS or the context is full
    # (vLLM's default for DiffusionGemma, Ollama's, llama-server's); False: defaults.max_new_tokens (set by flag)
    vision: object | None = None  # multimodal.Vision: image prompts (None: a model served without one)
    media_pool: object = None  # ThreadPoolExecutor for work that loads images (off_loop), made on first use
    compile_pool: object = None  # ThreadPoolExecutor for requests that compile a constraint (off_loop)

    def shutdown(self) -> None:
        """Stop the engine and the media and compile pools (work under way ends at its deadline, unread)."""
        self.engine.shutdown()
        for pool in (self.media_pool, self.compile_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    @property
    def image_placeholder(self) -> str:
        """The text a chat template gets for each image part (the image token's string)."""
        from ..multimodal import image_token_text

        return image_token_text(self.tokenizer, self.vision.cfg) if self.vision is not None else "<|image|>"

    @property
    def thoughts(self):
        """The ThoughtSplitter chat replies go through (None: no thought channel in this vocabulary, or
        --reasoning-parser none)."""
        from ..reasoning import ThoughtSplitter

        return ThoughtSplitter.for_tokenizer(self.tokenizer) if self.reasoning else None

    def served_names(self) -> list:
        return [self.model_name, *self.aliases, *self.loras]

    def reply_name(self, model: str) -> str:
        """The `model` an OpenAI-route reply names: the first served name for any alias of the base model
        (vLLM's rule), else the adapter asked for."""
        return self.model_name if model in self.aliases else model

    def adapter(self, model: str) -> int:
        """The adapter id a request's `model` names (0: the base model); a 404 naming it if not served."""
        if model == self.model_name or model in self.aliases:
            return 0
        if model in self.loras:
            return self.loras[model][0]
        raise APIError(404, f"model {model!r} does not exist; this server serves {self.served_names()}", "model",
                       code="model_not_found")

    def engine_call(self, model: str, fn) -> concurrent.futures.Future:
        """Run fn(model) on the engine thread (scoring) with the request's adapter on every row; a 503 once
        the engine takes no more work (`engine_future`)."""
        from ..lora_serving import with_adapter

        adapter = self.adapter(model)
        return engine_future(self.engine, lambda m: with_adapter(m, adapter, fn))


def score_later(state: ServerState, model_name: str, prompt_ids: list, conts: list):
    """A future of `scoring.score_continuations` run on the engine thread (infill candidates, best_of). It
    reads the prompt's KV from a freed slot that holds exactly that prompt (a candidate's: its output fit
    one canvas, which is never encoded, and prefix caching kept the KV) instead of encoding it again."""
    from ..scoring import score_continuations

    def run(model):
        engine, held = state.engine, None
        for slot in engine.scheduler.free_slots_holding(prompt_ids, state.adapter(model_name)):
            head = engine.runner.prompt_head(slot, len(prompt_ids))
            if head is not None:
                held = (engine.runner.cache, slot, head)
                break
        return score_continuations(model, prompt_ids, conts, held, kv_dtype=engine.runner.cache.dtype,
                                   chunk=engine.config.prefill_chunk)  # without one: encoded as the engine does
    return state.engine_call(model_name, run)


ROWS_PER_CALL = 16  # the most rows one scoring or embedding encoder call takes


def position_groups(lengths: list, bound: int, most: int = ROWS_PER_CALL) -> list[list]:
    """The indices of rows of these lengths, shortest first, in groups for one encoder pass each: at most
    `most` rows, and rows x the group's longest (the positions of the pass's temporary KV cache and
    activations, scoring.encode_rows) within `bound`; a row longer than `bound` goes alone."""
    groups, group = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if group and (len(group) == most or (len(group) + 1) * lengths[i] > bound):  # lengths[i]: the longest yet
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group] if group else groups


def by_groups(state: ServerState, lengths: list, run) -> list:
    """run(indices) -> one result per index, called per `position_groups` group with one slot's context
    (max_model_len) as the bound: no pass holds more positions than one input a request may send alone, so
    it fits beside the engine's own KV cache whatever the request holds. -> the results in input order."""
    out = [None] * len(lengths)
    for group in position_groups(lengths, state.max_model_len):
        for i, result in zip(group, run(group), strict=True):
            out[i] = result
    return out


@dataclass
class Choice:
    index: int
    request: GenerationRequest
    prompt_index: int
    tracker: "TextTracker"
    finish_reason: str | None = None
    decoder_passes: int = 0
    cached_tokens: int = 0  # prompt tokens the engine's prefix cache supplied
    prompt_seconds: float = 0.0  # from submission until its prompt was encoded (engine.Finish)
    seconds: float = 0.0  # from submission until it finished
    answer: "ThoughtFirst | None" = None  # a constrained answer to request once this request's thought ends
    base: int = 0  # the tracker's ids before this request's output (a thought-first reply's thought)
    finished_requests: int = 0  # engine requests of this reply that have ended (a thought-first reply has two)
    canvas_base: int = 0  # canvases of this reply's earlier requests (a thought-first reply's thought)
    canvases: int = 0  # canvases of the reply committed so far

    def count(self, ev: Finish, passes: int | None = None) -> None:
        """Add an ended engine request's passes (`passes`: those up to the canvas a stop string cut, not the next
        canvas's that ran until the cancel landed), time and (the reply's first) cached prompt tokens."""
        self.decoder_passes += ev.decoder_passes if passes is None else min(passes, ev.decoder_passes)
        self.seconds += ev.seconds
        if not self.finished_requests:  # the reply's first request: its prompt is the client's (a thought's
            client = len((self.answer or self.request).prompt_ids)  # has `<|channel>` after it, not counted)
            self.cached_tokens, self.prompt_seconds = min(ev.cached_tokens, client), ev.prompt_seconds
        self.finished_requests += 1


@dataclass(frozen=True)
class ThoughtFirst:
    """A chat reply that thinks before a constrained answer (JSON, a forced tool call, ...). The constraint fixes
    every output token from its first offset on, so the reply runs as two engine requests: the thought
    (prompt + `<|channel>`, unconstrained, ended by `<channel|>`, under the thinking budget), then the answer
    (prompt + the thought, under the constraint), which is what vLLM does with structured outputs on a
    reasoning model (the grammar starts after the reasoning ends)."""

    prompt_ids: tuple  # the prompt as the client sent it
    params: DiffusionParams  # the whole reply's: max_new_tokens covers thought and answer
    seed: int
    eos: tuple  # the answer's end ids
    constraint: object
    close_id: int  # `<channel|>`
    room: int  # the fewest tokens the constrained answer needs

    def request(self, state: ServerState, c: Choice) -> GenerationRequest | None:
        """The answer's request once the thought's request has ended (its output in c.tracker), or None when
        the reply is over (it ended inside the thought, or no room is left for the answer). A thought cut by
        its token room is closed here, as an autoregressive engine's budget closes it."""
        ids, prefill = c.tracker.ids, c.tracker.prefill
        n = 0 if prefill else 1  # the reply's own `<|channel>` (none when the prompt left the channel open)
        head = closed_thought((prefill or ids)[0], self.close_id, ids[n:], c.finish_reason)
        if head is None:  # an EOS inside the thought: the model ended its reply there
            return None
        head = head[1 - n:]  # the prompt's `<|channel>` stays the prompt's
        c.tracker.add(head[len(c.tracker.ids):])
        prompt = self.prompt_ids + tuple(c.tracker.ids)
        left = answer_room(self.params.max_new_tokens, len(c.tracker.ids), len(self.prompt_ids), state.max_model_len,
                           state.canvas_length)
        if left < self.room:
            c.finish_reason = "length"
            return None
        prev, params = c.request, dataclasses.replace(self.params, max_new_tokens=left)
        if params.max_time is not None:  # one latency budget for the whole reply
            params = dataclasses.replace(params, max_time=answer_time(params.max_time, c.seconds - c.prompt_seconds))
        return GenerationRequest(uuid.uuid4().hex, prompt, params,
                                 answer_seed(self.seed), self.eos, self.constraint, prev.drafts, prev.logit_bias,
                                 prev.priority, 0, prev.lora, images=prev.images, follows=True)


def _starting(text: str, stop: str) -> int:
    """The longest k < len(stop) such that `text` ends with stop[:k]: how much of it may be a stop string that
    is starting (its cost bounded by the text's length, not the stop's: a stop may be very long)."""
    n = min(len(stop) - 1, len(text))
    tail = text[len(text) - n:]
    i = tail.find(stop[:1]) if n > 0 else -1
    while i >= 0:
        if stop.startswith(tail[i:]):
            return n - i
        i = tail.find(stop[:1], i + 1)
    return 0


@dataclass
class TextTracker:
    """Committed ids -> text, with stop strings applied and the part that is safe to stream so far. Once a
    stop string cuts the text, `ids` ends at the token that completed it (later tokens of its canvas are not
    part of the reply: not counted, not scored, not continued from) and later commits are ignored."""

    tokenizer: object
    stops: list[str]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already handed out
    stopped: bool = False  # a stop string was found: text is final
    stop_word: str = ""  # the stop string that cut it
    keep_stop: bool = False  # include_stop_str_in_output: the text ends after the stop string, not before
    stop_ids: tuple = ()  # stop_token_ids: the one that ends the reply is not part of its text (vLLM's way)
    min_tokens: int = 0  # a stop string counts only where it ends in the min_tokens-th token or later (vLLM's)
    skip_special: bool = True  # skip_special_tokens
    thoughts: object = None  # reasoning.ThoughtSplitter (chat replies): a thought channel goes to `reasoning`
    reasoning: str = ""  # the thought's text (without its label)
    reasoning_sent: int = 0
    content_ids: list[int] = field(default_factory=list)  # ids outside the thought: the text's, the calls'
    prefill: list[int] = field(default_factory=list)  # a thought the prompt left open: its ids from `<|channel>`
    prefill_thought: str = ""  # that thought's text so far (the reply's reasoning is what follows it)

    def __post_init__(self):
        if self.prefill and self.thoughts is not None:
            self.prefill_thought = self.thoughts.thought_text(self.prefill[1:])

    def add(self, ids) -> None:
        if self.stopped:  # the text is final
            return
        self.ids.extend(ids)
        self.content_ids = self._split(self.ids)
        shown = self.shown_ids()
        full = self._decode(shown)
        # a stop must end in the min_tokens-th output token or later (a thought's tokens count, as the EOS ban's)
        if self.stops and len(self.ids) >= self.min_tokens:
            held = len(self._decode(self._content(self.ids[:self.min_tokens - 1]))) if self.min_tokens > 1 else 0
            hits = [(i, i + len(s), s) for i, s in ((full.find(s, max(held - len(s) + 1, 0)), s) for s in self.stops)
                    if i >= 0]
        else:
            hits = []
        if hits:  # the stop an autoregressive server meets first: the one complete in the fewest tokens
            n, start, end, self.stop_word = min((self._stop_end(i, s), i, e, s) for i, e, s in hits)
            self.text, self.stopped = full[:end if self.keep_stop else start], True
            self.ids = self.ids[:n]
            self.content_ids = self._split(self.ids)
        else:
            self.text = full

    def _split(self, ids: list[int]) -> list[int]:
        """The content ids of `ids`; sets `reasoning` from their thought (without a stop token that ended the
        reply inside it: that token counts as the thought's, its text is no one's)."""
        if self.thoughts is None:
            return ids
        stop = ids[-1:] if ids[-1:] and ids[-1] in self.stop_ids else []
        split = self.thoughts.split(self.prefill + ids[:len(ids) - len(stop)])
        if split.thought is not None:
            text = self.thoughts.thought_text(split.thought)
            self.reasoning = text[len(self.prefill_thought):] if text.startswith(self.prefill_thought) else text
        return split.content if split.thought is not None and not split.closed else split.content + stop

    def shown_ids(self) -> list[int]:
        """The content ids the text shows: without the stop token (EOS, stop_token_ids) that ended the reply."""
        ids = self.content_ids
        return ids[:-1] if ids[-1:] and ids[-1] in self.stop_ids else ids

    def held(self, text: str) -> str:
        """`text` without an end that may be the start of a stop string (it may yet be cut there)."""
        return text[:len(text) - max((_starting(text, s) for s in self.stops), default=0)]

    def _content(self, ids: list[int]) -> list[int]:
        """The content ids of `ids` (a prefix of the output), nothing else changed."""
        return self.thoughts.split(self.prefill + ids).content if self.thoughts is not None else ids

    def content_positions(self) -> list[int]:
        """The indices into `ids` of the content ids (all of them but a thought channel's)."""
        if self.thoughts is None:
            return list(range(len(self.ids)))
        n = len(self.prefill)
        start, end = self.thoughts.split(self.prefill + self.ids).span
        return [i for i in range(len(self.ids)) if not start <= i + n < end]

    def thought_at(self) -> int | None:
        """How many characters of `text` the model wrote before its thought channel began; None when there is
        no thought or it came first."""
        if self.thoughts is None:
            return None
        split = self.thoughts.split(self.prefill + self.ids)
        if split.thought is None or split.span[0] == 0:
            return None
        before = self.ids[:split.span[0] - len(self.prefill)]
        return min(len(self._decode(self.thoughts.split(self.prefill + before).content)), len(self.text))

    def _decode(self, content_ids: list[int]) -> str:
        return (self.tokenizer.decode(content_ids, skip_special_tokens=self.skip_special)
                if self.tokenizer is not None else "")  # token-id-only checkpoints

    def _stop_end(self, start: int, word: str) -> int:
        """How many of `ids` the text needs for the stop string `word` (found at `start`): the fewest whose text
        holds it there (a search over prefixes; a prefix's text is a prefix of the whole text)."""
        lo, hi = 1, len(self.ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._decode(self._content(self.ids[:mid])).find(word, start) >= 0:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def delta(self, final: bool = False) -> str:
        """New text that can no longer change: holds back a possible stop-string start and an incomplete
        character, unless final."""
        safe = self.text
        if not (final or self.stopped):
            safe = self.held(safe).rstrip("\ufffd")
        out = safe[self.sent:]
        self.sent = max(self.sent, len(safe))
        return out

    def reasoning_delta(self, final: bool = False) -> str:
        """New thought text that can no longer change (an incomplete character held back unless final)."""
        safe = self.reasoning if final else self.reasoning.rstrip("\ufffd")
        out = safe[self.reasoning_sent:]
        self.reasoning_sent = max(self.reasoning_sent, len(safe))
        return out


def validated(cls, fields: dict, param: str):
    """A request body of pydantic model `cls` from `fields` (None values left to the defaults), built by a
    route that translates another API's body; a 400 naming `param` when the translation does not pass (the
    place in the translated body, e.g. a chat message, and what is wrong there)."""
    import pydantic

    body = {k: v for k, v in fields.items() if v is not None}
    try:
        return cls.model_validate(body)
    except pydantic.ValidationError as e:  # e.g. a message shape the chat route would refuse
        message = validation_message(e.errors(), body)[0] if e.errors() else str(e)
        raise APIError(400, f"{param}: as a {cls.__name__}, {message}", param) from None
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param) from None


# what a message quotes or points at, left as it is by `renamed`: the request's own values ('stop', "a b",
# repr's escapes), a schema path's tail "(at $.a b)", and $-paths and #/ or / pointers ($.stop, #/$defs/stop)
_QUOTED_OR_PATH = (r"""(?<!\w)'(?:[^'\\]|\\.)*'|(?<!\w)"(?:[^"\\]|\\.)*"|\(at [^\n]*?\)(?=\s|$)"""
                   r"|(?<![\w.])[$#/]\S*")


def _kept_spans(message: str) -> list[tuple[int, int]]:
    """The [start, end) spans of `message` that `renamed` leaves alone (_QUOTED_OR_PATH)."""
    import re

    return [m.span() for m in re.finditer(_QUOTED_OR_PATH, message)]


def renamed(e: APIError, names: dict, in_text: tuple = ()) -> APIError:
    """`e` in another API's terms (`names`: the translated body's field -> that API's): its `param`, and in
    its message the param's own name and those of `in_text` (fields other errors name too). Only the
    message's own words are renamed: never inside a quoted value (a model, tool or property the request
    named 'stop'), a schema path ($.max_tokens) or a sub-field's key (a name after a "."). A name the
    renaming doubles at the message's head ("guided_json: json_schema: ..." -> "json_schema: json_schema:")
    is said once."""
    import re

    def word(c: str) -> bool:
        return c.isalnum() or c == "_"

    for ours, theirs in names.items():
        if e.param == ours or ours in in_text:
            pattern = ((r"(?<!\.)\b" if word(ours[:1]) else "") + re.escape(ours)
                       + (r"\b" if word(ours[-1:]) else ""))
            kept = _kept_spans(e.message)
            e.message = re.sub(pattern, lambda m: m.group() if any(a <= m.start() < b for a, b in kept) else theirs,
                               e.message)
            e.message = re.sub(rf"^({re.escape(theirs)}: )\1+", lambda m: m.group(1), e.message)
    e.param = names.get(e.param, e.param)
    return e


def errors_named(names: dict, in_text: tuple = ()):
    """A route decorator: the route's errors in its API's terms (`renamed`)."""
    def wrap(route):
        @functools.wraps(route)
        async def wrapped(*args, **kwargs):
            try:
                return await route(*args, **kwargs)
            except APIError as e:
                raise renamed(e, names, in_text) from None
        return wrapped
    return wrap


def validation_message(errs: list, body) -> tuple[str, str | None, str | None]:
    """A 400's message, param and code for pydantic's errors about `body`: the error that says most (see
    `_most_specific`), at its place in the body (`messages[0].content[1].image_url.detail: ...`)."""
    e, steps = _most_specific([(e, _walk(e, body)) for e in errs])
    path = [seg for kind, seg in steps if kind == "key"]
    where = "".join(f"[{seg}]" if isinstance(seg, int) else f".{seg}" for seg in path).lstrip(".") or "body"
    return f"{where}: {e.get('msg')}", (str(path[0]) if path else None), e.get("type")


def _walk(e: dict, body) -> list:
    """An error's loc as steps through the body: ("key", field or index) where the body has that step, else
    ("label", name) for a union branch pydantic names in the loc ('str', 'list[...]', a model's name, a tagged
    union's tag); the name of a missing field, the loc's last step, is a key."""
    loc = [x for x in e.get("loc", ()) if x != "body"]
    steps, cur = [], body
    for i, seg in enumerate(loc):
        if isinstance(cur, dict) and isinstance(seg, str) and seg in cur:
            steps.append(("key", seg))
            cur = cur[seg]
        elif isinstance(cur, list) and isinstance(seg, int) and 0 <= seg < len(cur):
            steps.append(("key", seg))
            cur = cur[seg]
        elif cur is None or (i == len(loc) - 1 and e.get("type") == "missing"):
            steps.append(("key", seg))  # no body to walk (or the missing field itself): loc as it is
            cur = None
        else:
            steps.append(("label", seg))
    return steps


def _most_specific(errs: list, start: int = 0) -> tuple:
    """The error to report from (error, steps) pairs. For a union field pydantic reports every branch's
    errors, the first often from a branch that does not fit the input at all ('messages.0.content.str: Input
    should be a valid string' for a list of parts). This keeps a branch that fits: not one that refused the
    input's type outright, nor one whose Literal field (a `type`, a `role`) the input does not match; of
    those, the one whose errors reach deepest into the input, then the one with the fewest errors, then the
    first; and it looks again inside that branch for nested unions."""
    steps = errs[0][1]
    j = next((i for i in range(start, len(steps)) if steps[i][0] == "label"), None)
    if j is None:
        return errs[0]
    branches: dict = {}
    for e, s in errs:
        if s[:j] == steps[:j] and len(s) > j and s[j][0] == "label":
            branches.setdefault(s[j][1], []).append((e, s))

    def misfit(e, s):
        kind = str(e.get("type", ""))
        return (len(s) == j + 1 and kind.endswith("_type")) or (len(s) == j + 2 and kind == "literal_error")

    def depth(branch):
        return max(sum(kind == "key" for kind, _ in s) for _, s in branch)

    fitting = [b for b in branches.values() if not any(misfit(e, s) for e, s in b)] or list(branches.values())
    best = max(fitting, key=lambda b: (depth(b), -len(b)))  # max keeps the first of equals
    return _most_specific(best, j + 1)


def context_error(state: ServerState, detail: str, param: str) -> APIError:
    """A 400 `context_length_exceeded` naming `param`. It opens with the sentence OpenAI's and vLLM's
    clients parse for the context length (agent frameworks step down to it), then says what did not fit."""
    return APIError(400, f"This model's maximum context length is {state.max_model_len} tokens "
                         f"(max_model_len). {detail}.", param, code="context_length_exceeded")


def resolve_params(state: ServerState, body: _Common, prompt_len: int, constraint) -> DiffusionParams:
    """DiffusionParams for one prompt, via SamplingParams.resolve (the LLM API's own path)."""
    C, room = state.canvas_length, (state.max_model_len - prompt_len) // state.canvas_length * state.canvas_length
    field_name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
    if room < 1:
        raise context_error(state, f"The prompt has {prompt_len} tokens, leaving no room for a canvas of {C} tokens",
                            "messages" if hasattr(body, "messages") else "prompt")
    if max_tokens is None and constraint is None and (state.fill_context or body._fill_context):
        max_tokens = room  # vLLM's default (it ignores DiffusionGemma's generation_config 256), Ollama's, llama's
    if max_tokens is None:  # the default length, or min_tokens when more
        try:  # a generation config's max_length (prompt + output) leaves max_length - prompt, as transformers
            default = state.defaults.for_prompt(prompt_len).max_new_tokens
        except ValueError as e:  # ConfigError: the prompt leaves no room under max_length
            raise APIError(400, f"{e} (or send max_tokens)", field_name) from None
        max_tokens = min(max(default, getattr(body, "min_tokens", 0) or 0), room)
        if constraint is not None and hasattr(constraint, "min_new_tokens"):
            max_tokens = max(max_tokens, constraint.min_new_tokens(C))
    need = prompt_len + -(-max_tokens // C) * C
    if need > state.max_model_len:
        raise context_error(state, f"The prompt ({prompt_len} tokens) + {field_name}={max_tokens} (rounded up to "
                                   f"whole canvases of {C}) needs {need} positions; at most {room} new tokens fit",
                            field_name)
    return params_for(state, body, max_tokens, constraint)


def params_for(state: ServerState, body: _Common, max_tokens: int, constraint) -> DiffusionParams:
    """The body's sampling fields as DiffusionParams for `max_tokens` new tokens, checked (400s)."""
    C = state.canvas_length
    if body.max_denoising_steps is not None and body.max_denoising_steps > state.max_denoising_steps:
        raise APIError(400, f"max_denoising_steps={body.max_denoising_steps} is over this server's limit of "
                            f"{state.max_denoising_steps}", "max_denoising_steps")
    temperature = body.temperature
    if temperature == 0:
        temperature = GREEDY_TEMPERATURE
    try:
        sp = SamplingParams(max_new_tokens=max_tokens, max_denoising_steps=body.max_denoising_steps,
                            temperature=temperature, entropy_bound=body.entropy_bound,
                            confidence_threshold=body.confidence_threshold, top_p=body.top_p,
                            top_k=None if body.top_k == -1 else body.top_k, min_p=body.min_p,
                            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                            repetition_penalty=body.repetition_penalty, max_time=body.max_time)
        params = sp.resolve(state.defaults)
    except (GenerationError, ConfigError) as e:
        raise APIError(400, str(e)) from None
    if params.stability_depth > state.engine.runner.history_depth:  # a threshold past the steps is never met
        raise APIError(400, "stability_threshold exceeds what this server was started with")
    if params.max_time is not None and constraint is not None and params.max_new_tokens > C:
        what = body.field_name((body.constraint_fields() or ["tools"])[0])
        raise APIError(400, f"max_time with {what} needs max_tokens <= {C} (one canvas): a spent budget ends the "
                            f"output with the canvas in progress, which could leave what {what} asks for "
                            f"unfinished", "max_time")
    return params


def _named_errors(body: _Common, build):
    """build(), its APIError naming each constraint field as the request named it (structured_outputs.json
    for guided_json, ...)."""
    try:
        return build()
    except APIError as e:
        e.message = body.as_named(e.message)
        if e.param is not None:
            e.param = body.field_name(e.param)
        raise


def build_constraint(state: ServerState, body: _Common, reserve: int = 0, total: int | None = None):
    """The canvas constraint for a tool call, response_format, guided_json, guided_choice, guided_regex,
    guided_grammar or pins (one at most), or None. reserve: tokens of the output's `total` (max_tokens, or
    the default when the request gives none) that an output as wide as max_tokens (JSON mode, a regex, a
    grammar) leaves for a thought before it."""
    max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
    if max_tokens is not None and max_tokens > state.max_model_len:  # before a slot that wide is built
        field_name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise context_error(state, f"{field_name}={max_tokens} is over it", field_name)
    width_tokens = (max_tokens or total) - reserve if reserve else max_tokens
    if forced_tool(body) is not None or chosen_tools(body) is not None:
        return _tool_constraint(state, body, max_tokens)
    given = body.constraint_fields()
    if not given:
        return None
    name = given[0]
    if len(given) > 1:
        raise APIError(400, f"{name} and {given[1]} both constrain the output; send one", name)
    if name == "response_format":
        rf = body.response_format
        if rf.type == "json_object":
            return _json_object_constraint(state, width_tokens, name)
        if rf.type != "json_schema":
            raise APIError(400, f"response_format type {rf.type!r} is not supported (use 'text', 'json_object' "
                                "or 'json_schema')", name)
        if not isinstance((rf.json_schema or {}).get("schema"), dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", name)
        return _json_constraint(state, rf.json_schema["schema"], max_tokens, name, name)
    if name == "guided_json":
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise APIError(400, f"guided_json is not valid JSON: {e}", name) from None
        if not isinstance(schema, dict):
            raise APIError(400, f"guided_json must be a JSON schema object, got {type(schema).__name__}", name)
        return _json_constraint(state, body.json_schema_of(schema), max_tokens, name, name)
    if name == "pins":
        return _pinned_constraint(state, body, max_tokens)
    need_tokenizer(state, name)
    try:
        if name == "guided_choice":
            from ..sampling.choice import ChoiceConstraint

            choice = ChoiceConstraint(body.guided_choice, state.tokenizer, name)
            if max_tokens is not None and choice.width + 1 > max_tokens:
                raise APIError(400, f"{name}: the longest choice needs {choice.width + 1} tokens (EOS included), "
                                    f"over max_tokens={max_tokens}", name)
            return choice
        from ..sampling.grammar import GrammarConstraint
        from ..sampling.regex import DEFAULT_TOKENS, RegexConstraint
        from ..sampling.regex_fsm import RegexCompileBusy

        width = width_tokens - 1 if width_tokens else DEFAULT_TOKENS  # match + EOS padding, then the pinned EOS
        try:
            if name == "guided_grammar":
                return GrammarConstraint(body.guided_grammar, state.tokenizer, width, name, compile_timeout(state, name))
            return RegexConstraint(body.guided_regex, state.tokenizer, width, name, compile_timeout(state, name))
        except RegexCompileBusy as e:
            raise APIError(503, f"{name}: {e}", name, type="server_error") from None
    except ValueError as e:  # ConstraintError is a ValueError; its message names the field
        raise APIError(400, str(e), name) from None


# when the request that is compiling a constraint in this thread was queued for it (off_loop's compile pool)
_compile_since: contextvars.ContextVar = contextvars.ContextVar("compile_since", default=None)


def compile_timeout(state: ServerState, name: str) -> float:
    """Seconds left to compile `name`'s constraint: --regex-timeout counted from when the request was queued
    for a compile worker (a burst then waits no longer than the limit in all); a 503 once none are left."""
    since = _compile_since.get()
    if since is None:
        return state.regex_timeout
    left = state.regex_timeout - (time.monotonic() - since)
    if left <= 0:
        raise APIError(503, f"{name}: the server's constraint compilers stayed busy for the whole limit of "
                            f"{state.regex_timeout:g} s (--regex-timeout); try again", name, type="server_error")
    return math.ceil(left * 10) / 10  # to a tenth of a second up: the limit an error names reads plainly


def need_tokenizer(state: ServerState, name: str) -> None:
    """A 400 naming `name` when the server has no tokenizer (text in or out needs one)."""
    if state.tokenizer is None:
        raise APIError(400, f"{name} needs the checkpoint's tokenizer, and this server has none", name)


def need_chat_template(state: ServerState, param: str) -> None:
    if state.tokenizer is None or getattr(state.tokenizer, "chat_template", None) is None:
        raise APIError(400, "this checkpoint has no chat template; use /v1/completions", param)


def image_prompt(ids: list[int], chat) -> list[int]:
    """`ids` as a multimodal.ImagePrompt carrying the chat body's images (sources, details, its
    mm_processor_kwargs), or as they are when the messages hold none."""
    parts = chat.image_parts()
    return ImagePrompt(ids, [p.url for p in parts], getattr(chat, "mm_processor_kwargs", None),
                       [p.detail for p in parts]) if parts else ids


def encode_chat(state: ServerState, chat, param: str = "messages") -> list[int]:
    """The prompt ids of a chat body (`protocol.ChatCompletionRequest`) through the chat template; 400s
    name `param` (the field the messages came from) or continue_final_message. With image parts: a
    multimodal.ImagePrompt (one image token per image, and the images' sources), which `prepare` loads."""
    need_chat_template(state, param)
    try:
        ids = state.tokenizer.encode_chat(chat.message_dicts(state.image_placeholder), tools=chat.tool_dicts(),
                                          **chat.template_kwargs())
        return image_prompt(ids, chat)
    except ValueError as e:
        if str(e).startswith("continue_final_message"):
            raise APIError(400, str(e), "continue_final_message") from None
        raise APIError(400, f"{param}: {e}", param) from None


def _pinned_constraint(state: ServerState, body, max_tokens):
    """`pins`: text or ids at output offsets; EOS and the request's stop_token_ids are banned before the end of
    the last pin (as `--pin`), so the output runs at least that far."""
    from ..sampling.constraints import ConstraintError, PinnedConstraint, pins_from_text

    spans, keys = {}, {}
    for key, value in body.pins.items():
        if not (key.isascii() and key.isdigit()):  # "+3", " 3" or "3_0" are not offsets (int() would read them)
            raise APIError(400, f"pins: key {key!r} is not an output token offset (a non-negative integer in "
                                "decimal digits)", "pins")
        digits = key.lstrip("0") or "0"
        if len(digits) > 18 or int(digits) >= state.max_model_len:  # before anything is laid out for it
            shown = digits if len(digits) <= 24 else digits[:12] + "..."
            raise APIError(400, f"pins: offset {shown} is past the context ({state.max_model_len} positions in all, "
                                "prompt included)", "pins")
        off = int(digits)
        if off in keys:  # "3" and "03"
            raise APIError(400, f"pins: keys {keys[off]!r} and {key!r} name the same offset {off}; give one", "pins")
        keys[off] = key
        if isinstance(value, str):
            need_tokenizer(state, "pins")
            try:  # text the tokenizer cannot encode, or that encodes to nothing
                value = pins_from_text(state.tokenizer, {off: value})[off]
            except ValueError as e:
                raise APIError(400, f"pins[{key!r}]: {e}", "pins") from None
        elif not value or any(not 0 <= t < state.vocab_size for t in value):
            raise APIError(400, f"pins[{key!r}]: token ids must be a non-empty list within the vocabulary "
                                f"[0, {state.vocab_size})", "pins")
        spans[off] = value
    # every id that would end the output before the last pin: the checkpoint's EOS, the request's stop_token_ids
    # and, with tools the model may call, the tool-response opener (as output_settings adds them to its end ids)
    ends = tuple(state.eos_ids) + tuple(getattr(body, "stop_token_ids", None) or ())
    if auto_tools(body):
        from ..tool_parser import response_stop_ids

        ends += response_stop_ids(state.tokenizer)
    ends = tuple(dict.fromkeys(ends))
    end = max(off + len(ids) for off, ids in spans.items())
    try:
        if max_tokens is not None and end > max_tokens:
            raise ConstraintError(f"the last pin ends at output token {end}, over max_tokens={max_tokens}")
        if end > state.max_model_len:
            raise ConstraintError(f"the last pin ends at output token {end}, past the context ({state.max_model_len} "
                                  "positions in all, prompt included)")
        c = PinnedConstraint(spans, ban_ids=ends, ban_until=end)
    except ConstraintError as e:
        raise APIError(400, f"pins: {e}", "pins") from None
    early = c.early_end(ends)  # a pinned end id before the last pinned position would end the output there
    if early is not None:
        key = next(keys[off] for off, ids in spans.items() if off <= early[0] < off + len(ids))
        raise APIError(400, f"pins[{key!r}]: the id at output offset {early[0]} ends the output (EOS or a "
                            f"stop_token_ids id), before the last pin ends at {end}", "pins")
    return c


def _tool_constraint(state: ServerState, body, max_tokens):
    """A tool call's constraint (sampling/tool_call.py): a forced function's arguments, or a call to one of
    several functions that the model picks; compiled under --regex-timeout (all the functions together)."""
    from ..sampling.json_schema import JsonSchemaConstraint
    from ..sampling.regex_fsm import RegexCompileBusy
    from ..sampling.tool_call import call_constraint

    need_tokenizer(state, "tools")
    choice = body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump()
    try:
        c, _ = call_constraint([t.model_dump(exclude_none=True) for t in body.tools], choice, state.tokenizer,
                               canvas_length=state.canvas_length, timeout=compile_timeout(state, "tools"))
        need = c.max_template_tokens() if isinstance(c, JsonSchemaConstraint) else \
            c.min_new_tokens(state.canvas_length)
    except RegexCompileBusy as e:  # a schema's `pattern` waited for a regex compiler: try again
        raise APIError(503, f"tools: {e}", "tools", type="server_error") from None
    except ValueError as e:  # ConstraintError is a ValueError; its message names the field
        raise APIError(400, str(e), "tools") from None
    if max_tokens is not None and need > max_tokens:
        raise APIError(400, f"tools: the call needs up to {need} tokens (EOS included), over max_tokens={max_tokens}",
                       "tools")
    return c


def _json_object_constraint(state: ServerState, max_tokens, name: str):
    """JSON mode: any JSON object in max_tokens - 1 tokens (sampling/json_any.py), then EOS."""
    from ..sampling.json_any import DEFAULT_TOKENS, JsonObjectConstraint

    need_tokenizer(state, name)
    width = max_tokens - 1 if max_tokens else DEFAULT_TOKENS
    try:
        return JsonObjectConstraint(state.tokenizer, width, name, timeout=compile_timeout(state, name))
    except ValueError as e:  # ConstraintError; its message names the field
        raise APIError(400, str(e), name) from None


def _json_constraint(state: ServerState, schema: dict, max_tokens, field: str, param: str):
    """The JSON-schema canvas constraint (sampling/json_schema.py); errors name `field`."""
    from ..sampling.json_schema import constraint_from_response_format
    from ..sampling.regex_fsm import RegexCompileBusy

    need_tokenizer(state, field)
    try:
        return constraint_from_response_format({"type": "json_schema", "json_schema": {"schema": schema}},
                                               state.tokenizer, max_tokens, canvas_length=state.canvas_length,
                                               timeout=compile_timeout(state, field))
    except RegexCompileBusy as e:  # a `pattern` waited for a regex compiler: try again
        raise APIError(503, f"{field}: {e}", param, type="server_error") from None
    except ValueError as e:  # ConstraintError is a ValueError
        raise APIError(400, f"{field}: {e}", param) from None


def check_request_basics(state: ServerState, body: _Common, prompts: list[list[int]]) -> None:
    """What every request must pass: supported fields, this server's model, non-empty in-vocabulary prompts.
    With truncate_prompt_tokens, each prompt is cut to its last N tokens here, in the caller's list, so
    every later step (generation, scoring, usage) sees the truncated prompts. Prompts with images
    (multimodal.ImagePrompt) are loaded here too and replaced by their expanded ids, with `.images` set."""
    problem = body.unsupported()
    if problem is not None:
        raise APIError(400, problem[1], problem[0])
    state.adapter(body.model)  # a 404 unless this server serves it
    load_images(state, body, prompts)
    if body.truncate_prompt_tokens is not None:
        prompts[:] = [p[-body.truncate_prompt_tokens:] for p in prompts]
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty: at least one token is needed", "prompt")
        check_in_vocab(state, ids, "prompt", "prompt token ids")


MAX_CHOICES = 64  # prompts x n in one request


def check_choice_count(prompts: list, n: int) -> None:
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={n} choices is over the limit of {MAX_CHOICES}", "n")


def check_prompt_only(state: ServerState, body: _Common, prompts: list[list[int]]) -> None:
    """`check_request_basics` for a request that only scores its prompts (echo with max_tokens=0): its fields are
    checked as a generating request's are (nothing is generated, but a bad field is still a 400), each prompt
    must fit the context, as a generating request's prompt must, and the choices the limit. Compiles any
    constraint: callers run it in a worker thread, as `prepare`."""
    check_request_basics(state, body, prompts)
    _, _, constraint = output_settings(state, body)
    params_for(state, body, 1, constraint)  # one token: max_time's limit is met, no canvas is laid out
    check_min_tokens(body, 0)
    check_choice_count(prompts, body.n)
    for ids in prompts:
        check_prompt_fits(state, ids)


def check_prompt_fits(state: ServerState, ids: list[int]) -> None:
    """A 400 unless a prompt that is only encoded (no new tokens) fits max_model_len."""
    if len(ids) > state.max_model_len:
        raise context_error(state, f"The prompt has {len(ids)} tokens", "prompt")


def load_images(state: ServerState, body: _Common, prompts: list, count_only: bool = False) -> None:
    """Each prompt holding images (or image tokens) -> an ImagePrompt of its expanded ids with `.images`
    (multimodal.ImageInputs). Loads, maybe fetches, and runs the vision tower: callers run `prepare` in a
    worker thread. A prompt whose expanded ids are over max_model_len is a 400 before the tower runs (it
    could never be served); count_only (/tokenize, count_tokens): any length, and the tower never runs."""
    vision = state.vision
    where = "messages" if hasattr(body, "messages") else "prompt"

    def servable(ids: list[int]) -> None:  # before the tower: the prompt in the context (truncation is refused)
        if len(ids) > state.max_model_len:  # and each image within the prefix store's room
            raise context_error(state, f"The prompt has {len(ids)} tokens", where)
        spans = image_spans([i for i, t in enumerate(ids) if t == vision.cfg.image_token_id])
        problem = state.engine.image_problem(spans)
        if problem is not None:
            raise APIError(400, problem, where)

    for k, p in enumerate(prompts):
        sources = p.sources if isinstance(p, ImagePrompt) else []
        if not sources and (vision is None or not vision.cfg.has_vision or vision.cfg.image_token_id not in p):
            continue
        if vision is None:
            raise APIError(400, "this server takes text only (no vision tower is served)", "messages")
        if body.truncate_prompt_tokens is not None:
            raise APIError(400, "truncate_prompt_tokens cannot be combined with images (a cut could split one)",
                           "truncate_prompt_tokens")
        kwargs = getattr(p, "processor_kwargs", None)
        try:  # the request's processor settings, checked first so their 400 names their field
            vision.processor_for(kwargs)
        except ImageError as e:
            raise APIError(400, str(e), "mm_processor_kwargs") from None
        try:
            ids, images = vision.prepare(p, sources, kwargs, getattr(p, "details", None),
                                         check=None if count_only else servable, encode=not count_only)
        except ImageError as e:
            raise APIError(400, str(e), where) from None
        prompts[k] = ImagePrompt(ids, ())
        prompts[k].images = images


MEDIA_WORKERS = 16  # image-loading requests at once; more wait their turn without holding other work back
COMPILE_WORKERS = 4  # requests compiling a constraint at once; more wait their turn (counted in their limit)


async def off_loop(state: ServerState, fn, *args, prompts=(), compiles: bool = False):
    """fn(*args) in a worker thread. When `prompts` hold images to load (an image URL's fetch may take its
    whole 10 s deadline), on the server's own media pool; else when it `compiles` a constraint (a regex or a
    schema may take the whole --regex-timeout), on the compile pool, its limit counted from now. A burst of
    slow image URLs or constraints then never takes the default pool's few threads (min(32, cores + 4)),
    which every plain request's `prepare` (and /tokenize) needs."""
    pool, call = None, functools.partial(fn, *args)
    if any(isinstance(p, ImagePrompt) and p.sources for p in prompts):
        if state.media_pool is None:
            state.media_pool = ThreadPoolExecutor(MEDIA_WORKERS, thread_name_prefix="canvaslm-media")
        pool = state.media_pool
    elif compiles:
        if state.compile_pool is None:
            state.compile_pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="canvaslm-compile")
        pool, call = state.compile_pool, functools.partial(_counted_from, time.monotonic(), call)
    return await asyncio.get_running_loop().run_in_executor(pool, call)


def _counted_from(since: float, call):
    """call() with compile_timeout counting from `since` (when the request was queued)."""
    token = _compile_since.set(since)
    try:
        return call()
    finally:
        _compile_since.reset(token)


def compiles(body) -> bool:
    """Whether preparing `body` may build an output constraint (guided_*, response_format, pins, a tool call that
    tool_choice forces). Never raises: `prepare` refuses a bad tool_choice, by name (forced_tool would not)."""
    tools_forced = getattr(body, "tools", None) and getattr(body, "tool_choice", None) not in (None, "none", "auto")
    return bool(body.constraint_fields()) or bool(tools_forced)


async def prepare_off_loop(state: ServerState, body, prompts: list) -> list[Choice]:
    """`prepare` in a worker thread: the media pool for images, the compile pool for a constraint (off_loop)."""
    return await off_loop(state, prepare, state, body, prompts, prompts=prompts, compiles=compiles(body))


async def prepare_translated(state: ServerState, body, prompts: list, places: list, data_url: str | None = None,
                             rename=None) -> list[Choice]:
    """`prepare` (in a worker thread) for a body translated from another API: a load error about image k
    names places[k], the field it came from (`image_error_at`); `rename(e)` may first rename other fields."""
    try:
        return await prepare_off_loop(state, body, prompts)
    except APIError as e:
        if rename is not None:
            rename(e)
        raise image_error_at(e, places, data_url) from None


def image_error_at(e: APIError, places: list, data_url: str | None = None) -> APIError:
    """`e`, when it is about image k ("image k: ...", as serving.load_images reports it), about places[k]
    instead: the field of the translated body that image came from. `data_url`: what to call "the data URL"
    (for images that were sent as base64 and wrapped into one here)."""
    head, sep, rest = e.message.partition(": ")
    k = head.removeprefix("image ")
    if sep and head.startswith("image ") and k.isdigit() and int(k) < len(places):
        e.message = f"{places[int(k)]}: {rest.replace('the data URL', data_url) if data_url else rest}"
    return e


def check_in_vocab(state: ServerState, ids, field: str, what: str) -> None:
    """A 400 naming `field` when some of `ids` are outside this model's vocabulary ("{what} [...] are ...")."""
    bad = [t for t in ids if not 0 <= t < state.vocab_size]
    if bad:
        raise APIError(400, f"{what} {bad[:5]} are outside the vocabulary [0, {state.vocab_size})", field)


def bias_pairs(state: ServerState, body: _Common) -> tuple:
    """The body's logit_bias as ((token id, bias), ...), checked against this model's vocabulary, with its
    bad_words' tokens banned (-100: logits are soft-capped at 30, so such a token is 70+ nats below any other)."""
    try:
        pairs = logit_bias.normalize(body.logit_bias, "logit_bias", state.vocab_size)
    except logit_bias.LogitBiasError as e:
        raise APIError(400, str(e), "logit_bias") from None
    banned = bad_word_ids(state, getattr(body, "bad_words", None) or [])
    if not banned:
        return pairs
    return tuple(sorted({**dict(pairs), **{t: -logit_bias.LIMIT for t in banned}}.items()))


def bad_word_ids(state: ServerState, words: list[str]) -> set[int]:
    """vLLM's bad_words: each word as it is spelled alone and after a space (vLLM's two forms); the forms that are
    one token are banned at every position. Every canvas position is drawn at once, so a word only several
    tokens spell cannot be banned as vLLM bans it (its last token after the others): such a word is a 400."""
    if not words:
        return set()
    need_tokenizer(state, "bad_words")
    banned = set()
    for k, word in enumerate(words):
        if not word.strip():
            raise APIError(400, f"bad_words[{k}] is empty", "bad_words")
        try:
            forms = [state.tokenizer.encode(w, add_special_tokens=False) for w in (word, " " + word.lstrip())]
        except ValueError as e:  # text the tokenizer cannot encode
            raise APIError(400, f"bad_words[{k}]: {e}", "bad_words") from None
        ones = {ids[0] for ids in forms if len(ids) == 1}
        if not ones:
            raise APIError(400, f"bad_words[{k}] {word!r} is {len(forms[0])} tokens; only words of one token (alone "
                                "or after a space) can be banned here", "bad_words")
        banned |= ones
    return banned


def output_settings(state: ServerState, body: _Common) -> tuple:
    """The fields that shape a request's output, checked (400s naming them): (logit bias pairs, end ids,
    constraint as thinking off gets it). A request that only scores its prompts (echo with max_tokens=0) is
    checked here too, so a body is refused whatever its max_tokens."""
    bias = bias_pairs(state, body)
    eos = () if body.ignore_eos else state.eos_ids
    extra = body.stop_token_ids or []
    check_in_vocab(state, extra, "stop_token_ids", "stop_token_ids")
    eos = eos + tuple(t for t in extra if t not in eos)
    if auto_tools(body):
        problem = auto_problem(state.tokenizer)
        if problem is not None:
            raise APIError(400, problem, "tool_choice")
        from ..tool_parser import response_stop_ids

        eos = eos + tuple(t for t in response_stop_ids(state.tokenizer) if t not in eos)
    constraint = _named_errors(body, lambda: build_constraint(state, body))
    for field_name in ("min_tokens", "ignore_eos"):
        if getattr(body, field_name, None) and (constraint is not None or auto_tools(body)):
            raise APIError(400, f"{field_name} cannot be combined with a constrained output or tools (they decide "
                                "where the output ends)", field_name)
    return bias, eos, constraint


def check_min_tokens(body: _Common, max_new_tokens: int) -> None:
    if body.min_tokens > max_new_tokens:
        raise APIError(400, f"min_tokens={body.min_tokens} is over the {max_new_tokens} tokens this request may "
                            "generate (max_tokens)", "min_tokens")


def prepare(state: ServerState, body: _Common, prompts: list[list[int]]) -> list[Choice]:
    check_request_basics(state, body, prompts)
    bias, eos, constraint = output_settings(state, body)
    check_choice_count(prompts, body.n)
    seed = body.seed if body.seed is not None else random.randrange(2**63)
    choices, stops = [], body.stop_list()
    thoughts = state.thoughts if hasattr(body, "messages") else None  # chat replies only
    budget = state.thinking_token_budget if body.thinking_token_budget is None else body.thinking_token_budget
    budget = ThinkingBudget.for_tokenizer(budget, state.tokenizer)
    think_first = thoughts is not None and thinking_on(state, body)
    think_first = think_first and constraint is not None and not body.pins  # pins count from the reply's start
    plain = constraint
    if think_first:  # an output as wide as max_tokens is narrowed for a thought
        total = body.max_tokens or getattr(body, "max_completion_tokens", None) or state.defaults.max_new_tokens
        reserve = thought_reserve(None if budget is None else budget.tokens, total, constraint)
        if reserve:
            try:
                constraint = build_constraint(state, body, reserve, total)
            except APIError:  # never refused for the thought: the full-width output alone, as with thinking off
                pass
    narrowed = constraint
    for p_index, ids in enumerate(prompts):
        constraint = narrowed
        params = resolve_params(state, body, len(ids), constraint)
        check_min_tokens(body, params.max_new_tokens)
        first = thought_room(constraint, params.max_new_tokens, len(ids), state.max_model_len,
                             state.canvas_length) if think_first else 0  # 0: no room, the answer alone
        if not first and constraint is not plain:  # no room to think (a long prompt): the output at full width
            constraint = plain
            params = resolve_params(state, body, len(ids), constraint)
        for j in range(body.n):
            choice_seed = (seed + j) % 2**63
            tracker = TextTracker(state.tokenizer, stops, keep_stop=body.include_stop_str_in_output,
                                  stop_ids=() if body.include_stop_str_in_output else eos,
                                  min_tokens=body.min_tokens,
                                  skip_special=body.skip_special_tokens, thoughts=thoughts,
                                  prefill=thoughts.prompt_thought(ids) if thoughts is not None else [])
            answer = None
            if first:  # the thought first (its opening token is part of the reply), then the constrained answer
                # a prompt that left the channel open (Gemma 4's generation prompt after a tool response): the
                # thought goes on in it, with no second `<|channel>`
                lead = () if tracker.prefill else (thoughts.open_id,)
                if lead:
                    tracker.add(list(lead))
                answer = ThoughtFirst(tuple(ids), params, choice_seed, eos, constraint, thoughts.close_id,
                                      answer_need(constraint, state.canvas_length))
                req = GenerationRequest(uuid.uuid4().hex, (*ids, *lead),
                                        dataclasses.replace(params, max_new_tokens=first), choice_seed,
                                        eos + (thoughts.close_id,), None, body.stream_drafts, bias, body.priority,
                                        0, state.adapter(body.model), images=getattr(ids, "images", None),
                                        thinking=budget)
            else:  # a constrained output alone writes no thought: its budget is met
                req = GenerationRequest(uuid.uuid4().hex, tuple(ids), params, choice_seed,
                                        eos, constraint, body.stream_drafts, bias, body.priority, body.min_tokens,
                                        state.adapter(body.model), images=getattr(ids, "images", None),
                                        thinking=budget if constraint is None else None, stops_late=bool(stops))
            choices.append(Choice(len(choices), req, p_index, tracker, answer=answer, base=len(tracker.ids)))
    return choices


def thinking_on(state: ServerState, body: _Common) -> bool:
    """The chat template renders this body with thinking mode on (enable_thinking, from the request or the
    server's --default-chat-template-kwargs), and the reply starts a new assistant turn."""
    if not hasattr(body, "template_kwargs"):
        return False
    kwargs = {**getattr(state.tokenizer, "template_defaults", {}), **body.template_kwargs()}
    return (bool(kwargs.get("enable_thinking")) and not kwargs.get("continue_final_message")
            and kwargs.get("add_generation_prompt", True))


async def run_choices(state: ServerState, choices: list[Choice], is_disconnected=None):
    """Submit every choice and yield ("reasoning" | "delta" | "draft" | "finish", choice index, payload) until all
    finish ("reasoning": new text of a chat reply's thought channel)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    by_id = {c.request.request_id: c for c in choices}
    for c in choices:
        state.engine.submit(c.request, queue, loop)
    live, ended = set(by_id), {}  # ended: replies cut by a stop string, whose Finish (their counts) is due -> the
    # passes up to the canvas cut (None, for a Commit that carries none: the Finish's count)
    check_at = loop.time() + DISCONNECT_CHECK_S
    try:
        while live:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                ev = None
            if is_disconnected is not None and loop.time() >= check_at:  # however fast events come
                check_at = loop.time() + DISCONNECT_CHECK_S
                if await is_disconnected():
                    return
            if ev is None:
                continue
            c = by_id[ev.request_id]
            if ev.request_id not in live:
                continue
            if ev.request_id in ended:  # the client has its reply; only the Finish's counts are left to read
                if isinstance(ev, Finish):
                    live.discard(ev.request_id)
                    c.count(ev, ended[ev.request_id])
                continue
            if isinstance(ev, Commit):
                c.canvases = c.canvas_base + ev.canvas_index + 1
                c.tracker.add(ev.token_ids)
                sent = c.tracker.sent
                thought = c.tracker.reasoning_delta(final=c.tracker.stopped)
                text = c.tracker.delta(final=c.tracker.stopped)
                at = c.tracker.thought_at()  # in the order the model wrote them: a thought may follow text
                k = 0 if at is None else min(max(at - sent, 0), len(text))
                pieces = [("delta", text[:k]), ("reasoning", thought), ("delta", text[k:])]
                for kind, payload in pieces:
                    if payload:
                        yield kind, c.index, payload
                if c.tracker.stopped and not text:
                    yield "delta", c.index, ""
                if c.tracker.stopped:
                    state.engine.cancel(ev.request_id, "stop")
                    ended[ev.request_id] = ev.decoder_passes or None
                    c.finish_reason = "stop"
                    yield "finish", c.index, "stop"
            elif isinstance(ev, Draft):
                yield "draft", c.index, draft_payload(state, c, ev)
            elif isinstance(ev, Finish):
                live.discard(ev.request_id)
                c.count(ev)
                if ev.reason == "error" and c.request.lora and \
                        c.request.lora not in {i for i, _ in state.loras.values()}:  # lost a race with an unload
                    raise APIError(404, "the LoRA adapter this request named was unloaded before its generation "
                                        "could run; name a served model (GET /v1/models)", "model",
                                   code="model_not_found")
                if ev.reason in ("error", "cancelled"):
                    raise APIError(500 if ev.reason == "error" else 503,
                                   f"generation failed: {ev.message or ev.reason}", type="server_error")
                c.finish_reason = ev.reason
                if c.answer is not None:  # a thought-first reply's thought has ended: its answer follows
                    follow, c.answer = c.answer.request(state, c), None
                    if follow is not None:
                        thought = c.tracker.reasoning_delta(final=True)
                        if thought:
                            yield "reasoning", c.index, thought
                        c.request, c.base, c.finish_reason = follow, len(c.tracker.ids), None
                        c.canvas_base = c.canvases  # the answer's canvases number on from the thought's
                        by_id[follow.request_id] = c
                        live.add(follow.request_id)
                        state.engine.submit(follow, queue, loop)
                        continue
                thought = c.tracker.reasoning_delta(final=True)
                if thought:
                    yield "reasoning", c.index, thought
                text = c.tracker.delta(final=True)
                if text:
                    yield "delta", c.index, text
                yield "finish", c.index, c.finish_reason
    finally:
        for rid in live:  # the client left, or an error: free the slots
            state.engine.cancel(rid)


async def run_to_end(state: ServerState, choices: list[Choice], request) -> None:
    """Run every choice to its end (not streamed: the trackers hold the text); a 499 if the client left."""
    async with contextlib.aclosing(run_choices(state, choices, request.is_disconnected)) as events:
        async for _ in events:
            pass
    if any(c.finish_reason is None for c in choices):
        raise APIError(499, "client closed the request", type="client_closed")


def draft_payload(state: ServerState, c: Choice, ev: Draft) -> dict:
    """The draft of the canvas being denoised: its argmax, cut at the first EOS and at the token budget."""
    ids = list(ev.token_ids[:max(0, c.request.params.max_new_tokens - (len(c.tracker.ids) - c.base))])
    cut = next((i for i, t in enumerate(ids) if t in state.eos_ids), None)
    if cut is not None:
        ids = ids[:cut + 1]
    return {"index": c.index, "canvas_index": c.canvas_base + ev.canvas_index, "denoise_step": ev.denoise_step,
            "text": state.tokenizer.decode(ids) if state.tokenizer is not None else "", "token_ids": ids}


def usage(choices: list[Choice], prompts: list[list[int]], passes: int | None = None) -> dict:
    """OpenAI's usage of these choices; passes: the decoder passes so far, when some choices still run (their
    own count grows only as each engine request ends)."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.tracker.ids) for c in choices)
    passes = sum(c.decoder_passes for c in choices) if passes is None else passes
    cached = [0] * len(prompts)  # per prompt: the most any of its choices reused
    for c in choices:
        cached[c.prompt_index] = max(cached[c.prompt_index], c.cached_tokens)
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
           "total_tokens": prompt_tokens + completion, "decoder_passes": passes,
           "prompt_tokens_details": {"cached_tokens": sum(cached)}}
    thought = sum(thought_tokens(c) for c in choices)
    if thought:  # OpenAI's place for them: what the thought channels took of completion_tokens
        out["completion_tokens_details"] = {"reasoning_tokens": thought}
    return out


def thought_tokens(c: Choice) -> int:
    """Tokens of a chat reply's thought channel, its two markers included (usage's reasoning_tokens)."""
    return len(c.tracker.ids) - len(c.tracker.content_ids) if c.tracker.thoughts is not None else 0
