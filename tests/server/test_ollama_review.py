"""Ollama's API (server/ollama.py) where it answered otherwise than Ollama's Go server: the liveness probe, `think`
on a model that cannot think, raw mode's conflicts, `format` with a raw prompt, empty embedding requests, the
values Go reads leniently, a bad `context`, and /api/embed's `dimensions`."""

from __future__ import annotations

import math

import httpx
import pytest

from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state

MODEL = "tiny"
ASK = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def server(translated_api_server):
    return translated_api_server


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + route, json={"model": MODEL, "stream": False, **body}, timeout=120)


def refused(r: httpx.Response, needle: str) -> None:
    assert r.status_code == 400 and set(r.json()) == {"error"} and needle in r.json()["error"], r.text


def test_the_base_url_says_ollama_is_running(server):
    """The `ollama` CLI sends HEAD / and Page Assist GET / before anything else."""
    got = httpx.get(server.base_url + "/")
    assert got.status_code == 200 and got.text == "Ollama is running"
    assert got.headers["content-type"].startswith("text/plain")
    assert httpx.head(server.base_url + "/").status_code == 200


def test_think_is_refused_where_ollama_refuses_it(server):
    assert "thinking" not in post(server, "/api/show", {}).json()["capabilities"]
    for think in (True, "high", "max"):  # this vocabulary has no thought channel
        refused(post(server, "/api/chat", {"messages": ASK, "think": think}), '"tiny" does not support thinking')
        refused(post(server, "/api/generate", {"prompt": "x", "think": think}), '"tiny" does not support thinking')
    refused(post(server, "/api/chat", {"messages": [], "think": True}), "does not support thinking")  # a load too
    for think in ("bogus", "false", "true", ""):  # Go's: true, false or a level
        refused(post(server, "/api/chat", {"messages": ASK, "think": think}), f"invalid think value: {think!r}")
    refused(post(server, "/api/generate", {"prompt": "x", "raw": True, "think": True}), "think needs the chat template")
    ok = post(server, "/api/chat", {"messages": ASK, "think": False, "options": {"num_predict": 2}})
    assert ok.status_code == 200 and ok.json()["done"]


@pytest.mark.parametrize("body,needle", [
    ({"raw": True, "system": "be a pirate"}, "raw mode does not support template, system, or context (got system)"),
    ({"raw": True, "context": [1, 2]}, "(got context)"),
    ({"raw": True, "template": "{{ .Prompt }}", "system": "s"}, "(got template, system)"),
    ({"template": "{{ .Prompt }}"}, "template: this server renders the checkpoint's own chat template"),
    ({"suffix": " + 1", "system": "s"}, "system cannot be combined with suffix"),
    ({"suffix": " + 1", "context": [1]}, "context cannot be combined with suffix"),
    ({"suffix": " + 1", "format": "json"}, "format cannot be combined with suffix"),
    ({"context": [999999]}, "context token ids [999999] are outside the vocabulary"),
])
def test_generate_refuses_what_it_would_drop(server, body, needle):
    """Fields the prompt has no place for are refused by name (a raw system was dropped, a Go template ignored, a
    bad context named `prompt`), before an empty prompt's load answer, as Ollama checks them."""
    for prompt in ("x = ", ""):
        refused(post(server, "/api/generate", {"prompt": prompt, **body}), needle)


def test_format_applies_to_a_raw_prompt(server):
    """As Ollama's: `format` with raw: true constrains the completion, as /v1/completions' response_format does."""
    import json

    r = post(server, "/api/generate", {"prompt": "x", "raw": True, "format": "json",
                                       "options": {"num_predict": 24, "seed": 3}})
    assert r.status_code == 200, r.text
    ref = httpx.post(server.base_url + "/v1/completions", json={
        "model": MODEL, "prompt": "x", "max_tokens": 24, "seed": 3, "response_format": {"type": "json_object"}},
        timeout=120).json()
    assert r.json()["response"] == ref["choices"][0]["text"]
    assert isinstance(json.loads(r.json()["response"]), dict)


def test_an_empty_embedding_request_loads_the_model(server):
    """Ollama answers an empty input with no vectors (clients send one to load the model); an empty string among
    other inputs is still a 400 naming it."""
    for body in ({"input": ""}, {"input": []}, {}):
        r = post(server, "/api/embed", body)
        assert r.status_code == 200 and r.json() == {"model": MODEL, "embeddings": []}, r.text
    for body in ({}, {"prompt": ""}):
        r = post(server, "/api/embeddings", body)
        assert r.status_code == 200 and r.json() == {"embedding": []}, r.text
    refused(post(server, "/api/embed", {"input": ["a", ""]}), "input[1] is empty")
    assert post(server, "/api/embed", {"model": "nope", "input": ""}).status_code == 404


def test_values_ollamas_go_server_reads(server):
    """A message's null content is "", and an integral float is an integer in an integer option, as Go reads
    them; a fraction is still refused by name."""
    opts = {"num_predict": 4, "seed": 2, "top_k": 20}
    history = [*ASK, {"role": "assistant", "content": ""}, {"role": "user", "content": "y"}]
    want = post(server, "/api/chat", {"messages": history, "options": opts}).json()["message"]["content"]
    history[1]["content"] = None
    floats = {k: float(v) for k, v in opts.items()}
    got = post(server, "/api/chat", {"messages": history, "options": floats})
    assert got.status_code == 200 and got.json()["message"]["content"] == want, got.text
    refused(post(server, "/api/chat", {"messages": ASK, "options": {"num_predict": 4.5}}), "options.num_predict")
    refused(post(server, "/api/chat", {"messages": ASK, "options": {"seed": True}}), "options.seed")


def test_embed_dimensions_cut_and_renormalise(server):
    """Ollama's `dimensions`: each vector's first n values, L2-normalised again; more than the model has is a 400."""
    full = post(server, "/api/embed", {"input": ["hello", "world"]}).json()["embeddings"]
    cut = post(server, "/api/embed", {"input": ["hello", "world"], "dimensions": 8}).json()["embeddings"]
    for whole, short in zip(full, cut):
        assert len(short) == 8 and math.fsum(x * x for x in short) == pytest.approx(1)
        scale = math.sqrt(math.fsum(x * x for x in whole[:8]))
        assert short == pytest.approx([x / scale for x in whole[:8]])
    width = server.state.hidden_size
    for whole in (0, width):
        assert post(server, "/api/embed", {"input": "hello", "dimensions": whole}).json()["embeddings"][0] == \
            pytest.approx(full[0])
    refused(post(server, "/api/embed", {"input": "hello", "dimensions": width + 1}),
            f"dimensions={width + 1} is over this model's {width}")
    refused(post(server, "/api/embed", {"input": "hello", "dimensions": -1}), "dimensions")


def test_think_runs_with_the_reasoning_parser_off(tmp_path):
    """--reasoning-parser none leaves the thought in the text; the model still thinks, so think is not refused."""
    from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN
    from canvaslm.testing import make_tiny_checkpoint

    state = build_state(make_tiny_checkpoint(tmp_path / "think", extra_specials=(CHANNEL_OPEN, CHANNEL_CLOSE)),
                        "cpu", "float32", EngineConfig(max_batch=2, max_model_len=256), served_model_name=MODEL)
    state.reasoning = False
    with BackgroundServer(state) as srv:
        r = post(srv, "/api/chat", {"messages": ASK, "think": True, "options": {"num_predict": 2}})
        assert r.status_code == 200 and r.json()["done"], r.text
