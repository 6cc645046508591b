"""A forced tool call's schema compiles under --regex-timeout, as response_format's does: a schema too slow
to compile ends in a 400 naming `tools` and the function at the limit (it held a compile worker for minutes)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from canvaslm.server.launch import BackgroundServer, build_state

TIMEOUT = 0.5  # the server's --regex-timeout
HUGE = {"type": "object", "properties": {"x": {"enum": [f"v{i:05d}" for i in range(30000)]}}}  # ~20 s unlimited
SMALL = {"type": "object", "properties": {"x": {"enum": ["a", "b"]}}, "required": ["x"]}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, one_thread):
    with BackgroundServer(build_state(tiny_checkpoint, "cpu", "float32", served_model_name="tiny",
                                      regex_timeout=TIMEOUT)) as srv:
        yield srv


def _tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def _chat(srv, tools: list, tool_choice) -> tuple:
    start = time.monotonic()
    r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60,
                   json=dict(model="tiny", messages=USER, max_tokens=32, tools=tools, tool_choice=tool_choice))
    return r, time.monotonic() - start


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "slow"}}, "required"])
def test_a_slow_tool_schema_stops_at_the_limit(server, tool_choice):
    """Named, or among several functions ("required"): a 400 naming tools and the function, at the limit."""
    r, took = _chat(server, [_tool("fast", SMALL), _tool("slow", HUGE)], tool_choice)
    assert r.status_code == 400 and took < 10, r.text
    error = r.json()["error"]
    assert error["param"] == "tools", error
    assert "tools[1].function.parameters of 'slow'" in error["message"], error
    # the limit left when the compile starts (counted from arrival, to a tenth of a second up)
    limit = re.search(r"longer than the limit of ([0-9.]+) s", error["message"])
    assert limit and 0 < float(limit[1]) <= TIMEOUT, error


def test_a_quick_tool_schema_still_compiles(server):
    r, _ = _chat(server, [_tool("fast", SMALL)], "required")
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "fast" and call["function"]["arguments"] in ('{"x": "a"}', '{"x": "b"}')
