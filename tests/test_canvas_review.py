"""Canvas-control review fixes, offline (LLM, CLI, PinnedConstraint). A PinnedConstraint that bans EOS before its
last pin now bans the request's stop_token_ids there too (a stop id drawn before a pin ended the output and
dropped the pins). Pins are stored sparsely: a pin at a huge offset no longer lays out a list as long as the
offset before the context check refuses it (1 GB for offset 10**8). Infill with an empty suffix scores each
middle with the EOS that ends the text (an empty middle scored nothing: a mean of 0.0 that always won).
`--pin` text the tokenizer cannot encode is an error naming the flag."""

from __future__ import annotations

import re
import time
import tracemalloc

import pytest

from canvaslm.generate import GenerationError
from canvaslm.llm import LLM, SamplingParams
from canvaslm.sampling.constraints import ConstraintError, PinnedConstraint
from canvaslm.scoring import score_continuations
from canvaslm.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(make_tiny_checkpoint(tmp_path_factory.mktemp("canvas_review")), device="cpu", dtype="float32")


def test_stop_token_ids_are_banned_before_the_last_pin(llm):
    """The reviewer's case: a stop id the model favours (logit_bias) was drawn at offset 0 and ended the output."""
    pins = {10: [11, 12]}
    for seed in range(3):
        sp = SamplingParams(seed=seed, stop_token_ids=[20], logit_bias={20: 100}, max_new_tokens=16,
                            constraint=PinnedConstraint(pins, ban_ids=llm.eos_ids, ban_until=12))
        ids = llm.generate("Q", sp)[0].token_ids
        assert ids[10:12] == [11, 12] and 20 not in ids[:10], ids
    # a constraint that bans no EOS (the caller's choice) is left as it is
    c = PinnedConstraint(pins)
    assert c.banning([20]) is c


def test_a_pinned_end_id_before_the_last_pin_is_refused_offline(llm):
    """As the server's 400: a pinned EOS (or stop id) before the last pin ended the output there and dropped the
    later pins, silently (LLM.generate and `canvaslm generate --pin`)."""
    eos = llm.eos_ids[0]
    for pins, stop in (({0: eos, 5: 11}, None), ({0: 20, 5: 11}, [20]), ({3: [11, eos, 12]}, None)):
        c = PinnedConstraint(pins, ban_ids=llm.eos_ids, ban_until=6)
        with pytest.raises(GenerationError, match=r"the pinned id at output offset \d+ ends the output .*before the "
                                                  r"last pin ends at \d+"):
            llm.generate("Q", SamplingParams(constraint=c, seed=0, stop_token_ids=stop))
    # an end id as the last pin, or pins that ban no EOS (the caller's choice), stand
    ok = PinnedConstraint({2: 11, 5: eos}, ban_ids=llm.eos_ids, ban_until=6)
    assert llm.generate("Q", SamplingParams(constraint=ok, seed=0, max_new_tokens=8))[0].token_ids[5] == eos
    assert llm.generate("Q", SamplingParams(constraint=PinnedConstraint({0: eos, 5: 11}), seed=0))[0].token_ids == \
        [eos]


@pytest.mark.parametrize("kw,msg", [
    (dict(ban_ids=(-1,)), "ban_ids must be a list of non-negative token ids, got (-1,)"),
    (dict(ban_ids=5), "ban_ids must be a list of non-negative token ids, got 5"),
    (dict(ban_ids="ab"), "ban_ids must be a list"),
    (dict(ban_ids=(True,)), "ban_ids must be a list"),
    (dict(ban_ids=(1,), ban_until=-5), "ban_until must be a non-negative output offset, got -5"),
    (dict(ban_ids=(1,), ban_until=2.0), "ban_until must be a non-negative output offset, got 2.0"),
])
def test_ban_arguments_are_checked(kw, msg):
    with pytest.raises(ConstraintError, match=re.escape(msg)):
        PinnedConstraint({0: 10}, **kw)


