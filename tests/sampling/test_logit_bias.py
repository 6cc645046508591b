"""logit_bias: checked input, and an additive bias that moves samples, ranking and the committed argmax."""

from __future__ import annotations

import math

import pytest

from canvaslm.generate import GenerationError
from canvaslm.llm import SamplingParams
from canvaslm.sampling.logit_bias import LogitBiasError, normalize

PROMPT = "Once upon a time"


def test_normalize_accepts_openai_keys_and_names_what_is_wrong():
    assert normalize({"7": 5, 3: -100.0}, vocab=10) == ((3, -100.0), (7, 5.0))
    assert normalize(None) == () and normalize({}) == ()
    for bad, words in [({"x": 1}, "'x' is not a token id"), ({"1.5": 1}, "not a token id"),
                       ({"12": 1}, "outside the vocabulary [0, 10)"), ({"-1": 1}, "outside the vocabulary"),
                       ({"1": 101}, "expected a number in [-100, 100]"), ({"1": math.nan}, "[-100, 100]"),
                       ({"1": True}, "[-100, 100]"), ({"1": "5"}, "[-100, 100]")]:
        with pytest.raises(LogitBiasError, match="logit_bias") as e:
            normalize(bad, vocab=10)
        assert words in str(e.value)


def test_plus_100_forces_a_token_and_eos_ends_at_once(tiny_llm):
    x = tiny_llm.tokenizer.encode("x", add_special_tokens=False)[0]
    out = tiny_llm.generate(PROMPT, SamplingParams(seed=1, max_new_tokens=20, logit_bias={x: 100}))[0]
    assert out.token_ids == [x] * 20 and out.finish_reason == "length"
    eos = tiny_llm.eos_ids[0]
    out = tiny_llm.generate(PROMPT, SamplingParams(seed=1, max_new_tokens=20, logit_bias={str(eos): 100}))[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"


def test_minus_100_bans_and_zero_changes_nothing(tiny_llm):
    sp = dict(seed=3, max_new_tokens=32, max_denoising_steps=8)
    plain = tiny_llm.generate(PROMPT, SamplingParams(**sp))[0]
    assert plain.token_ids
    banned = set(plain.token_ids)
    out = tiny_llm.generate(PROMPT, SamplingParams(**sp, logit_bias={t: -100 for t in banned}))[0]
    assert out.token_ids and not banned & set(out.token_ids)
    zero = tiny_llm.generate(PROMPT, SamplingParams(**sp, logit_bias={t: 0 for t in banned}))[0]
    assert zero.token_ids == plain.token_ids


def test_bad_bias_is_a_generation_error(tiny_llm):
    with pytest.raises(GenerationError, match=r"SamplingParams.logit_bias: token id 100000 is outside the vocabulary"):
        tiny_llm.generate(PROMPT, SamplingParams(logit_bias={100000: 1}))
    with pytest.raises(GenerationError, match=r"SamplingParams.logit_bias\['1'\]"):
        SamplingParams(logit_bias={"1": 500})


def test_server_logit_bias(client, tiny_llm):
    import openai

    cli, model = client
    x = tiny_llm.tokenizer.encode("q", add_special_tokens=False)[0]
    out = cli.completions.create(model=model, prompt=PROMPT, max_tokens=10, seed=2, logit_bias={str(x): 100})
    assert out.choices[0].text == "q" * 10
    with pytest.raises(openai.BadRequestError) as e:
        cli.completions.create(model=model, prompt=PROMPT, max_tokens=4, logit_bias={"999999": 1})
    assert e.value.body["param"] == "logit_bias" and "outside the vocabulary" in e.value.body["message"]


@pytest.mark.parametrize("n", [5, 20])  # inside the first canvas (16 tokens), and past it
def test_min_tokens_holds_eos_back_until_the_nth_token(tiny_llm, n):
    eos = tiny_llm.eos_ids[0]
    sp = dict(seed=2, max_new_tokens=32, logit_bias={eos: 100})  # the model wants EOS everywhere
    out = tiny_llm.generate(PROMPT, SamplingParams(**sp, min_tokens=n))[0]
    assert len(out.token_ids) == n + 1 and out.token_ids[-1] == eos and out.finish_reason == "stop"
    assert not set(out.token_ids[:-1]) & set(tiny_llm.eos_ids)
    with pytest.raises(GenerationError, match="min_tokens=40 is over max_new_tokens=32"):
        tiny_llm.generate(PROMPT, SamplingParams(**sp, min_tokens=40))
    with pytest.raises(GenerationError, match="min_tokens must be a non-negative integer"):
        SamplingParams(min_tokens=-1)


def test_server_min_tokens(client, tiny_llm):
    import openai

    cli, model = client
    eos = tiny_llm.eos_ids[0]
    from tests.sampling.conftest import SILENT

    kw = dict(model=model, prompt=PROMPT, max_tokens=24, seed=6, logit_bias={**SILENT, eos: 100})
    plain = cli.completions.create(**kw)
    got = cli.completions.create(**kw, extra_body={"min_tokens": 7})
    assert plain.usage.completion_tokens == 1 and plain.choices[0].text == ""  # EOS at once
    assert got.usage.completion_tokens == 8 and len(got.choices[0].text) == 7  # 7 characters, then EOS
    assert got.choices[0].finish_reason == "stop"
    for extra, words in [({"min_tokens": 30}, "over the 24 tokens"),
                         ({"min_tokens": 3, "guided_choice": ["a", "b"]}, "constrained output")]:
        with pytest.raises(openai.BadRequestError) as e:
            cli.completions.create(model=model, prompt=PROMPT, max_tokens=24, extra_body=extra)
        assert e.value.body["param"] == "min_tokens" and words in e.value.body["message"]
