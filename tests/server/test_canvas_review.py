"""Canvas-control review fixes over HTTP. `pins` with stop_token_ids: the stop ids are banned before the end of the
last pin, as EOS is (a favoured stop id ended the output at once and dropped the pin, a 200 with ""). Text the
tokenizer cannot encode in `pins`, `suffix` (also Ollama's) or `bad_words` is a 400 naming the field (was a 500).
Pin keys naming one offset ("3" and "03") are a 400 (one silently won), and a key must be decimal digits ("+3",
" 3" were read by int()). llama.cpp's /infill serves a suffix whose kept text is over the 64 Ki characters
/v1/completions takes (it was refused naming `suffix`)."""

from __future__ import annotations

import httpx
import pytest

from .conftest import MODEL


def post(server, route, body):
    return httpx.post(server.base_url + route, json=body, timeout=120)


def test_pins_with_stop_token_ids_keep_the_pins(server):
    body = {"model": MODEL, "prompt": "Q", "pins": {"10": "abc"}, "stop_token_ids": [20], "logit_bias": {"20": 100},
            "max_tokens": 16}
    for seed in range(3):
        r = post(server, "/v1/completions", dict(body, seed=seed))
        assert r.status_code == 200, r.text
        out = r.json()
        assert "abc" in out["choices"][0]["text"], out
        assert out["usage"]["completion_tokens"] >= 13, out  # was 1: the stop id at offset 0


def test_a_pinned_end_id_before_the_last_pin_is_a_400(server):
    body = {"model": MODEL, "prompt": "Q", "pins": {"2": [20], "6": "abc"}, "stop_token_ids": [20], "max_tokens": 16}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400 and "the id at output offset 2 ends the output" in r.json()["error"]["message"], r.text
    body["pins"] = {"2": "ab", "6": [20]}  # the last pinned position may end it
    assert post(server, "/v1/completions", body).status_code == 200


def test_a_pinned_end_id_inside_a_span_names_the_span_s_key(server):
    body = {"model": MODEL, "prompt": "Q", "pins": {"02": [5, 20, 7], "9": "abc"}, "stop_token_ids": [20],
            "max_tokens": 16}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert msg.startswith("pins['02']: the id at output offset 3 ends the output"), msg


@pytest.mark.parametrize("extra,param", [
    ({"pins": {"0": "\u00e9"}}, "pins"),
    ({"suffix": "\u00e9"}, "suffix"),
    ({"bad_words": ["\u00e9"]}, "bad_words"),
])
def test_text_the_tokenizer_cannot_encode_is_a_400_naming_the_field(server, extra, param):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Q: hi", "max_tokens": 8, "seed": 0, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "cannot encode" in err["message"] and err["message"].startswith(param), err


def test_ollama_suffix_the_tokenizer_cannot_encode_is_a_400(translated_api_server):
    r = post(translated_api_server, "/api/generate", {"model": MODEL, "prompt": "hi", "suffix": "\u00e9",
                                                      "stream": False})
    assert r.status_code == 400 and r.json()["error"].startswith("suffix: "), r.text


@pytest.mark.parametrize("pins,words", [
    ({"3": "abc", "03": "xyz"}, "keys '3' and '03' name the same offset 3"),
    ({"+3": "abc"}, "key '+3' is not an output token offset"),
    ({" 3": "abc"}, "key ' 3' is not an output token offset"),
    ({"3_0": "abc"}, "key '3_0' is not an output token offset"),
    ({"9" * 40: "abc"}, "past the context"),
])
def test_pin_keys_must_name_distinct_offsets_in_digits(server, pins, words):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Q", "pins": pins, "max_tokens": 8, "seed": 0})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "pins" and words in err["message"], err


def test_infill_serves_a_kept_suffix_over_64k_characters(server, monkeypatch):
    """/infill keeps up to a quarter of the context of the suffix, which may be more text than CompletionRequest's
    `suffix` takes: the fitted ids go to the candidates themselves. A tokenizer that spells the long suffix in a
    few tokens stands in for a context of 280,000 positions (the reviewer's case, minutes on a CPU)."""
    tok = server.state.tokenizer
    long_text, real = "x" * 70_000, tok.encode

    def encode(text, *a, **kw):
        return real("xyz", *a, **kw) if text == long_text else real(text, *a, **kw)

    monkeypatch.setattr(tok, "encode", encode)
    r = post(server, "/infill", {"input_prefix": "def f(x):", "input_suffix": long_text, "n_predict": 4, "seed": 1,
                                 "response_fields": ["content", "truncated"]})
    assert r.status_code == 200, r.text  # was a 400: "String should have at most 65536 characters", naming suffix
    assert r.json()["truncated"] is False
