"""GBNF grammar output (sampling/grammar.py): the unrolled regex accepts exactly what a recursive-descent
recognizer of the grammar accepts within the nesting bound, generation always lands in the language
(LLM, CLI, HTTP), and bad grammars are errors naming the line and column or the rule."""

from __future__ import annotations

import json
import random
import re

import pytest

from canvaslm.llm import SamplingParams
from canvaslm.sampling.grammar import GrammarError, grammar_regex

ARITH = r'''
# sums of numbers and parenthesised sums
root ::= expr
expr ::= term ("+" term)*
term ::= [0-9]{1,3} | "(" expr ")"
'''


def arith(s: str, depth: int) -> bool:
    """Recursive descent: s is an expr whose expr nesting (root's included) is at most `depth`."""
    pos = 0

    def expr(level):
        nonlocal pos
        if level > depth or not term(level):
            return False
        while pos < len(s) and s[pos] == "+":
            pos += 1
            if not term(level):
                return False
        return True

    def term(level):
        nonlocal pos
        m = re.compile(r"[0-9]{1,3}").match(s, pos)
        if m and not (m.end() < len(s) and s[m.end()].isdigit()):
            pos = m.end()
            return True
        if pos < len(s) and s[pos] == "(":
            pos += 1
            if not expr(level + 1) or pos >= len(s) or s[pos] != ")":
                return False
            pos += 1
            return True
        return False

    return expr(1) and pos == len(s)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_unrolled_grammar_is_the_grammar_within_the_bound(depth):
    pattern = re.compile(grammar_regex(ARITH, depth))
    rng = random.Random(depth)
    texts = ["1", "12+3", "(1)", "((1))", "(((1)))", "((1+2)+3)+4", "1234", "(1+)", ")", ""]
    texts += ["".join(rng.choice("0127+()") for _ in range(rng.randint(1, 12))) for _ in range(4000)]
    hits = 0
    for t in texts:
        assert bool(pattern.fullmatch(t)) == arith(t, depth), t
        hits += arith(t, depth)
    assert hits > 50


def test_literals_classes_and_repetitions():
    p = re.compile(grammar_regex(r'''root ::= "a\"b\\" [^\n"x-z]{2,3} "." ws? ("-" | "#")+
ws ::= [ \t]+'''))
    assert p.fullmatch('a"b\\' + "qq." + " \t" + "-#-")
    assert p.fullmatch('a"b\\' + "qwe." + "#")
    assert not p.fullmatch('a"b\\' + "qy." + "#")  # y is in x-z
    assert not p.fullmatch('a"b\\' + "q." + "#")  # {2,3}
    assert re.compile(grammar_regex(r'root ::= "\x41\u00e9" .')).fullmatch("Aé\n")


@pytest.mark.parametrize("grammar,words", [
    ('root ::= "a" b', "rule 'b' is not defined at line 1, column 14"),
    ('root ::= "a"\nroot ::= "b"', "rule 'root' is defined twice at line 2, column 1"),
    ('root ::= "abc', "string literal is not closed at line 1, column 10"),
    ('root ::= "\\q"', "unknown escape \\q"),
    ('start ::= "a"', "no `root` rule"),
    ('root ::= "(" root ")"', "`root` matches nothing within the recursion bound"),
    ('root ::= "a"{3,2}', "maximum below its minimum"),
    ('root ::= [b-a]', "runs backwards"),
    ('root ::= "a" )', "unexpected ')': no group is open at line 1, column 14"),
    ('root ::= ("a"', "a group is not closed"),
    ('root = "a"', "unexpected character '=' at line 1, column 6"),
    ('\u00ea\\>', "unexpected character '\u00ea' at line 1, column 1"),  # a non-ASCII letter (found by fuzzing)
    ('"a"', "expected a rule: name ::= expression at line 1, column 1"),
    ('', "non-empty grammar"),
    ('root ::= ' + "(" * 5000 + '"a"' + ")" * 5000, "nest too deeply"),
])
def test_bad_grammars_name_the_place(grammar, words):
    with pytest.raises(GrammarError, match=re.escape(words)):
        grammar_regex(grammar)


def test_generation_lands_in_the_language(tiny_llm):
    """A random model writes garbage; every output parses, in one canvas or over several (canvas 16)."""
    outs = set()
    for seed in range(6):
        for n in (12, 30):
            r = tiny_llm.generate("x", SamplingParams(seed=seed, grammar=ARITH, max_new_tokens=n, temperature=1.5))[0]
            assert arith(r.text, 4), r.text
            outs.add(r.text)
    assert len(outs) > 3
    with pytest.raises(Exception, match="grammar"):
        tiny_llm.generate("x", SamplingParams(grammar=ARITH, regex="a"))


def test_cli_and_http(tiny_llm, client, tmp_path, capsys):
    import openai

    from canvaslm.cli import main

    (tmp_path / "g.gbnf").write_text(ARITH)
    assert main(["generate", str(tiny_llm.model_dir), "--prompt", "x", "--grammar", str(tmp_path / "g.gbnf"),
                 "--max-new-tokens", "20", "--seed", "4", "--device", "cpu", "--json"]) == 0
    assert arith(json.loads(capsys.readouterr().out)["text"], 4)
    assert main(["generate", str(tiny_llm.model_dir), "--prompt", "x", "--grammar", str(tmp_path / "nope")]) == 2
    assert "--grammar" in capsys.readouterr().err
    c, model = client
    for seed in range(3):
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "a sum"}], max_tokens=24,
                                      seed=seed, extra_body={"guided_grammar": ARITH})
        assert arith(r.choices[0].message.content, 4)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=model, prompt="x", extra_body={"guided_grammar": 'root ::= "a" nope'})
    assert e.value.body["param"] == "guided_grammar" and "rule 'nope' is not defined" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="send one"):
        c.completions.create(model=model, prompt="x", extra_body={"guided_grammar": ARITH, "guided_regex": "a"})
