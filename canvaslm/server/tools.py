"""Tool calls on /v1/chat/completions: the reply is a call whose arguments fit the function's schema.

With `tool_choice` naming a function (or "required" and a single tool), only the arguments are
generated, under the canvas constraint of the JSON schema in `parameters` (sampling/json_schema.py).
With "required" among several tools, the model also picks the function: the output is
`{"name": ..., "arguments": ...}` laid out by sampling/tool_call.py (the name in the first canvases,
then the chosen function's arguments template). Either way the committed arguments always parse and
fit the schema. The response carries them as `message.tool_calls[0].function.arguments` (content
null) with finish_reason "tool_calls"; a stream sends the call's id and name as soon as they are known
and the arguments as they commit. The declarations go to the chat template as `tools` and earlier
calls and tool results in `messages` render through the template too.

With "auto" (the default when tools are given) the model writes freely: text, calls in its own
syntax, or both, and `tool_parser.NativeToolParser` reads the calls out of its tokens. That needs the
checkpoint's tokenizer to have the call tokens (Gemma 4's vocabulary has them); without them "auto" is refused
by name rather than returning calls as plain text.
"""

from __future__ import annotations

import json
import uuid

def tool_choice_problem(body) -> tuple[str, str] | None:
    """(field, message) when tools / tool_choice ask for something this server cannot do, else None."""
    tools, choice = body.tools or [], body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return None
    if not tools:
        shown = repr(choice) if isinstance(choice, str) else f"naming {choice.function.name!r}"
        return "tool_choice", f"tool_choice {shown} needs tools"
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        return "tools", "tools declares a function name twice"
    if choice not in ("required", "auto") and choice.function.name not in names:
        return "tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools {names}"
    if body.stop_list() and choice != "auto":
        return "stop", "stop strings would cut a tool call's arguments; send no stop with a tool call"
    if getattr(body, "stop_token_ids", None) and choice != "auto":
        return "stop_token_ids", "stop_token_ids would cut a tool call's arguments; send none with a tool call"
    others = body.constraint_fields()
    if others:
        return "tool_choice", f"a tool call and {others[0]} both constrain the output; send one"
    return None


def forced_tool(body):
    """The Tool whose call the reply must be, or None (plain text, or a choice among several tools)."""
    tools, choice = getattr(body, "tools", None) or [], getattr(body, "tool_choice", None)
    if not tools or choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return tools[0] if len(tools) == 1 else None
    return next(t for t in tools if t.function.name == choice.function.name)


def auto_tools(body) -> bool:
    """Whether the model may call tools in its own syntax ("auto", the default with tools)."""
    return bool(getattr(body, "tools", None)) and getattr(body, "tool_choice", None) in (None, "auto")


# what "auto" is called, and the tool_choice values advised instead of it, in OpenAI's terms (another API's
# route passes its own: the advice must be a body that route takes)
OPENAI_AUTO = ("tool_choice 'auto'", "send 'required' (the model picks one of the tools), name the function, e.g. "
               "{'type': 'function', 'function': {'name': ...}}, or 'none'")


def auto_problem(tokenizer, terms: tuple[str, str] = OPENAI_AUTO) -> str | None:
    """Why "auto" cannot run with this tokenizer, or None; `terms`: (what "auto" is called, what to send instead)."""
    from ..tool_parser import CALL_OPEN, NativeToolParser

    if tokenizer is None or NativeToolParser.for_tokenizer(tokenizer) is None:
        auto, instead = terms
        return (f"{auto} reads calls in the model's own syntax ({CALL_OPEN}...), and this checkpoint's "
                f"tokenizer has no such tokens: {instead}")
    return None


