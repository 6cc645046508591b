"""CORS (`--allowed-origins`): a browser page from an allowed origin can call the API, preflight included,
even with an API key; other origins get no CORS headers; without the flag no response carries any."""

from __future__ import annotations

import argparse

import httpx
import pytest

from canvaslm.server.cli import _origins
from canvaslm.server.launch import BackgroundServer, build_state

ORIGIN = "https://ui.example.com"


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, one_thread):
    def start(origins):
        state = build_state(tiny_checkpoint, "cpu", "float32", served_model_name="tiny", api_key="k")
        state.allowed_origins = origins
        return BackgroundServer(state)

    with start((ORIGIN,)) as cors, start(()) as plain:
        yield cors, plain


def test_allowed_origin_gets_cors_headers_and_preflight(servers):
    cors, plain = servers
    pre = httpx.options(cors.base_url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = httpx.get(cors.base_url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    denied = httpx.get(cors.base_url + "/v1/models", headers={"Origin": ORIGIN})  # no key: still 401
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(cors.base_url + "/v1/models", headers={"Origin": "https://evil.example",
                                                             "Authorization": "Bearer k"})
    assert "access-control-allow-origin" not in other.headers
    r = httpx.get(plain.base_url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer k"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_origins_flag_parses_and_refuses_non_origins():
    assert _origins("https://a.example/, http://b.example:8080") == ("https://a.example", "http://b.example:8080")
    assert _origins("*") == ("*",)
    with pytest.raises(argparse.ArgumentTypeError, match="'a.example' is not an origin"):
        _origins("a.example")


def test_api_key_defaults_to_the_environment(monkeypatch, tiny_checkpoint):
    from canvaslm.cli import build_parser

    monkeypatch.setenv("CANVASLM_API_KEY", "from-env")
    assert build_parser().parse_args(["serve", str(tiny_checkpoint)]).api_key == "from-env"
    assert build_parser().parse_args(["serve", str(tiny_checkpoint), "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("CANVASLM_API_KEY")
    args = build_parser().parse_args(["serve", str(tiny_checkpoint), "--allowed-origins", "*"])
    assert args.api_key is None and args.allowed_origins == ("*",)
