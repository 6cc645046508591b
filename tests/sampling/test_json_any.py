"""JSON mode (sampling/json_any.py): the bounded-depth JSON automaton accepts exactly the JSON that
`json.loads` accepts within its limits (char and byte-level BPE vocabularies, random near-JSON texts),
and generation under it always parses: LLM, CLI, HTTP (chat, completions, Responses) and free-form
values inside a JSON schema."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from canvaslm.llm import SamplingParams
from canvaslm.sampling.constraints import ConstraintError
from canvaslm.sampling.json_any import JsonObjectConstraint, json_dfa, signature
from canvaslm.sampling.json_schema import JsonSchemaConstraint, JsonTemplateOptions
from canvaslm.sampling.token_dfa import Vocab
from canvaslm.tokenizer import Tokenizer

from .test_bpe import CORPUS


def _runs(dfa, ids) -> bool:
    s = dfa.start
    for t in ids:
        g = int(dfa.sym_of_token[t]) if t < dfa.sym_of_token.numel() else -1
        if g < 0:
            return False
        s = int(dfa.trans[s, g])
        if s < 0:
            return False
    return bool(dfa.accept[s])


def _depth(v) -> int:
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    return 0


def _oracle(text: str, top: str, depth: int) -> bool:
    """What the automaton must accept: JSON by `json.loads`, of the `top` kind, nested <= depth, with no
    exponent, no escape but \\" \\\\ \\n \\t \\r \\f, and no NaN / Infinity."""
    def no_exp(s):
        if "e" in s.lower():
            raise ValueError("exponent")
        return float(s)

    def no_const(s):
        raise ValueError(s)

    if re.search(r'\\[^"\\ntrf]', text.replace("\\\\", "")):
        return False
    try:
        v = json.loads(text, parse_float=no_exp, parse_constant=no_const)
    except ValueError:
        return False
    kind = {"object": dict, "array": list}.get(top, object)
    return isinstance(v, kind) and _depth(v) <= depth


def _random_json(rng, depth, top=None):
    kind = top or rng.choice(["obj", "arr", "str", "int", "float", "lit"] if depth > 0 else ["str", "int", "lit"])
    if kind in ("obj", "object"):
        return {rng.choice(["a", "bb", "k é", 'q"', ""]): _random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))}
    if kind in ("arr", "array"):
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    if kind == "str":
        return "".join(rng.choice(["x", " ", "\n", "\t", "\\", '"', "true", "1", "{", ":", "ü"]) for _ in range(rng.randint(0, 5)))
    if kind == "int":
        return rng.choice([0, 7, -3, 120, 45678])
    if kind == "float":
        return rng.choice([0.5, -12.25, 3.0])
    return rng.choice([True, False, None])


def _texts(rng, n, top="object", depth=3):
    """Valid JSON of the kind, then near misses: truncations, deletions, insertions, swaps."""
    out = []
    for _ in range(n):
        v = _random_json(rng, depth, top)
        text = json.dumps(v, ensure_ascii=False, indent=rng.choice([None, 1]))
        out.append(text)
        ops = rng.randint(1, 2)
        t = text
        for _ in range(ops):
            i = rng.randrange(len(t) + 1)
            op = rng.choice(["cut", "del", "ins", "swap"])
            if op == "cut":
                t = t[:i]
            elif op == "del":
                t = t[:i] + t[i + 1:]
            elif op == "ins":
                t = t[:i] + rng.choice('{}[]:,"\\ 0-.1etrunfals\nE') + t[i:]
            elif i + 1 < len(t):
                t = t[:i] + t[i + 1] + t[i] + t[i + 2:]
        out.append(t)
    out += ["{}", " {} ", "{\"a\":1e5}", "{\"a\":\"\\u0041\"}", "{\"a\":NaN}", "{\"a\":01}", "{\"a\":-}",
            "{\"a\":1.}", "{\"a\":tru}", "{\"a\":nulll}", "[]", "\"x\"", "12", "{\"a\":[[[[1]]]]}",
            "{\"a\":[[[1]]]}", "{\"a\" 1}", "{,}", "{\"a\":1,}", "{\"a\":\"x\ny\"}"]
    return [t for t in out if t]


