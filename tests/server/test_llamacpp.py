"""llama-server's native routes (server/llamacpp.py): POST /completion and POST /infill, as llama.vim and
llama.vscode call them. Each must mean exactly what the equivalent /v1/completions request means."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from canvaslm.server.infill import cut_stops
from canvaslm.server.llamacpp import cut_indent, render_extra, select_fields

from .conftest import MAX_MODEL_LEN, MODEL


def post(server, route, body, **kw):
    return httpx.post(server.base_url + route, json=body, timeout=120, **kw)


def sse(server, route, body) -> list[dict]:
    with httpx.stream("POST", server.base_url + route, json=body, timeout=120) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def oai(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


# --- helpers ----------------------------------------------------------------------------------------------

def test_cut_indent_stops_before_the_first_less_indented_line():
    text = "x = 1\n    y = 2\n\n    z\nw\n    v"
    assert cut_indent(text, 4) == ("x = 1\n    y = 2\n\n    z", True)  # blank lines and the first line pass
    assert cut_indent(text, 0) == (text, False)
    assert cut_indent("  a\n\tb", 1) == ("  a\n\tb", False)  # a tab counts as one column
    assert cut_indent("a\n b", 2) == ("a", True)


def test_cut_stops_takes_the_earliest_stop_and_names_it():
    assert cut_stops("abcdef", ["de", "bc", "zz"]) == ("a", "bc")
    assert cut_stops("abc", ["x"]) == ("abc", "")


def test_select_fields_flattens_paths_as_llama_vim_reads_them():
    resp = {"content": "x", "timings": {"prompt_n": 3}, "truncated": False}
    assert select_fields(resp, ["content", "timings/prompt_n", "timings/nope", ""]) == {
        "content": "x", "timings/prompt_n": 3}
    assert select_fields(resp, None) is resp


def test_render_extra_names_each_file():
    from canvaslm.server.llamacpp import ExtraChunk

    out = render_extra([ExtraChunk(filename="a.py", text="import os"), ExtraChunk(text="x\n")])
    assert out == "# a.py\nimport os\n\nx\n\n"


# --- /completion ------------------------------------------------------------------------------------------

def test_completion_equals_v1_completions(server, llm):
    prompt, ids = "def add(a, b):", llm.tokenizer.encode("def add(a, b):")
    for seed in (0, 3):
        ref = oai(server).completions.create(model=MODEL, prompt=prompt, max_tokens=24, seed=seed, temperature=0.7,
                                             extra_body={"top_k": 20, "repetition_penalty": 1.3})
        r = post(server, "/completion", {"prompt": prompt, "n_predict": 24, "seed": seed, "temperature": 0.7,
                                         "top_k": 20, "repeat_penalty": 1.3, "return_tokens": True})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["content"] == ref.choices[0].text and out["stop"] is True
        assert out["tokens_predicted"] == len(out["tokens"]) == ref.usage.completion_tokens
        assert out["tokens_evaluated"] == len(ids) == ref.usage.prompt_tokens
        assert out["stop_type"] == {"length": "limit", "stop": "eos"}[ref.choices[0].finish_reason]
        t = out["timings"]
        assert t["prompt_n"] + t["cache_n"] == len(ids) and t["predicted_n"] == out["tokens_predicted"]
        assert t["prompt_ms"] > 0 and t["predicted_ms"] > 0
        assert out["generation_settings"]["seed"] == seed and out["generation_settings"]["top_k"] == 20
    # token ids as the prompt mean the same
    same = post(server, "/completion", {"prompt": ids, "n_predict": 24, "seed": 3, "temperature": 0.7,
                                        "top_k": 20, "repeat_penalty": 1.3})
    assert same.json()["content"] == out["content"]


def test_non_positive_top_k_and_temperature_mean_what_llama_server_means(server):
    """llama-server reads top_k <= 0 as no cut and temperature <= 0 as greedy (clients send -1)."""
    base = {"prompt": "abc", "n_predict": 16, "seed": 2}
    for field, neg, zero in (("top_k", -1, 0), ("temperature", -1.0, 0.0), ("top_k", -40, 0)):
        r = post(server, "/completion", dict(base, **{field: neg}))
        assert r.status_code == 200, r.text
        assert r.json()["content"] == post(server, "/completion", dict(base, **{field: zero})).json()["content"]


def test_completion_stream_equals_whole(server):
    body = {"prompt": "abc", "n_predict": 40, "seed": 1}
    whole = post(server, "/completion", body).json()
    chunks = sse(server, "/completion", dict(body, stream=True))
    assert "".join(c["content"] for c in chunks) == whole["content"]
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["tokens_predicted"] == whole["tokens_predicted"]
    body["return_tokens"] = True  # each chunk carries the ids committed since the last one
    whole, chunks = post(server, "/completion", body).json(), sse(server, "/completion", dict(body, stream=True))
    assert [t for c in chunks for t in c["tokens"]] == whole["tokens"] and len(whole["tokens"]) > 0


def test_completion_stop_strings_cut_and_name_the_word(server):
    free = post(server, "/completion", {"prompt": "stop test", "n_predict": 40, "seed": 2}).json()["content"]
    word = free[10:12]
    stops = ["@@none1", "@@none2", "@@none3", "@@none4", word]  # more than OpenAI's 4
    r = post(server, "/completion", {"prompt": "stop test", "n_predict": 40, "seed": 2, "stop": stops})
    out = r.json()
    assert out["content"] == free[:free.find(word)]
    assert out["stop_type"] == "word" and out["stopping_word"] == word
    streamed = sse(server, "/completion", {"prompt": "stop test", "n_predict": 40, "seed": 2, "stop": stops,
                                           "stream": True})
    assert "".join(c["content"] for c in streamed) == out["content"] and streamed[-1]["stopping_word"] == word
    empty = post(server, "/completion", {"prompt": "stop test", "n_predict": 40, "seed": 2, "stop": [""]}).json()
    assert empty["content"] == free and empty["stop_type"] != "word"  # llama-server skips empty words


def _seed_with_newline(server, prompt):
    for seed in range(60):
        text = post(server, "/completion", {"prompt": prompt, "n_predict": 40, "seed": seed}).json()["content"]
        at = text.find("\n")
        if 0 < at < len(text) - 1 and text[at + 1] not in " \t\n":
            return seed, text
    pytest.skip("no seed gives a line break")


def test_completion_n_indent_cuts_at_a_less_indented_line(server):
    seed, text = _seed_with_newline(server, "indent")
    body = {"prompt": "indent", "n_predict": 40, "seed": seed, "n_indent": 1}
    out = post(server, "/completion", body).json()
    assert out["content"] == text[:text.find("\n")] and out["stop_type"] == "limit"
    chunks = sse(server, "/completion", dict(body, stream=True))
    assert "".join(c["content"] for c in chunks) == out["content"]


def test_n_predict_zero_encodes_the_prompt_for_the_next_request(server, llm):
    """llama.vim's cache warming: n_predict 0 encodes the prompt and generates nothing; the next request
    with that prompt takes all of it from the prefix cache."""
    prompt = "warm this prompt up, please: " + "x" * 10
    n = len(llm.tokenizer.encode(prompt))
    out = post(server, "/completion", {"prompt": prompt, "n_predict": 0}).json()
    assert out["content"] == "" and out["tokens_predicted"] == 0 and out["tokens_evaluated"] == n
    assert out["tokens_cached"] == 0 and out["timings"]["prompt_n"] == n
    follow = post(server, "/completion", {"prompt": prompt, "n_predict": 16, "seed": 1}).json()
    assert follow["tokens_cached"] == n and follow["timings"]["prompt_n"] == 0
    again = post(server, "/completion", {"prompt": prompt, "n_predict": 0}).json()
    assert again["tokens_cached"] == n  # already held: answered without a step
    out = post(server, "/infill", {"input_extra": [{"filename": "a", "text": "b"}], "n_predict": 0,
                                   "response_fields": [""]})
    assert out.status_code == 200 and out.json() == {}
    empty = post(server, "/infill", {"n_predict": 0})  # nothing to warm (found by the fuzz test)
    assert empty.status_code == 200 and empty.json()["tokens_evaluated"] == 0


@pytest.fixture
def slow_clock(server):
    """The engine's scheduler reads a clock that moves one second per read: every denoising step "takes"
    at least a second, so a time limit under a second is spent by the first step, whatever the machine."""
    sched = server.state.engine.scheduler
    ticks = iter(range(10**9))
    sched.clock = lambda: float(next(ticks))
    yield
    sched.clock = time.perf_counter


def test_t_max_predict_ms_commits_the_draft_and_stops(server, slow_clock):
    """llama.vim's t_max_predict_ms (the /v1 bodies' max_time): once spent, the canvas being denoised is
    committed as its draft and generation ends; before that nothing changes."""
    body = {"prompt": "def add(a, b):", "n_predict": 40, "seed": 5, "return_tokens": True}
    one_step = post(server, "/completion", dict(body, max_denoising_steps=1)).json()
    cut = server.state.engine.stats.out_of_time
    timed = post(server, "/completion", dict(body, t_max_predict_ms=1)).json()
    n = len(timed["tokens"])
    assert 0 < n <= 16 and timed["tokens"] == one_step["tokens"][:n]  # canvas 0 after its first step
    assert timed["stop_type"] == ("eos" if n < 16 else "limit")
    ref = oai(server).completions.create(model=MODEL, prompt=body["prompt"], max_tokens=40, seed=5,
                                         extra_body={"max_time": 0.5})
    assert ref.choices[0].text == timed["content"]
    metric = [ln for ln in httpx.get(server.base_url + "/metrics").text.splitlines()
              if ln.startswith("canvaslm_requests_out_of_time_total")]
    assert metric and float(metric[0].split()[-1]) == cut + 2  # both requests were ended by their budget
    free = post(server, "/completion", body).json()
    for off in (0, -1):  # llama.cpp's "no limit"
        assert post(server, "/completion", dict(body, t_max_predict_ms=off)).json()["tokens"] == free["tokens"]
    infill = post(server, "/infill", dict(INFILL, n_predict=40, t_max_predict_ms=1))
    assert infill.status_code == 200, infill.text


def test_max_time_must_be_positive_and_leave_constraints_whole(server, slow_clock):
    r = oai(server).completions.with_raw_response.create
    for bad in (0, -2, "1"):
        with pytest.raises(openai.BadRequestError) as e:
            r(model=MODEL, prompt="x", max_tokens=4, extra_body={"max_time": bad})
        assert e.value.body["param"] == "max_time"
    # a constrained output that may span canvases could be cut unfinished: refused; within one canvas it runs
    choice = {"guided_choice": ["yes", "no"], "max_time": 0.5}
    with pytest.raises(openai.BadRequestError) as e:
        r(model=MODEL, prompt="x", max_tokens=40, extra_body=choice)
    assert e.value.body["param"] == "max_time" and "guided_choice" in e.value.body["message"]
    for seed in range(4):  # the budget is spent by the first step (slow_clock), and the choice still holds
        one = oai(server).completions.create(model=MODEL, prompt="x", max_tokens=16, seed=seed, extra_body=choice)
        assert one.choices[0].text in ("yes", "no") and one.usage.decoder_passes == 1


# --- /infill ----------------------------------------------------------------------------------------------

INFILL = {"input_prefix": "def f(x):\n    ", "input_suffix": "\n    return y\n", "prompt": "y = ",
          "input_extra": [{"filename": "util.py", "text": "K = 2"}], "n_predict": 6, "seed": 4}


def test_infill_equals_v1_completions_with_suffix(server):
    prompt = render_extra([]) + "# util.py\nK = 2\n\n" + INFILL["input_prefix"] + INFILL["prompt"]
    ref = oai(server).completions.create(model=MODEL, prompt=prompt, suffix=INFILL["input_suffix"], max_tokens=6,
                                         seed=4)
    r = post(server, "/infill", INFILL)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["content"] == ref.choices[0].text and out["stop_type"] == "eos" and out["truncated"] is False
    assert out["tokens_predicted"] == ref.usage.completion_tokens
    assert out["prompt"] == prompt  # the char tokenizer adds no special token
    for seed in range(6):  # the request's seed (as llama-server reports it), not the chosen candidate's
        assert post(server, "/infill", dict(INFILL, seed=seed, n_predict=12)).json()["generation_settings"]["seed"] \
            == seed
    # the fields llama.vim asks for, flattened
    fields = ["content", "timings/prompt_n", "timings/predicted_ms", "truncated", "tokens_cached"]
    again = post(server, "/infill", dict(INFILL, response_fields=fields)).json()
    assert set(again) == set(fields) and again["content"] == out["content"]
    assert again["tokens_cached"] > 0  # the same prompt again: its whole chunks come from the prefix cache
    assert post(server, "/infill", dict(INFILL, response_fields=["prompt"])).json() == {"prompt": prompt}
    streamed = sse(server, "/infill", dict(INFILL, stream=True))
    assert "".join(c["content"] for c in streamed) == out["content"] and streamed[-1]["stop"] is True


def test_a_middle_that_uses_every_allowed_token_reports_the_limit(server):
    """An insert whose chosen middle is as long as max_tokens / n_predict / num_predict allow said it ended
    ("stop", "eos"); an autoregressive insert stopped there reports the limit, as the plain routes here do."""
    body = {"model": MODEL, "prompt": "def f(x):\n    y = ", "suffix": "\n    return y\n", "max_tokens": 4}
    seen = set()
    for seed in range(8):
        ch = oai(server).completions.create(**body, seed=seed).choices[0]
        full = ch.model_extra["infill"]["gap"] == 4
        assert ch.finish_reason == ("length" if full else "stop")
        seen.add(full)
        streamed = [json.loads(line[6:]) for line in httpx.post(
            server.base_url + "/v1/completions", json={**body, "seed": seed, "stream": True},
            timeout=60).text.splitlines() if line.startswith("data: {")]
        assert streamed[-1]["choices"][0]["finish_reason"] == ch.finish_reason
        infill = post(server, "/infill", {"input_prefix": body["prompt"], "input_suffix": body["suffix"],
                                          "n_predict": 4, "seed": seed}).json()
        assert infill["stop_type"] == ("limit" if infill["tokens_predicted"] == 4 else "eos")
        ollama = post(server, "/api/generate", {"model": MODEL, "prompt": body["prompt"], "suffix": body["suffix"],
                                                "stream": False, "options": {"num_predict": 4, "seed": seed}}).json()
        assert ollama["done_reason"] == ("length" if ollama["eval_count"] == 4 else "stop")
    assert seen == {True, False}  # both kinds of middle were chosen


def test_a_model_name_this_server_does_not_serve_is_ignored(server):
    """llama.vim sends its `model_fim` setting in every /infill and warm-up body; a llama-server serves one model
    and ignores it, and here any name but a served one was a 404 on every completion."""
    want = post(server, "/infill", INFILL).json()
    got = post(server, "/infill", dict(INFILL, model="qwen2.5-coder-1.5b"))
    assert got.status_code == 200 and got.json()["content"] == want["content"], got.text
    assert got.json()["model"] == MODEL
    body = {"prompt": "def f(x):", "n_predict": 6, "seed": 3}
    plain = post(server, "/completion", body).json()
    assert post(server, "/completion", dict(body, model="llama")).json()["content"] == plain["content"]
    assert post(server, "/infill", dict(INFILL, model="x", n_predict=0)).status_code == 200  # the warm-up


def test_infill_scores_read_the_candidates_kv(server, monkeypatch):
    """Scoring the candidate middles reads the prompt's KV from a candidate's freed slot (the middles fit
    one canvas, so no canvas was encoded behind the prompt) instead of encoding the prompt again, and picks
    what a fresh encode picks, with the same scores."""
    from canvaslm import scoring

    seen, score = [], scoring.score_continuations

    def spy(model, prompt, conts, held=None, **how):
        seen.append(held is not None)
        return score(model, prompt, conts, held, **how)

    monkeypatch.setattr(scoring, "score_continuations", spy)
    body = {"model": MODEL, "prompt": "def f(x):\n    y = ", "suffix": "\n y", "max_tokens": 6, "seed": 4}
    got = post(server, "/v1/completions", body).json()["choices"][0]
    assert seen == [True]
    monkeypatch.setattr(server.state.engine.scheduler, "free_slots_holding", lambda *a, **k: [])
    want = post(server, "/v1/completions", body).json()["choices"][0]
    assert seen == [True, False]
    assert got["text"] == want["text"] and got["infill"]["gap"] == want["infill"]["gap"]
    assert got["infill"]["scores"].keys() == want["infill"]["scores"].keys()
    for gap, s in got["infill"]["scores"].items():
        assert abs(s - want["infill"]["scores"][gap]) < 1e-4


def test_infill_stop_and_indent_cut_the_middle(server, llm):
    body = dict(INFILL, n_predict=12, input_suffix="\nreturn y", return_tokens=True)
    whole = post(server, "/infill", body).json()
    free = whole["content"]
    if len(free) < 2:
        pytest.skip("the chosen middle is too short to cut")
    word = free[1]
    out = post(server, "/infill", dict(body, stop=[word])).json()
    assert out["content"] == free[:free.find(word)] and out["stopping_word"] == word and out["stop_type"] == "word"
    # the ids end at the token that completed the stop word: counted and returned as the text is
    first = llm.tokenizer.decode(whole["tokens"][:1])
    out = post(server, "/infill", dict(body, stop=[first])).json()
    assert out["content"] == "" and out["stopping_word"] == first and len(whole["tokens"]) > 1
    assert out["tokens"] == whole["tokens"][:1] and out["tokens_predicted"] == out["timings"]["predicted_n"] == 1


def test_infill_without_suffix_is_a_plain_completion(server):
    body = {"input_prefix": "abc", "n_predict": 20, "seed": 7}
    assert post(server, "/infill", body).json()["content"] == \
        post(server, "/completion", {"prompt": "abc", "n_predict": 20, "seed": 7}).json()["content"]


def test_infill_cuts_what_does_not_fit_the_context(server, llm):
    """The prompt keeps its tail (extra chunks go first), so that the middle, suffix and EOS fit."""
    extra = [{"filename": f"f{i}.py", "text": "x" * 30} for i in range(4)]
    body = {"input_prefix": "tail of the prefix", "input_suffix": "S", "input_extra": extra, "n_predict": 6,
            "seed": 1}
    out = post(server, "/infill", body).json()
    assert out["truncated"] is True
    full = llm.tokenizer.encode(render_extra([]) + "".join(f"# f{i}.py\n{'x' * 30}\n\n" for i in range(4))
                                + "tail of the prefix")
    room = MAX_MODEL_LEN - 16  # one canvas holds 6 + 1 + 1
    assert out["tokens_evaluated"] == room and out["prompt"] == llm.tokenizer.decode(full[-room:])
    assert out["prompt"].endswith("tail of the prefix")
    ref = oai(server).completions.create(model=MODEL, prompt=full[-room:], suffix="S", max_tokens=6, seed=1)
    assert out["content"] == ref.choices[0].text


@pytest.mark.parametrize("route,body,param", [
    ("/completion", {"prompt": "x", "n_probs": 2}, "n_probs"),
    ("/completion", {"prompt": "x", "n_predict": "5"}, "n_predict"),
    ("/completion", {"prompt": ""}, "prompt"),
    ("/completion", {"prompt": [10**9]}, "prompt"),
    ("/infill", {"input_prefix": "x", "input_extra": [{"text": 3}]}, "input_extra"),
    ("/infill", {"input_prefix": "x", "input_suffix": "y", "grammar": "root ::= \"a\""}, "suffix"),
    ("/infill", {"input_prefix": "", "input_suffix": "y", "n_predict": 4}, "input_prefix"),
    # errors of the translated /v1 body name the llama.cpp field
    ("/completion", {"prompt": "x", "n_predict": 10**6}, "n_predict"),
    ("/completion", {"prompt": "x", "n_predict": 40, "grammar": "root ::= \"a\"", "t_max_predict_ms": 5},
     "t_max_predict_ms"),
    ("/completion", {"prompt": "x", "grammar": "root ::= ("}, "grammar"),
])
def test_bad_bodies_name_the_field(server, route, body, param):
    r = post(server, route, body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_props_report_the_served_context(server):
    out = httpx.get(server.base_url + "/props").json()
    assert out["default_generation_settings"]["n_ctx"] == MAX_MODEL_LEN and out["total_slots"] == 4
    assert out["model_alias"] == MODEL and out["modalities"]["vision"] is False


def test_a_grammar_compiles_on_the_compile_pool(server, monkeypatch):
    """/completion with a grammar builds its constraint on the compile pool (serving.off_loop), as
    /v1/completions does, not on the default pool every plain request needs."""
    import threading

    from canvaslm.server import serving

    threads, real = [], serving.prepare
    monkeypatch.setattr(serving, "prepare", lambda *a: threads.append(threading.current_thread().name) or real(*a))
    r = post(server, "/completion", {"prompt": "x", "n_predict": 4, "grammar": "root ::= \"ab\""})
    assert r.status_code == 200 and r.json()["content"] == "ab", r.text
    plain = post(server, "/completion", {"prompt": "x", "n_predict": 4})
    assert plain.status_code == 200
    assert threads[0].startswith("canvaslm-compile") and not threads[1].startswith("canvaslm-compile"), threads
