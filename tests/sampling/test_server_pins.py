"""`pins` over HTTP (canvas control, as `canvaslm generate --pin` and PinnedConstraint): text or ids at
output token offsets, whatever the model says, with the output running at least to the last pin."""

from __future__ import annotations

import pytest

from tests.sampling.conftest import SILENT

openai = pytest.importorskip("openai")


def test_pinned_text_lands_at_its_offsets(client, tiny_llm):
    c, model = client
    for seed in range(3):
        r = c.completions.create(model=model, prompt="Q: why?", max_tokens=40, seed=seed, logit_bias=SILENT,
                                 extra_body={"pins": {"0": "Answer:", "20": "Because"}})
        text = r.choices[0].text  # the char tokenizer: one token per character (no silent specials)
        assert text.startswith("Answer:") and text[20:27] == "Because", text
    ids = tiny_llm.tokenizer.encode("xyz", add_special_tokens=False)
    chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                                     seed=1, logit_bias=SILENT, extra_body={"pins": {"4": ids}})
    assert chat.choices[0].message.content[4:7] == "xyz"
    stream = c.completions.create(model=model, prompt="Q: why?", max_tokens=40, seed=0, stream=True,
                                  extra_body={"pins": {"0": "Answer:", "20": "Because"}})
    streamed = "".join(ch.choices[0].text for ch in stream if ch.choices)
    whole = c.completions.create(model=model, prompt="Q: why?", max_tokens=40, seed=0,
                                 extra_body={"pins": {"0": "Answer:", "20": "Because"}}).choices[0].text
    assert streamed == whole


@pytest.mark.parametrize("extra,words", [
    ({"pins": {"x": "a"}}, "not an output token offset"),
    ({"pins": {"30": "Because"}}, "ends at output token 37, over max_tokens=32"),
    ({"pins": {"0": [10**9]}}, "within the vocabulary"),
    ({"pins": {"0": "ab", "1": "c"}}, "two pins disagree at output offset 1"),
    ({"pins": {"0": "a"}, "guided_choice": ["x", "y"]}, "both constrain the output"),
])
def test_bad_pins_are_a_400_naming_them(client, extra, words):
    c, model = client
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=model, prompt="hi", max_tokens=32, extra_body=extra)
    assert e.value.body["param"] in ("pins", "guided_choice") and words in e.value.body["message"]


@pytest.mark.parametrize("offset", ["100000000000000", "100000"])
def test_a_pin_past_the_context_is_refused_before_it_is_laid_out(client, offset):
    """Without max_tokens a huge offset once built a list that long (a MemoryError 500, or gigabytes)."""
    c, model = client
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=model, prompt="hi", extra_body={"pins": {offset: "a"}})
    assert e.value.body["param"] == "pins" and "past the context" in e.value.body["message"]
