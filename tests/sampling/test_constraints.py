"""Pinned tokens, banned ids, the token automata and the commit repair (canvaslm.sampling.constraints)."""

from __future__ import annotations

import pytest
import torch

from canvaslm.generate import RowRequest, generate_rows
from canvaslm.llm import SamplingParams
from canvaslm.sampling.constraints import ConstraintError, PinnedConstraint, pins_from_text
from canvaslm.sampling.token_dfa import Vocab, literal_dfa, number_dfa, string_dfa

# canvas is 16: the "xyz" pin at 14..16 straddles the first canvas boundary, "END" lies in canvas 2
PIN_TEXT = {0: "ab", 5: "Z", 14: "xyz", 35: "END"}


def _pinned_run(llm, seeds, steps, **kw):
    pins = pins_from_text(llm.tokenizer, PIN_TEXT)
    c = PinnedConstraint(pins, ban_ids=llm.eos_ids, ban_until=38)
    params = [SamplingParams(seed=s, max_denoising_steps=steps, max_new_tokens=40, constraint=c, **kw) for s in seeds]
    return pins, llm.generate(["hello"] * len(seeds), params)


@pytest.mark.parametrize("steps", [1, 2, 5, 8])
def test_pinned_positions_unchanged_for_every_seed_and_step_count(tiny_llm, steps):
    pins, results = _pinned_run(tiny_llm, seeds=[0, 1, 2, 3, 4, 5], steps=steps)
    for r in results:
        assert len(r.token_ids) >= 38
        for off, ids in pins.items():
            assert r.token_ids[off:off + len(ids)] == ids, (off, r.token_ids)
        assert not set(r.token_ids[:38]) & set(tiny_llm.eos_ids)


def test_pins_spanning_a_canvas_boundary_reach_the_text(tiny_llm):
    from tests.sampling.conftest import SILENT

    _, results = _pinned_run(tiny_llm, seeds=[7], steps=4, logit_bias=SILENT)  # one character per token
    text = results[0].text
    assert text.startswith("ab") and text[5] == "Z" and text[14:17] == "xyz" and text[35:38] == "END"


def test_pinned_draft_never_shows_other_tokens(tiny_llm):
    pins = pins_from_text(tiny_llm.tokenizer, {3: "QQ"})
    seen = []
    tiny_llm.generate("x", SamplingParams(seed=3, max_new_tokens=16, constraint=PinnedConstraint(pins)),
                      on_draft=lambda k, st: seen.append((st.canvas[0, 3:5].tolist(), st.argmax[0, 3:5].tolist())))
    assert seen and all(c == pins[3] and a == pins[3] for c, a in seen)


def test_empty_constraint_is_neutral(tiny_llm):
    for seed in range(3):
        plain = tiny_llm.generate("hi", SamplingParams(seed=seed, max_new_tokens=32))[0]
        hooked = tiny_llm.generate("hi", SamplingParams(seed=seed, max_new_tokens=32,
                                                         constraint=PinnedConstraint({})))[0]
        assert plain.token_ids == hooked.token_ids


def test_generate_rows_with_token_ids_and_shared_generator(tiny_llm):
    c = PinnedConstraint({2: [10, 11], 17: 12})
    p = tiny_llm.defaults.replace(max_new_tokens=20)
    rows = [RowRequest([5, 6, 7], p, (), 0, c), RowRequest([5, 6], p, (), 0, None)]
    out = generate_rows(tiny_llm.model, rows, torch.Generator().manual_seed(0))
    assert out[0].token_ids[2:4] == [10, 11] and out[0].token_ids[17] == 12


def test_pin_errors_name_the_problem(tiny_llm):
    with pytest.raises(ConstraintError, match="offset"):
        PinnedConstraint({-1: 5})
    with pytest.raises(ConstraintError, match="disagree at output offset 3"):
        PinnedConstraint({2: [5, 6], 3: 7})
    with pytest.raises(ConstraintError, match="outside the vocabulary"):
        tiny_llm.generate("hi", SamplingParams(seed=0, max_new_tokens=16, constraint=PinnedConstraint({1: 10_000})))
    with pytest.raises(ValueError, match="below the 40 tokens"):
        tiny_llm.generate("hi", SamplingParams(seed=0, max_new_tokens=16, constraint=PinnedConstraint({39: 9})))


# --- automata ---------------------------------------------------------------------------------

def _decode(vocab, ids):
    return vocab.text(ids)


@pytest.mark.parametrize("integer", [True, False])
def test_number_slot_is_always_a_number(tiny_llm, integer):
    vocab = Vocab.of(tiny_llm.tokenizer)
    dfa = number_dfa(vocab, integer=integer, allow_minus=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(7, vocab.V, generator=g) * 5
        ids, _ = dfa.best_path(dfa.start, torch.log_softmax(logits, -1), 7)
        text = _decode(vocab, ids).strip()
        value = int(text) if integer else float(text)
        assert str(value) == text or not integer
        assert text == text.strip() and " " not in text


def test_best_path_equals_argmax_when_argmax_is_valid(tiny_llm):
    vocab = Vocab.of(tiny_llm.tokenizer)
    dfa = number_dfa(vocab, integer=True, allow_minus=True)
    want = tiny_llm.tokenizer.encode("-402  ", add_special_tokens=False)
    logits = torch.randn(6, vocab.V)
    logits[torch.arange(6), torch.tensor(want)] = 50.0
    ids, _ = dfa.best_path(dfa.start, torch.log_softmax(logits, -1), 6)
    assert ids == want


def test_literal_choice_among_shared_prefixes(tiny_llm):
    vocab = Vocab.of(tiny_llm.tokenizer)
    alts = [vocab.encode(f'"{s}"') for s in ["ab", "abc", "abd"]]
    dfa = literal_dfa(vocab, alts)
    g = torch.Generator().manual_seed(1)
    got = set()
    for _ in range(40):
        masks = dfa.token_masks(dfa.start, 5, 5, vocab.V)
        logits = (torch.randn(5, vocab.V, generator=g) * 4).masked_fill(~masks, float("-inf"))
        ids, _ = dfa.best_path(dfa.start, torch.log_softmax(logits, -1), 5)
        got.add(_decode(vocab, ids).strip())
    assert got <= {'"ab"', '"abc"', '"abd"'} and len(got) >= 2


def test_string_slot_respects_length_bounds_across_a_split(tiny_llm):
    vocab = Vocab.of(tiny_llm.tokenizer)
    dfa = string_dfa(vocab, 3, 6)
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        # the slot (7 wide) is decided in two parts, as when it straddles a canvas boundary
        a, s = dfa.best_path(dfa.start, torch.log_softmax(torch.randn(4, vocab.V, generator=g) * 3, -1), 7)
        b, _ = dfa.best_path(s, torch.log_softmax(torch.randn(3, vocab.V, generator=g) * 3, -1), 3)
        text = _decode(vocab, a + b)
        content, close, pad = text.partition('"')
        assert close and 3 <= len(content) <= 6 and pad.strip() == "" and "\\" not in content
