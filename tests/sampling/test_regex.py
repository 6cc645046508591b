"""Regex output (`SamplingParams.regex`, `--regex`): every output is a whole match of the pattern; patterns
an automaton cannot express, that cannot fit, or that are too large are refused by name."""

from __future__ import annotations

import json
import re

import pytest

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
    with pytest.raises(ValueError, match="set one of constraint, json_schema, choice, regex"):
        tiny_llm.generate("x", SamplingParams(regex="a+", choice=["a"]))


def test_cli_regex(tiny_llm, capsys):
    from canvaslm.cli import main

    assert main(["generate", str(tiny_llm.model_dir), "--prompt", "hi", "--regex", r"[0-9]{4}", "--seed", "1",
                 "--steps", "2", "--max-new-tokens", "8", "--json"]) == 0
    assert re.fullmatch(r"[0-9]{4}", json.loads(capsys.readouterr().out)["text"])
