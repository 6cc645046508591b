"""A prompt whose images take it over the context is a 400 before the vision tower runs, and the routes that
only count (/tokenize, Anthropic count_tokens) never run the tower."""

from __future__ import annotations

import base64

import httpx
import pytest
import torch
from conftest import build_vision_chat_checkpoint, data_url, png

from canvaslm.config import DiffusionParams
from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state

MODEL = "tiny-vision"
DEFAULTS = DiffusionParams(max_new_tokens=16, max_denoising_steps=4, eos_token_ids=(1, 4), pad_token_id=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_chat_s25")
    build_vision_chat_checkpoint(out)  # 70 soft tokens an image at most
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = build_state(out, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=512, prefill_chunk=32,
                                                            prefix_store_len=300),
                        served_model_name=MODEL, defaults=DEFAULTS)
    calls = []
    encode = state.vision.encode
    state.vision.encode = lambda p: calls.append(1) or encode(p)  # count the tower's work
    with BackgroundServer(state) as srv:
        yield srv, calls
    torch.set_num_threads(threads)


def _messages(n: int, seed: int = 100) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": "hi"}] + [
        {"type": "image_url", "image_url": {"url": data_url(png(50, 70, seed + k))}} for k in range(n)]}]


def test_a_prompt_over_the_context_is_refused_before_the_tower_runs(served):
    """10 images of ~65 soft tokens: over max_model_len 512. Each image went through the tower first."""
    srv, calls = served
    calls.clear()
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": _messages(10),
                                                                "max_tokens": 4}, timeout=120)
    body = r.json()["error"]
    assert r.status_code == 400 and body["code"] == "context_length_exceeded" and body["param"] == "messages", r.text
    assert "maximum context length is 512 tokens" in body["message"] and "The prompt has" in body["message"]
    assert calls == []
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": _messages(1),
                                                                "max_tokens": 4, "seed": 1}, timeout=120)
    assert r.status_code == 200 and len(calls) == 1, r.text  # one that fits still reads its image


def test_counting_routes_never_run_the_tower(served):
    """/tokenize and count_tokens only count: no tower, and a prompt over the context is still counted."""
    srv, calls = served
    calls.clear()
    r = httpx.post(srv.base_url + "/tokenize", json={"model": MODEL, "messages": _messages(1, 7)}, timeout=120)
    assert r.status_code == 200, r.text
    counted = r.json()["count"]
    r = httpx.post(srv.base_url + "/tokenize", json={"model": MODEL, "messages": _messages(10)}, timeout=120)
    assert r.status_code == 200 and r.json()["count"] > 512, r.text
    b64 = base64.b64encode(png(50, 70, 7)).decode()
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": b64}}]}]
    r = httpx.post(srv.base_url + "/v1/messages/count_tokens", json={"model": MODEL, "messages": blocks}, timeout=120)
    assert r.status_code == 200, r.text
    assert calls == []
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": _messages(1, 7),
                                                                "max_tokens": 4, "seed": 1}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == counted and len(calls) == 1
