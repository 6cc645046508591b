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

"auto" would have the model choose between text and calls written in its own call syntax, which needs
a parser for that syntax; this server refuses it by name instead of returning calls as plain text.
"""

from __future__ import annotations

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
    if choice == "auto":
        return "tool_choice", ("tool_choice 'auto' is not supported (it needs a parser for the model's own "
                               "tool-call syntax): send 'required' (the model picks one of the tools), name "
                               "the function, e.g. {'type': 'function', 'function': {'name': ...}}, or 'none'")
    if choice != "required" and choice.function.name not in names:
        return "tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools {names}"
    if body.stop_list():
        return "stop", "stop strings would cut a tool call's arguments; send no stop with a tool call"
    others = [n for n in ("guided_json", "guided_choice", "guided_regex") if getattr(body, n) is not None]
    if body.response_format is not None and body.response_format.type != "text":
        others.append("response_format")
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


def chosen_tools(body) -> list | None:
    """The tools the model picks one of ("required" among several), or None."""
    tools = getattr(body, "tools", None) or []
    return tools if len(tools) > 1 and getattr(body, "tool_choice", None) == "required" else None


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolReply:
    """One choice's tool call, read from its committed text: the arguments themselves (a forced call) or
    the `{"name", "arguments"}` output of a choice among several functions (sampling/tool_call.py)."""

    def __init__(self, forced=None, tools=None):
        self.forced, self.names = forced, [t.function.name for t in (tools or [])]
        self.id, self.name = call_id(), forced.function.name if forced is not None else None
        self.sent = 0  # characters of the arguments already streamed

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
        delta = {"role": "assistant", "content": None}
        if self.name is not None:
            delta["tool_calls"] = [self.header()]
        return delta

    def deltas(self, text: str) -> list[dict]:
        """Stream deltas for the text so far: the call's header when the name becomes known, then new
        argument characters."""
        known = self.name is not None
        args = self._arguments(text)
        out = []
        if not known and self.name is not None:
            out.append({"tool_calls": [self.header()]})
        if args is not None and len(args) > self.sent:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": args[self.sent:]}}]})
            self.sent = len(args)
        return out

    def message(self, text: str) -> dict:
        from ..sampling.tool_call import call_arguments

        try:
            name, args = call_arguments(text, self.names, self.name if self.forced is not None else None)
        except ValueError:  # cut short (length): what there is, as text
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": self.id, "type": "function", "function": {"name": name, "arguments": args}}]}


def finish_reason(reason: str | None) -> str | None:
    return "tool_calls" if reason == "stop" else reason  # the call is complete (EOS after its arguments)


__all__ = ["tool_choice_problem", "forced_tool", "chosen_tools", "ToolReply",
           "finish_reason"]