def test_a_pinned_bool_or_a_banned_id_past_the_vocabulary_is_named(llm):
    with pytest.raises(ConstraintError, match="pinned token at offset 0 must be a non-negative id, got True"):
        PinnedConstraint({0: True})  # was token id 1, the EOS
    V = llm.cfg.vocab_size
    c = PinnedConstraint({0: 10}, ban_ids=(V,), ban_until=4)  # was an IndexError from the mask
    with pytest.raises(ConstraintError, match=rf"banned token ids \(ban_ids\) \[{V}\] are outside the vocabulary"):
        llm.generate("Q", SamplingParams(constraint=c, seed=0))


def test_banning_adds_the_ids_to_the_ban_only():
    c = PinnedConstraint({3: 7}, ban_ids=(1,), ban_until=4)
    d = c.banning([1, 20])
    assert d is not c and d.ban_ids == (1, 20) and c.ban_ids == (1,)
    assert d.layout(16).banned == [(0, 4, (1, 20))] and c.layout(16).banned == [(0, 4, (1,))]
    assert list(d.layout(16).pinned) == [-1, -1, -1, 7]


def test_a_pin_at_a_huge_offset_is_stored_sparsely():
    tracemalloc.start()
    try:
        c = PinnedConstraint({10**7: [5, 6]}, ban_ids=(1,), ban_until=10**7 + 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # was a 10**7-long list: 80 MB
    lay = c.layout(16)
    assert lay.length == 10**7 + 2 and lay.pinned[10**7 - 1:10**7 + 3] == [-1, 5, 6]
    assert lay.pinned[-1] == 6 and lay.pinned[0] == -1
    pinned, allowed = c.canvas(10**7 // 16, 16, 32)  # the canvas holding the pin
    assert pinned.tolist()[10**7 % 16:10**7 % 16 + 2] == [5, 6] and allowed is not None


def test_a_huge_pin_offset_is_refused_at_once_offline(llm):
    for off in (10**5, 10**9):
        t = time.perf_counter()
        with pytest.raises(GenerationError, match="past the model's context"):
            llm.generate("Q", SamplingParams(seed=0, constraint=PinnedConstraint({off: [10]}, ban_ids=llm.eos_ids,
                                                                                 ban_until=off + 1)))
        assert time.perf_counter() - t < 5


def test_cli_pin_errors_name_the_flag(llm, capsys):
    from canvaslm.cli import main

    assert main(["generate", str(llm.model_dir), "--prompt", "Q", "--pin", "3:\u00e9", "--device", "cpu"]) == 2
    assert "--pin 3:\u00e9: " in capsys.readouterr().err
    t = time.perf_counter()
    assert main(["generate", str(llm.model_dir), "--prompt", "Q", "--pin", "1000000000:a", "--device", "cpu"]) == 2
    assert "past the model's context" in capsys.readouterr().err and time.perf_counter() - t < 30


def test_infill_with_no_suffix_scores_the_eos_after_the_middle(llm):
    """`infill("def", "", gaps=[0, 2])` scored gap 0 as 0.0 (nothing to score), so the empty middle always won."""
    r = llm.infill("def", "", SamplingParams(seed=1), gaps=[0, 2])
    prompt, eos = llm.tokenizer.encode("def"), llm.eos_ids[0]
    assert r.scores[0] < 0.0  # was 0.0
    assert abs(r.scores[0] - score_continuations(llm.model, prompt, [[eos]])[0]) < 1e-4
    assert abs(r.scores[r.gap] - score_continuations(llm.model, prompt, [r.middle_ids + [eos]])[0]) < 1e-4
    # with a suffix, middle + suffix are scored as before
    r = llm.infill("def", "x", SamplingParams(seed=1), gaps=[2])
    suffix = llm.tokenizer.encode("x", add_special_tokens=False)
    assert abs(r.scores[2] - score_continuations(llm.model, prompt, [r.middle_ids + suffix])[0]) < 1e-4
