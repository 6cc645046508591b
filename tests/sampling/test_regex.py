"""Regex output (`SamplingParams.regex`, `--regex`): every output is a whole match of the pattern; patterns
an automaton cannot express, that cannot fit, or that are too large are refused by name."""

from __future__ import annotations

import json
import re

import pytest
import torch

from canvaslm import SamplingParams
from canvaslm.sampling.constraints import ConstraintError
from canvaslm.sampling.regex import RegexConstraint

PATTERNS = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8})?",
            r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", r"[a-f0-9]{8}", r"-?\d+(\.\d{1,2})?"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_output_is_a_whole_match(tiny_llm, pattern):
    params = [SamplingParams(regex=pattern, seed=s, max_new_tokens=24, max_denoising_steps=2 + s,
                             temperature=0.5 + s / 2) for s in range(3)]
    for o in tiny_llm.generate(["hello", "a date:", "x"], params):
        assert re.fullmatch(pattern, o.text), (pattern, o.text)
        assert o.finish_reason == "stop" and o.token_ids[-1] in tiny_llm.eos_ids


def test_a_match_may_span_canvases(tiny_llm):
    pattern = r"[a-z]{40}"  # longer than the tiny model's 16-token canvas
    out = tiny_llm.generate("x", SamplingParams(regex=pattern, seed=0, max_new_tokens=48, max_denoising_steps=2))[0]
    assert re.fullmatch(pattern, out.text), out.text


def test_eos_padding_leaves_the_automaton_only_from_accepting_states(tiny_llm):
    c = RegexConstraint(r"ab?", tiny_llm.tokenizer, 4)
    dfa, eos = c.dfa, c.eos_id
    g = int(dfa.sym_of_token[eos])
    a = tiny_llm.tokenizer.encode("a", add_special_tokens=False)[0]
    state_after_a = int(dfa.trans[dfa.start, int(dfa.sym_of_token[a])])
    assert int(dfa.trans[dfa.start, g]) == -1  # nothing matched yet: no EOS
    done = int(dfa.trans[state_after_a, g])
    assert done >= 0 and int(dfa.trans[done, g]) == done and bool(dfa.accept[done])
    assert (dfa.trans[done, :g] == -1).all()  # after EOS only EOS


@pytest.mark.parametrize("pattern,width,message", [
    (r"(a)\1", 8, "cannot compile"),
    (r"\d{50}", 10, r"no match of .* fits in 10 tokens"),
    ("", 8, "must be a non-empty string"),
    (r"a{5000}", 8, r"repetition \{5000\} is over the limit"),
])
def test_bad_patterns_are_named(tiny_llm, pattern, width, message):
    with pytest.raises(ConstraintError, match=message):
        RegexConstraint(pattern, tiny_llm.tokenizer, width)


def test_regex_excludes_other_constraints(tiny_llm):
    with pytest.raises(ValueError, match="set one of constraint, json_schema, json_object, choice, regex"):
        tiny_llm.generate("x", SamplingParams(regex="a+", choice=["a"]))


def test_cli_regex(tiny_llm, capsys):
    from canvaslm.cli import main

    assert main(["generate", str(tiny_llm.model_dir), "--prompt", "hi", "--regex", r"[0-9]{4}", "--seed", "1",
                 "--steps", "2", "--max-new-tokens", "8", "--json"]) == 0
    assert re.fullmatch(r"[0-9]{4}", json.loads(capsys.readouterr().out)["text"])


# --- bounded compile (the server's guided_regex) ----------------------------------------------------------

EXPONENTIAL = r"[ab]*a[ab]{16}"  # any DFA has 2**17 states: minutes in interegular


SAMPLES = ["555-1234", "555-12345", "yes", "no", "maybe", "mayb", "Hello", "Hello World", "hello", "2024-05-17",
           "2024-13-17", "deadbeef", "deadbeeg", "-3.14", "3.141", "12", "dx!", "ax!", "\u00e9x\u4e2d",
           "ab_1@cd.com", "ab@cd.org", "", "a"]


def _accepts(fsm, text: str) -> bool:
    state = fsm.initial
    for ch in text:
        cls = fsm.classify(ch)
        state = None if cls is None else fsm.step(state, cls)
        if state is None:
            return False
    return state in fsm.finals


@pytest.mark.parametrize("pattern", PATTERNS + [r"[^a-c]x.", r"(\w+)@(\w+)\.com"])
def test_child_compiles_the_same_automaton(pattern):
    from canvaslm.sampling.regex_fsm import char_fsm, char_fsm_with_deadline

    # class numbers differ between processes (set order), the language must not
    child, here = char_fsm_with_deadline(pattern, 30.0), char_fsm(pattern)
    assert child.num_states == here.num_states
    for text in SAMPLES:
        assert _accepts(child, text) == _accepts(here, text) == bool(re.fullmatch(pattern, text)), text
    assert any(_accepts(here, t) for t in SAMPLES)


@pytest.mark.parametrize("pattern", [r"a(?=b)", r"a(?!b)", r"(?!x)[a-z]", r"[0-9]+(?=px)", r"(?<=a)b", r"(?<!a)b"])
def test_lookarounds_are_refused_by_name(pattern):
    from canvaslm.sampling.regex_fsm import RegexCompileError, char_fsm

    with pytest.raises(RegexCompileError, match="lookarounds"):
        char_fsm(pattern)


@pytest.mark.parametrize("pattern", [r"\s", r"\S", r"[^\s]", r"[\sa]", r"[^\Sa]"])
def test_whitespace_classes_match_python_re(pattern):
    from canvaslm.sampling.regex_fsm import char_fsm

    fsm = char_fsm(pattern)
    for ch in map(chr, [*range(0x3100), 0xfeff, 0x10000]):
        assert _accepts(fsm, ch) == bool(re.fullmatch(pattern, ch)), (pattern, hex(ord(ch)))