def chosen_tools(body) -> list | None:
    """The tools the model picks one of ("required" among several), or None."""
    tools = getattr(body, "tools", None) or []
    return tools if len(tools) > 1 and getattr(body, "tool_choice", None) == "required" else None


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolReply:
    """One choice's tool calls, read from its committed output: the arguments themselves (a forced call),
    the `{"name", "arguments"}` output of a choice among several functions (sampling/tool_call.py), or,
    with `parser` ("auto"), text and calls in the model's own syntax (tool_parser.py)."""

    def __init__(self, forced=None, tools=None, parser=None, parallel: bool = True, thinking: bool = False):
        self.forced, self.parser, self.parallel = forced, parser, parallel
        self.names = [t.function.name for t in (tools or [])]
        self.id, self.name = call_id(), forced.function.name if forced is not None else None
        self.sent = 0  # characters of the arguments (of the content, with a parser) already streamed
        self.calls_sent = 0  # with a parser: calls already streamed
        # a forced call's header waits for the answer when a thought comes first (the thought streams before
        # it, and may end the reply without a call)
        self.thinking, self.announced = thinking, False

    def _arguments(self, text: str) -> str | None:
        """The arguments visible in `text` so far (None while the name is unknown)."""
        if self.forced is not None:
            return text
        from ..sampling.tool_call import split_call

        split = split_call(text, self.names)
        if split is None:
            return None
        self.name = split[0]
        body = text[split[1]:].rstrip()
        # a '}' at the end may be the wrapper's: held back until more text follows it (at the end it is)
        return body[:-1] if body.endswith("}") else body

    def header(self) -> dict:
        return {"index": 0, "id": self.id, "type": "function", "function": {"name": self.name, "arguments": ""}}

    def first_delta(self) -> dict:
        if self.parser is not None:
            return {"role": "assistant", "content": ""}
        delta = {"role": "assistant", "content": None}
        if self.name is not None and not self.thinking:
            delta["tool_calls"] = [self.header()]
            self.announced = True
        return delta

    def deltas(self, text: str, tracker) -> list[dict]:
        """Stream deltas for the output so far: its streamed text, and the choice's TextTracker (a parser
        reads its ids)."""
        if self.parser is not None:
            return self._native_deltas(tracker, final=False)
        args = self._arguments(text)
        out = []
        if not self.announced and self.name is not None:
            out.append({"tool_calls": [self.header()]})
            self.announced = True
        if args is not None and len(args) > self.sent:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": args[self.sent:]}}]})
            self.sent = len(args)
        return out

    def final_deltas(self, tracker) -> list[dict]:
        """What is left to stream once the output is complete (a parser's unfinished call, as text)."""
        return self._native_deltas(tracker, final=True) if self.parser is not None else []

    def _calls(self, tracker, final: bool) -> tuple[str, list]:
        """A parser's (content, calls) of the tracker's ids, its text cut as the tracker cuts the plain reply
        (the stop token left out, a stop string cut, a possible stop string's start held back while
        streaming); the first call alone with parallel_tool_calls false."""
        content, calls = self._calls_at(tracker, final)
        return content, [(name, args) for name, args, _ in calls]

    def _calls_at(self, tracker, final: bool) -> tuple[str, list]:
        """As `_calls`, each call with its offset in the content (tool_parser.split_at)."""
        content, calls, _ = self.parser.split_at(tracker.shown_ids(), final=final or tracker.stopped)
        if tracker.stopped:  # the ids end at the token completing the stop string: its last occurrence
            at = content.rfind(tracker.stop_word)
            if at >= 0:
                content = content[:at + (len(tracker.stop_word) if tracker.keep_stop else 0)]
        elif not final:
            content = tracker.held(content)
        calls = [(name, args, min(at, len(content))) for name, args, at in calls]
        return content, calls if self.parallel else calls[:1]

    def call_offsets(self, tracker) -> list[int] | None:
        """Where in the finished reply's content each of its calls (`message`'s tool_calls, in order) sat; None
        for a reply that is a call alone (forced or chosen: no text around it)."""
        if self.parser is None:
            return None
        return [at for _, _, at in self._calls_at(tracker, True)[1]]

    def _native_deltas(self, tracker, final: bool) -> list[dict]:
        content, calls = self._calls(tracker, final)
        content = content if final else content.rstrip("\ufffd")  # a character still being spelled
        out = []
        if len(content) > self.sent:
            out.append({"content": content[self.sent:]})
            self.sent = len(content)
        for k in range(self.calls_sent, len(calls)):
            name, args = calls[k]
            out.append({"tool_calls": [{"index": k, "id": call_id(), "type": "function",
                                        "function": {"name": name, "arguments": args}}]})
        self.calls_sent = max(self.calls_sent, len(calls))
        return out

    def message(self, tracker) -> dict:
        """The finished reply's message, from its TextTracker."""
        text = tracker.text
        if self.parser is not None:
            content, calls = self._calls(tracker, True)
            msg = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                msg["tool_calls"] = [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                                     for n, a in calls]
            return msg
        from ..sampling.tool_call import call_arguments

        try:
            name, args = call_arguments(text, self.names, self.name if self.forced is not None else None)
        except ValueError:  # cut short (length): what there is, as text
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": self.id, "type": "function", "function": {"name": name, "arguments": args}}]}

    def finish_reason(self, reason: str | None, tracker) -> str | None:
        """"tool_calls" when the reply is (or has) a complete call and ended at EOS."""
        if reason != "stop":
            return reason
        return "tool_calls" if self.message(tracker).get("tool_calls") else reason


