"""Requests the OpenAI routes must read as OpenAI's and vLLM's do: null options, negative seeds, min_tokens
holding off stop strings, streamed log-probs after a stop string, best_of limits; and a stop string's cost."""

from __future__ import annotations

import random

import openai
import pytest

from canvaslm.server.serving import TextTracker, _starting

from .conftest import MAX_TOKENS, MODEL, probe_prompt


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def test_starting_finds_the_longest_stop_prefix_the_text_ends_with():
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 12)))
        stop = "".join(rng.choice("ab") for _ in range(rng.randrange(1, 12)))
        want = max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        assert _starting(text, stop) == want, (text, stop)


def test_a_very_long_stop_string_costs_the_text_not_the_stop():
    """The held-back part was found by trying every prefix of every stop (quadratic in the stop's length, on the
    event loop: a 1M-character stop froze the server for 20 s)."""
    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    t = TextTracker(Chars(), ["x" * 10**6])
    t.add([ord(c) for c in "abcxxx"])
    assert t.delta() == "abc" and t.delta(final=True) == "xxx"


class _Pieces:
    """Token i decodes to PIECES[i]."""
    PIECES = ["b", "j", "h", "q", "N", "jhq", "x"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


@pytest.mark.parametrize("stops", [["jhqN", "hq"], ["hq", "jhqN"]])
def test_the_stop_complete_in_fewest_tokens_ends_the_reply_whatever_starts_first(stops):
    """'jhqN' starts first but needs token 5; 'hq' is complete at token 4, where an autoregressive server stops
    (the stop that started first was taken: one token more and less text)."""
    for chunks in ([[0, 1, 2, 3, 4, 6]], [[0, 1], [2, 3, 4, 6]], [[0], [1], [2], [3], [4], [6]]):
        t = TextTracker(_Pieces(), stops)
        for ids in chunks:
            t.add(ids)
        assert (t.text, t.ids, t.stop_word) == ("bj", [0, 1, 2, 3], "hq"), chunks


def test_stops_complete_in_one_token_cut_at_the_earliest_start():
    t = TextTracker(_Pieces(), ["hq", "jhq"])
    t.add([0, 5, 4])  # "b" + "jhq" + "N": both stops end in token 2
    assert (t.text, t.ids, t.stop_word) == ("b", [0, 5], "jhq")
    t = TextTracker(_Pieces(), ["hq", "jhqN"], keep_stop=True)
    t.add([0, 5, 4, 6])  # 'hq' ends in token 2, 'jhqN' in token 3
    assert (t.text, t.ids) == ("bjhq", [0, 5])


def test_null_options_are_their_defaults_and_a_negative_seed_is_taken_mod_2_63(client, llm):
    prompt = probe_prompt(llm, 1)
    want = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=2**63 - 1)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=-1, n=None, echo=None,
                                    stream=None, extra_body={"min_tokens": None, "ignore_eos": None,
                                                             "skip_special_tokens": None})
    assert got.choices[0].text == want.choices[0].text and len(got.choices) == 1
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          n=None, stream=None, extra_body={"add_generation_prompt": None})
    assert len(chat.choices) == 1


def test_min_tokens_holds_off_stop_strings(client, llm):
    """As vLLM: a stop string counts only where it ends in the min_tokens-th token or later."""
    prompt, kw = probe_prompt(llm, 2), dict(model=MODEL, max_tokens=MAX_TOKENS, seed=1)
    free = client.completions.create(prompt=prompt, **kw, extra_body={"min_tokens": 30}).choices[0].text
    early = free[2:4]
    assert len(free) >= 30 and len(early) == 2
    held = client.completions.create(prompt=prompt, stop=[early], **kw, extra_body={"min_tokens": 30})
    text = held.choices[0].text  # the same tokens (stop strings only cut): not cut at the early occurrence
    assert free.startswith(text) and len(text) > free.find(early)


def test_logprobs_list_every_counted_token_after_a_stop_streamed_or_not(client, llm):
    prompt, kw = probe_prompt(llm, 3), dict(model=MODEL, max_tokens=MAX_TOKENS, seed=2, logprobs=1)
    free = client.completions.create(prompt=prompt, **kw).choices[0].text
    stop = free[5:7]
    reply = client.completions.create(prompt=prompt, stop=[stop], **kw)
    whole = reply.choices[0]
    tokens = [t for ch in client.completions.create(prompt=prompt, stop=[stop], stream=True, **kw)
              if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert whole.text == free[:free.find(stop)] and tokens == whole.logprobs.tokens
    # every counted token is listed (vLLM's way): up to the one that completed the stop string
    assert len(tokens) == reply.usage.completion_tokens and "".join(tokens).startswith(whole.text + stop)


def test_best_of_over_the_choice_limit_names_best_of(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["a", "b", "c", "d", "e"], max_tokens=4, n=1, best_of=16)
    assert e.value.body["param"] == "best_of" and "best_of=16" in e.value.body["message"]


def test_min_tokens_over_the_default_budget_raises_it_when_max_tokens_is_not_sent(client, llm):
    """Without max_tokens the budget is the room the context leaves (vLLM's), so min_tokens over the checkpoint's
    max_new_tokens is taken (it was a 400 blaming max_tokens, which the request never sent); past the context it
    is a 400."""
    prompt, default = probe_prompt(llm, 4), llm.defaults.max_new_tokens
    r = client.completions.create(model=MODEL, prompt=prompt, seed=1, extra_body={"min_tokens": default + 8})
    assert r.usage.completion_tokens >= default + 8
    with pytest.raises(openai.BadRequestError):  # still bounded by the context
        client.completions.create(model=MODEL, prompt=prompt, extra_body={"min_tokens": MAX_TOKENS + 1})


def test_a_stop_string_counts_the_passes_up_to_the_canvas_it_cut(client, llm, server, monkeypatch):
    """The engine goes on denoising the next canvas until the cancel lands, so the Finish's count varied between
    identical requests (by the passes run meanwhile); usage counts the passes of the canvases the reply used.
    Here every cancel lands late, as on a busy server."""
    import threading

    engine = server.state.engine
    real = engine.cancel
    monkeypatch.setattr(engine, "cancel", lambda *a: threading.Timer(0.3, real, a).start())
    C = server.state.canvas_length
    prompt, kw = probe_prompt(llm, 5), dict(model=MODEL, seed=3)
    free = client.completions.create(prompt=prompt, max_tokens=MAX_TOKENS, **kw).choices[0].text
    assert len(free) > C  # a char tokenizer: the first canvas is the first C characters
    first = client.completions.create(prompt=prompt, max_tokens=C, **kw)
    assert first.choices[0].text == free[:C]
    stop = free[C - 3:C - 1]  # inside the first canvas, where it first occurs
    cut = [client.completions.create(prompt=prompt, max_tokens=MAX_TOKENS, stop=[stop], **kw) for _ in range(3)]
    assert all(r.choices[0].text == free[:free.find(stop)] for r in cut)
    assert free.find(stop) > 0 and free.find(stop) < C - 1
    assert [r.usage.model_extra["decoder_passes"] for r in cut] == [first.usage.model_extra["decoder_passes"]] * 3
