"""Scoring over HTTP, as a review found it: a padded vocabulary's extra ids are refused in prompts (they
cannot be decoded: echo and prompt_logprobs were 500s) and never show in log-probs; echo with max_tokens=0
checks every field a generating request checks; a bad mm_processor_kwargs is a 400 naming that field."""

from __future__ import annotations

import pytest
from conftest import build_vision_chat_checkpoint, data_url, png
from fastapi.testclient import TestClient

from canvaslm.config import DiffusionParams
from canvaslm.engine.engine import EngineConfig
from canvaslm.server.app import build_app
from canvaslm.server.launch import build_state
from canvaslm.testing import CHARS, SPECIALS, make_tiny_checkpoint

TOKENIZER_VOCAB = len(SPECIALS) + len(CHARS)


def _client(model_dir, **kw):
    state = build_state(model_dir, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=80, prefill_chunk=64),
                        served_model_name="tiny", max_denoising_steps=64, **kw)
    return state, TestClient(build_app(state))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, one_thread):
    state, client = _client(tiny_checkpoint)
    yield client
    state.shutdown()


@pytest.fixture(scope="module")
def padded(tmp_path_factory, one_thread):
    """Embedding rows past the tokenizer's ids, as Gemma-style checkpoints have."""
    state, client = _client(make_tiny_checkpoint(tmp_path_factory.mktemp("padded"), vocab_size=TOKENIZER_VOCAB + 60))
    yield client
    state.shutdown()


def _post(client, **body):
    return client.post("/v1/completions", json={"model": "tiny", "prompt": "ab", **body})


@pytest.mark.parametrize("body", [{}, {"max_tokens": 0, "echo": True}, {"max_tokens": 0, "echo": True, "logprobs": 1},
                                  {"max_tokens": 2, "prompt_logprobs": 1}])
def test_a_padded_id_in_a_prompt_is_a_400(padded, body):
    r = _post(padded, prompt=[5, 6, TOKENIZER_VOCAB + 10, 7], **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and f"[{TOKENIZER_VOCAB + 10}] are outside the vocabulary [0, " \
                                          f"{TOKENIZER_VOCAB})" in err["message"]


def test_padded_ids_never_show_in_log_probs(padded):
    r = _post(padded, prompt="hello world", max_tokens=1, prompt_logprobs=20, seed=1)
    assert r.status_code == 200, r.text
    rows = r.json()["choices"][0]["prompt_logprobs"][1:]
    assert all(int(t) < TOKENIZER_VOCAB and e["rank"] <= TOKENIZER_VOCAB for row in rows for t, e in row.items())


BAD_FIELDS = [{"logit_bias": {"999": 5}}, {"stop_token_ids": [999]}, {"min_tokens": 5}, {"guided_regex": "("},
              {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
              {"bad_words": ["abc"]}, {"temperature": 1e-40}, {"max_denoising_steps": 65}]


@pytest.mark.parametrize("field", BAD_FIELDS, ids=lambda f: next(iter(f)))
def test_scoring_only_checks_every_field(tiny, field):
    """echo with max_tokens=0 generates nothing, but a field a generating request refuses is refused there too,
    naming the same field."""
    generating = _post(tiny, echo=True, max_tokens=2, **field)
    scoring = _post(tiny, echo=True, max_tokens=0, logprobs=0, **field)
    assert generating.status_code == scoring.status_code == 400, scoring.text
    assert scoring.json()["error"]["param"] == generating.json()["error"]["param"]
    if "min_tokens" in field:
        assert "min_tokens=5 is over the 0 tokens" in scoring.json()["error"]["message"]


def test_scoring_only_takes_good_fields(tiny):
    r = _post(tiny, echo=True, max_tokens=0, logprobs=0, guided_regex="a+", logit_bias={"9": 5}, stop_token_ids=[9])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "ab"


@pytest.fixture(scope="module")
def vision(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("vision_chat")
    build_vision_chat_checkpoint(out)
    defaults = DiffusionParams(max_new_tokens=16, max_denoising_steps=4, eos_token_ids=(1, 4), pad_token_id=0)
    state = build_state(out, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=512, prefill_chunk=32),
                        served_model_name="tiny", defaults=defaults)
    yield TestClient(build_app(state))
    state.shutdown()


@pytest.mark.parametrize("kwargs, says", [({"foo": 1}, "'foo' is not supported"),
                                          ({"max_soft_tokens": 100}, "max_soft_tokens must be one of")])
def test_a_bad_mm_processor_kwargs_names_its_field(vision, kwargs, says):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(60, 40, 1))}},
                                             {"type": "text", "text": "hi"}]}]
    r = vision.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 4,
                                                  "mm_processor_kwargs": kwargs})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "mm_processor_kwargs" and says in err["message"], err