@pytest.fixture(scope="module")
def bpe_tok():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = CORPUS + [json.dumps(_random_json(random.Random(i), 3, "object"), ensure_ascii=False) for i in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return Tokenizer(backend, bos_id=2, eos_ids=[1], pad_id=0, name="bpe")


@pytest.mark.parametrize("top,depth", [("object", 3), ("object", 1), ("array", 2), ("any", 3)])
def test_char_automaton_accepts_what_json_loads_accepts(tiny_llm, top, depth):
    tok = tiny_llm.tokenizer
    dfa = json_dfa(Vocab.of(tok), top, depth)
    rng = random.Random(depth)
    n_ok = n = 0
    for text in _texts(rng, 150, top if top != "any" else None, depth + 1):
        try:
            ids = tok.encode(text, add_special_tokens=False)
        except ValueError:  # a character outside the char vocabulary
            continue
        want = _oracle(text, top, depth)
        assert _runs(dfa, ids) == want, (text, want)
        n, n_ok = n + 1, n_ok + want
    assert n > 200 and 40 < n_ok < n - 40  # both kinds were tried


def test_bpe_automaton_accepts_what_json_loads_accepts(bpe_tok):
    v = Vocab.of(bpe_tok)
    dfa = json_dfa(v, "object", 3)
    assert max(len(signature(s) or ()) for s in v.strings if s) >= 3  # multi-class tokens exist
    rng = random.Random(5)
    seen = {True: 0, False: 0}
    for text in _texts(rng, 300):
        ids = bpe_tok.encode(text, add_special_tokens=False)
        if any(not v.strings[i] for i in ids):  # a character split over byte tokens: no slot writes those
            continue
        want = _oracle(text, "object", 3)
        assert _runs(dfa, ids) == want, (text, [v.strings[i] for i in ids])
        seen[want] += 1
    assert min(seen.values()) > 100


def test_signatures_collapse_plain_runs_and_keep_literal_letters():
    assert signature("hello") == ("*",) and signature(" world!") == (" ", "*")
    assert signature("true") == tuple("true") and signature("ull") == tuple("ull")
    assert signature('":"') == ('"', ":", '"') and signature("  \n\n12") == (" ", "w", "1")
    assert signature("green") == ("*",) and signature("x\x01") is None and signature("a") == ("a",)
    assert signature("tree") == ("t", "*") and signature("\\nice") == ("\\", "n", "*")  # maybe an escape's letter
    assert signature("10") == ("1", "0")


def test_depth_and_width_limits_are_errors_naming_the_field(tiny_llm):
    with pytest.raises(ConstraintError, match="depth"):
        json_dfa(Vocab.of(tiny_llm.tokenizer), "object", 0)
    with pytest.raises(ConstraintError, match="top"):
        json_dfa(Vocab.of(tiny_llm.tokenizer), "string", 2)
    with pytest.raises(ConstraintError, match="response_format.*at least 2 tokens"):
        JsonObjectConstraint(tiny_llm.tokenizer, 1)


def _object(text: str) -> dict:
    v = json.loads(text)
    assert isinstance(v, dict)
    return v


def test_llm_json_object_always_parses_across_canvases(tiny_llm):
    """A random model writes garbage; JSON mode makes every output one JSON object, in one canvas or over
    several (canvas 16 here), and differs with the seed."""
    outs = set()
    for seed in range(6):
        for max_new in (12, 40):
            r = tiny_llm.generate("x", SamplingParams(seed=seed, json_object=True, max_new_tokens=max_new,
                                                      temperature=1.5))[0]
            _object(r.text)
            assert len(r.token_ids) <= max_new
            outs.add(r.text)
    assert len(outs) > 3
    with pytest.raises(Exception, match="json_object"):
        tiny_llm.generate("x", SamplingParams(json_object=True, regex="a"))


def test_schema_free_form_values_take_any_json(tiny_llm):
    schema = {"type": "object", "properties": {"meta": {"type": "object"}, "tags": {"type": "array"},
                                               "x": {}, "n": {"type": "integer"}}}
    c = JsonSchemaConstraint(schema, tiny_llm.tokenizer, JsonTemplateOptions(free_tokens=10))
    kinds = set()
    for seed in range(5):
        r = tiny_llm.generate("x", SamplingParams(seed=seed, constraint=c, temperature=1.5))[0]
        v = _object(r.text)
        assert isinstance(v["meta"], dict) and isinstance(v["tags"], list) and isinstance(v["n"], int)
        kinds.add(type(v["x"]).__name__)
    assert len(kinds) >= 2  # "x" is free: not always one type
    # no other keys allowed, or "properties": {} as tools without arguments declare it: only {}
    for closed in ({"type": "object", "additionalProperties": False}, {"type": "object", "properties": {}}):
        c = JsonSchemaConstraint(closed, tiny_llm.tokenizer)
        assert json.loads(tiny_llm.generate("x", SamplingParams(seed=0, constraint=c))[0].text) == {}


def test_commit_equals_argmax_when_valid_and_repairs_otherwise(tiny_llm):
    tok = tiny_llm.tokenizer
    V = tiny_llm.cfg.vocab_size
    c = JsonObjectConstraint(tok, 15).for_row()
    _, allowed = c.canvas(0, 16, V)
    good = tok.encode('{"a": [1, 2]}', add_special_tokens=False)
    ids = torch.tensor(good + [tok.eos_ids[0]] * (16 - len(good)))
    logits = torch.full((16, V), -5.0)
    logits[torch.arange(16), ids] = 5.0
    assert bool(allowed[torch.arange(16), ids].all())
    assert c.commit(0, ids, logits).tolist() == ids.tolist()
    bad = tok.encode('{"a": [1, 2}  ', add_special_tokens=False)
    ids = torch.tensor(bad + [tok.eos_ids[0]] * (16 - len(bad)))
    logits = torch.full((16, V), -5.0)
    logits[torch.arange(16), ids] = 5.0
    out = c.for_row().commit(0, ids, logits).tolist()
    text = tok.decode(out[:out.index(tok.eos_ids[0])])
    assert isinstance(json.loads(text), dict) and text != tok.decode(bad)


def test_cli_json_object(tiny_llm, capsys):
    from canvaslm.cli import main

    assert main(["generate", str(tiny_llm.model_dir), "--prompt", "x", "--json-object", "--max-new-tokens", "20",
                 "--seed", "3", "--device", "cpu"]) == 0
    _object(capsys.readouterr().out.strip())
    assert main(["generate", str(tiny_llm.model_dir), "--prompt", "x", "--json-object", "--regex", "a",
                 "--device", "cpu"]) == 2
    assert "--json-object and --regex" in capsys.readouterr().err


def test_http_json_mode_chat_completions_and_responses(client):
    import openai

    c, model = client
    msgs = [{"role": "user", "content": "an object"}]
    for seed in range(3):
        r = c.chat.completions.create(model=model, messages=msgs, response_format={"type": "json_object"},
                                      seed=seed, max_tokens=30, temperature=1.5)
        _object(r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop"
    r = c.completions.create(model=model, prompt="{", max_tokens=20, seed=1,
                             extra_body={"response_format": {"type": "json_object"}})
    _object(r.choices[0].text)
    resp = c.responses.create(model=model, input="an object", text={"format": {"type": "json_object"}},
                              max_output_tokens=30, extra_body={"seed": 2})
    _object(resp.output_text)
    stream = c.chat.completions.create(model=model, messages=msgs, response_format={"type": "json_object"},
                                       seed=4, max_tokens=30, stream=True)
    _object("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(model=model, messages=msgs, response_format={"type": "json_object"}, max_tokens=1)
