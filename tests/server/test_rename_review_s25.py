"""Review fixes (s25): an error of a translated body is said in the route's own terms, but the request's own
names stay as it sent them (a model, tool or schema property called "stop" or "max_tokens" is not a chat
field); /v1/embeddings on a vision model refuses an image token with no image, as the generating routes do."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import build_vision_chat_checkpoint

from canvaslm.config import DiffusionParams
from canvaslm.engine.engine import EngineConfig
from canvaslm.server.anthropic import MESSAGES_NAMES
from canvaslm.server.launch import BackgroundServer, build_state
from canvaslm.server.llamacpp import LLAMA_PARAMS
from canvaslm.server.responses import CHAT_TO_RESPONSES, RENAMED_IN_TEXT
from canvaslm.server.serving import APIError, renamed

OLLAMA = {"max_tokens": "num_predict", "response_format": "format"}  # ollama.py's errors_named
ANTHROPIC = (MESSAGES_NAMES, tuple(MESSAGES_NAMES))
LLAMA = (LLAMA_PARAMS, ("max_tokens", "guided_grammar", "guided_json"))


def said(message: str, param: str, names: dict, in_text: tuple) -> tuple[str, str]:
    e = renamed(APIError(400, message, param), dict(names), in_text)
    return e.message, e.param


@pytest.mark.parametrize("message, param, names, want", [
    # the request's own quoted names
    ("model 'stop' does not exist; this server serves ['tiny']", "model", ANTHROPIC,
     ("model 'stop' does not exist; this server serves ['tiny']", "model")),
    ("tool_choice names 'go', which is not in tools ['stop']", "tool_choice", ANTHROPIC,
     ("tool_choice names 'go', which is not in tools ['stop']", "tool_choice")),
    ('stop: the stop string "it\'s stop" is too long', "stop", ANTHROPIC,
     ('stop_sequences: the stop_sequences string "it\'s stop" is too long', "stop_sequences")),
    # schema paths and JSON pointers
    ("response_format: json_schema: type 'nope' is not supported (at $.stop)", "response_format", ANTHROPIC,
     ("output_config.format: json_schema: type 'nope' is not supported (at $.stop)", "output_config.format")),
    ("response_format: json_schema: type 'nope' is not supported (at $.max_tokens)", "response_format",
     (OLLAMA, tuple(OLLAMA)), ("format: json_schema: type 'nope' is not supported (at $.max_tokens)", "format")),
    ("guided_json: json_schema: type 'nope' is not supported (at $.a max_tokens)", "guided_json", LLAMA,
     ("json_schema: type 'nope' is not supported (at $.a max_tokens)", "json_schema")),
    ("guided_json: json_schema: recursive $ref #/$defs/max_tokens -> #/$defs/max_tokens (at $.x) is not "
     "supported within max_tokens", "guided_json", LLAMA,
     ("json_schema: recursive $ref #/$defs/max_tokens -> #/$defs/max_tokens (at $.x) is not supported within "
      "n_predict", "json_schema")),
    ("response_format: json_schema: type 'nope' is not supported (at $.max_tokens)", "response_format",
     (CHAT_TO_RESPONSES, RENAMED_IN_TEXT),
     ("text: json_schema: type 'nope' is not supported (at $.max_tokens)", "text")),
    # a sub-field's key is not the top-level field
    ("logit_bias.max_tokens: not a token id", "logit_bias", (OLLAMA, tuple(OLLAMA)),
     ("logit_bias.max_tokens: not a token id", "logit_bias")),
    # the message's own words still are renamed (existing behaviour)
    ("response_format: json_schema: the output template is over max_tokens=3", "response_format",
     (OLLAMA, tuple(OLLAMA)), ("format: json_schema: the output template is over num_predict=3", "format")),
    ("tool_choice 'required' needs tools", "tool_choice", ANTHROPIC, ("tool_choice 'any' needs tools", "tool_choice")),
    ("messages[0].content: 'messages' is not a role", "messages", (CHAT_TO_RESPONSES, RENAMED_IN_TEXT),
     ("input[0].content: 'messages' is not a role", "input")),
])
def test_renamed_keeps_the_requests_own_names(message, param, names, want):
    assert said(message, param, *names) == want


# --- over HTTP, on a vision chat model --------------------------------------------------------------------

MODEL = "tiny-vision"
U = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_chat")
    build_vision_chat_checkpoint(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = build_state(out, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=512), served_model_name=MODEL,
                        defaults=DiffusionParams(max_new_tokens=8, max_denoising_steps=2, eos_token_ids=(1, 4),
                                                 pad_token_id=0))
    with BackgroundServer(state) as srv:
        yield srv, state
    torch.set_num_threads(threads)


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, timeout=120)


def test_route_errors_keep_the_requests_names(server):
    srv, _ = server
    r = post(srv, "/v1/messages", {"model": "stop", "max_tokens": 8, "messages": U})
    assert r.status_code == 404 and "model 'stop' does not exist" in r.json()["error"]["message"]
    r = post(srv, "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": U,
                                   "tools": [{"name": "stop", "input_schema": {"type": "object"}}],
                                   "tool_choice": {"type": "tool", "name": "go"}})
    assert r.status_code == 400 and "tools ['stop']" in r.json()["error"]["message"]
    bad = {"type": "object", "properties": {"max_tokens": {"type": "nope"}}}
    r = post(srv, "/api/chat", {"model": MODEL, "stream": False, "messages": U, "format": bad})
    assert r.status_code == 400 and r.json()["error"].endswith("(at $.max_tokens)")
    r = post(srv, "/completion", {"prompt": "hi", "n_predict": 60, "json_schema": bad})
    assert r.status_code == 400 and r.json()["error"]["message"].endswith("(at $.max_tokens)")


def test_embeddings_refuse_an_image_token_without_an_image(server):
    srv, state = server
    image = state.vision.cfg.image_token_id
    want = f"the prompt holds image tokens (id {image}) but no image was given"
    for body in ({"model": MODEL, "input": "look <|image|> here"}, {"model": MODEL, "input": [[30, 31], [32, image]]}):
        r = post(srv, "/v1/embeddings", body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "input" and want in r.json()["error"]["message"]
    assert "input[1]: " in r.json()["error"]["message"]
    r = post(srv, "/api/embed", {"model": MODEL, "input": "look <|image|> here"})  # Ollama's, on the same code
    assert r.status_code == 400 and want in r.json()["error"]
    r = post(srv, "/v1/embeddings", {"model": MODEL, "input": "look here"})  # text alone still embeds
    assert r.status_code == 200 and len(r.json()["data"]) == 1
