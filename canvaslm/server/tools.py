"""Tool calls on /v1/chat/completions: a forced call is generated under the function's parameter schema.

With `tool_choice` naming a function (or "required" and a single tool), the assistant turn is that
function's call, so only its arguments are generated: the request gets the canvas constraint of the JSON
schema in `parameters` (sampling/json_schema.py), and the committed text always parses and fits the
schema. The response carries it as `message.tool_calls[0].function.arguments` (content null), with
finish_reason "tool_calls"; a stream sends the call's id and name first and the arguments as they
commit. The declarations go to the chat template as `tools` (the model sees them as it was trained to)
and earlier calls and tool results in `messages` render through the template too.

"auto" (and "required" among several tools) would have the model choose between text and calls in its
own call syntax, which needs a parser for that syntax; this server refuses it by name instead of
returning calls as plain text.
"""

from __future__ import annotations

import uuid

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


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
                               "tool-call syntax): name the function, e.g. {'type': 'function', 'function': "
                               "{'name': ...}}, send 'required' with one tool, or 'none'")
    if choice == "required" and len(tools) > 1:
        return "tool_choice", (f"tool_choice 'required' among {len(tools)} tools is not supported: name the "
                               "function to call")
    if choice != "required" and choice.function.name not in names:
        return "tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools {names}"
    if body.stop_list():
        return "stop", "stop strings would cut a tool call's arguments; send no stop with a forced tool call"
    others = [n for n in ("guided_json", "guided_choice", "guided_regex") if getattr(body, n) is not None]
    if body.response_format is not None and body.response_format.type != "text":
        others.append("response_format")
    if others:
        return "tool_choice", f"a forced tool call and {others[0]} both constrain the output; send one"
    return None


def forced_tool(body):
    """The Tool whose call the reply must be, or None (a plain-text reply)."""
    tools, choice = getattr(body, "tools", None) or [], getattr(body, "tool_choice", None)
    if not tools or choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return tools[0]
    return next(t for t in tools if t.function.name == choice.function.name)


def parameters_schema(tool) -> dict:
    return tool.function.parameters or EMPTY_PARAMETERS


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(tool, arguments: str, cid: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": tool.function.name, "arguments": arguments}}


__all__ = ["tool_choice_problem", "forced_tool", "parameters_schema", "call_id", "tool_call"]