def test_deadline_kills_the_child_and_names_the_limit(monkeypatch):
    import subprocess
    import time

    from canvaslm.sampling import regex_fsm

    started = []
    real = subprocess.Popen

    def spy(*a, **k):
        started.append(real(*a, **k))
        return started[-1]

    monkeypatch.setattr(regex_fsm.subprocess, "Popen", spy)
    t = time.monotonic()
    with pytest.raises(regex_fsm.RegexCompileError, match=r"took longer than the limit of 1 s"):
        regex_fsm.char_fsm_with_deadline(EXPONENTIAL, 1.0)
    assert time.monotonic() - t < 10
    assert len(started) == 1 and started[0].poll() is not None  # killed and reaped, not left running


def test_the_compiler_child_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, canvaslm.sampling.regex_fsm as m; m.char_fsm('a+'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_compiles_past_the_concurrency_limit_are_refused_as_busy():
    from canvaslm.sampling import regex_fsm

    taken = [regex_fsm._turns.acquire(timeout=1) for _ in range(regex_fsm.MAX_CONCURRENT)]
    try:
        assert all(taken)
        with pytest.raises(regex_fsm.RegexCompileBusy, match="already running"):
            regex_fsm.char_fsm_with_deadline("a+", 0.2)
    finally:
        for _ in taken:
            regex_fsm._turns.release()
    assert _accepts(regex_fsm.char_fsm_with_deadline("a+", 30.0), "aa")  # the turns came back


def test_lifting_to_tokens_stops_at_the_deadline(tiny_llm):
    import time

    from canvaslm.sampling.regex_fsm import char_fsm
    from canvaslm.sampling.token_dfa import Vocab, char_dfa

    fsm = char_fsm(r"[a-z]{3}")
    with pytest.raises(ConstraintError, match="ran out of time"):
        char_dfa(Vocab.of(tiny_llm.tokenizer), ("test-deadline",), fsm.classify, fsm.initial, fsm.step,
                 fsm.finals.__contains__, deadline=time.monotonic() - 1)


def test_openai_client_guided_regex(client):
    import openai

    c, model = client
    pattern = r"\d{3}-\d{4}"
    r = c.completions.create(model=model, prompt=["phone:", "call"], n=2, seed=5, max_tokens=20,
                             extra_body={"guided_regex": pattern})
    assert len(r.choices) == 4
    assert all(re.fullmatch(pattern, ch.text) and ch.finish_reason == "stop" for ch in r.choices), r.choices
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "a word?"}], seed=1,
                                  extra_body={"guided_regex": r"[A-Z][a-z]{2,8}"})
    assert re.fullmatch(r"[A-Z][a-z]{2,8}", r.choices[0].message.content)
    for body, needle in (({"guided_regex": r"(a)\1"}, "cannot compile"),
                         ({"guided_regex": r"\d{50}", "max_tokens": 10}, "no match of"),
                         ({"guided_regex": ""}, "must be a non-empty string"),
                         ({"guided_regex": "a", "max_tokens": 1}, "room for at least one token"),
                         ({"guided_regex": "a", "guided_choice": ["a"]}, "send one"),
                         ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "send one")):
        with pytest.raises(openai.BadRequestError, match=needle) as e:
            c.completions.create(model=model, prompt="x", extra_body=body)
        assert e.value.body["param"] in ("guided_regex", "guided_choice"), e.value.body


def test_server_refuses_a_slow_regex_and_keeps_serving(tiny_llm):
    import time

    import httpx
    openai = pytest.importorskip("openai")
    from canvaslm.server.launch import BackgroundServer, build_state

    with BackgroundServer(build_state(tiny_llm.model_dir, device="cpu", regex_timeout=1.0)) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        model = srv.state.model_name
        t = time.monotonic()
        with pytest.raises(openai.BadRequestError, match="took longer than the limit of 1 s") as e:
            c.completions.create(model=model, prompt="x", extra_body={"guided_regex": EXPONENTIAL})
        assert e.value.body["param"] == "guided_regex" and time.monotonic() - t < 10
        assert httpx.get(srv.base_url + "/health").status_code == 200
        r = c.completions.create(model=model, prompt="x", max_tokens=8, extra_body={"guided_regex": "[0-9]{4}"})
        assert re.fullmatch("[0-9]{4}", r.choices[0].text)


def test_compiled_automata_are_cached_up_to_a_bound(tiny_llm):
    from canvaslm.sampling.token_dfa import DFACache, Vocab

    cache = DFACache(size=3)
    for k in "abcd":
        cache.put(k, k.upper())
    assert "a" not in cache and len(cache) == 3  # the least recently used went
    assert cache.get("b") == "B"  # b is now the most recent ...
    cache.put("e", "E")
    assert "b" in cache and "c" not in cache  # ... so c goes before it

    dfas = Vocab.of(tiny_llm.tokenizer).dfas
    first = RegexConstraint("x0", tiny_llm.tokenizer, 4).dfa
    for n in range(1, dfas.size + 8):  # a server sees endless distinct patterns
        RegexConstraint(f"x{n}", tiny_llm.tokenizer, 4)
    assert len(dfas) == dfas.size and ("regex", "x0") not in dfas
    again = RegexConstraint("x0", tiny_llm.tokenizer, 4).dfa  # compiled afresh, the same automaton
    assert torch.equal(again.trans, first.trans) and torch.equal(again.sym_of_token, first.sym_of_token)
