"""A tool call's constraint compiles under one limit (a server's --regex-timeout) for the whole call: the
functions of a "required" choice share it, and running out names `tools[i]` and the function."""

from __future__ import annotations

import time

import pytest

from canvaslm.sampling import tool_call
from canvaslm.sampling.constraints import ConstraintError
from canvaslm.sampling.tool_call import call_constraint

HUGE = {"type": "object", "properties": {"x": {"enum": [f"v{i:05d}" for i in range(30000)]}}}  # ~20 s unlimited


def _tool(name: str, parameters: dict | None = None) -> dict:
    fn = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": fn}


def test_the_functions_of_a_choice_share_one_limit(tiny_llm, monkeypatch):
    """Each schema gets what the ones before it left, and the one that finds none left is named."""
    real, given = tool_call.JsonSchemaConstraint, []

    def slow(schema, tokenizer, *args, timeout=None, **kwargs):
        given.append(timeout)
        time.sleep(0.2)
        return real(schema, tokenizer, *args, timeout=timeout, **kwargs)

    monkeypatch.setattr(tool_call, "JsonSchemaConstraint", slow)
    tools = [_tool(n) for n in "abc"]
    call_constraint(tools, "required", tiny_llm.tokenizer, timeout=5.0)
    assert len(given) == 3 and given[0] <= 5.0 and all(b <= a - 0.2 for a, b in zip(given, given[1:])), given
    given.clear()
    with pytest.raises(ConstraintError, match=r"tools\[2\]\.function\.parameters of 'c': compiling the tool call "
                                              r"took longer than the limit of 0\.3 s \(all 3 functions"):
        call_constraint(tools, "required", tiny_llm.tokenizer, timeout=0.3)
    assert len(given) == 2  # the third was not started


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "g"}}])
def test_a_slow_schema_stops_at_the_limit(tiny_llm, choice):
    """A huge enum, forced by name or among several functions, ends in a ConstraintError at the limit."""
    tools = [_tool("f"), _tool("g", HUGE)]
    start = time.monotonic()
    with pytest.raises(ConstraintError, match=r"tools\[1\]\.function\.parameters of 'g': .*longer than the "
                                              r"limit of 0\.3 s"):
        call_constraint(tools, choice, tiny_llm.tokenizer, timeout=0.3)
    assert time.monotonic() - start < 5


def test_without_a_limit_nothing_changes(tiny_llm):
    c, forced = call_constraint([_tool("f", {"type": "object", "properties": {"x": {"enum": ["a", "b"]}}})],
                                "required", tiny_llm.tokenizer)
    assert forced == "f" and c.template_tokens() > 0