def call_offsets(choice, replies: dict, message: dict) -> list[int] | None:
    """Where in a finished reply's content each of its tool calls sat (ToolReply.call_offsets), for APIs whose
    replies are ordered items; None when the reply has no calls or is a call alone."""
    reply = replies.get(choice.index)
    return reply.call_offsets(choice.tracker) if reply is not None and message.get("tool_calls") else None


def text_around_calls(message: dict, calls_at: list | None) -> list[str]:
    """A reply's content cut at its calls: the text before each call, then the text after the last (one piece
    when it has none). Without offsets, all of the text comes before the calls."""
    text, n = message.get("content") or "", len(message.get("tool_calls") or [])
    if calls_at is None or len(calls_at) != n:
        calls_at = [len(text)] * n
    bounds = [0, *calls_at, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def arguments_object(arguments: str | None) -> dict:
    """A call's JSON arguments as an object, for APIs that send them parsed (Anthropic's `input`, Ollama's
    `arguments`): text that is not a JSON object is kept under "arguments" rather than lost."""
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        return {"arguments": arguments}
    return args if isinstance(args, dict) else {"arguments": arguments}


def reply_message(choice, replies: dict) -> dict:
    """A finished choice's chat reply: its tool calls read out where it is a tool reply, else its text."""
    if choice.index in replies:
        return replies[choice.index].message(choice.tracker)
    return {"role": "assistant", "content": choice.tracker.text}


def tool_replies(state, body, choices) -> dict:
    """choice index -> ToolReply for a reply that is (or may be) a tool call; {} for plain text."""
    forced, among = forced_tool(body), chosen_tools(body)
    if forced is not None or among is not None:
        return {c.index: ToolReply(forced, among, thinking=c.answer is not None) for c in choices}
    if auto_tools(body):
        from ..tool_parser import NativeToolParser

        # serving.prepare checked that there is one
        parser = NativeToolParser.for_tokenizer(state.tokenizer, [t.function.name for t in body.tools or ()])
        parallel = getattr(body, "parallel_tool_calls", None) is not False
        return {c.index: ToolReply(parser=parser, parallel=parallel) for c in choices}
    return {}


__all__ = ["arguments_object", "call_offsets", "text_around_calls", "reply_message", "tool_choice_problem", "forced_tool", "chosen_tools", "auto_tools",
           "auto_problem", "OPENAI_AUTO", "ToolReply", "tool_replies"]
