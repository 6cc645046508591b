"""`max_time`, a per-request latency budget (config.DiffusionParams): once it is spent, the canvas being
denoised is committed as its current argmax draft and ends the request. Through `LLM.generate` (the static
batch) and the serving engine (`generate_continuous`), with the same meaning."""

from __future__ import annotations

import pytest

from canvaslm.config import ConfigError, DiffusionParams
from canvaslm.llm import GenerationError, SamplingParams

PROMPT = "Hello there, general Kenobi"


def sp(**kw):
    return SamplingParams(**{"seed": 3, "max_denoising_steps": 8, **kw})


def run(llm, how, prompts, params):
    if how == "generate":
        return llm.generate(prompts, params)
    return llm.generate_continuous(prompts, params, max_model_len=128)


@pytest.mark.parametrize("how", ["generate", "continuous"])
def test_a_spent_budget_commits_the_first_draft_and_ends(llm, how):
    C = llm.cfg.canvas_length
    # every request's first denoising step takes more than a nanosecond: each ends after that one step, with
    # the draft a one-step run commits for its first canvas (same geometry, same seed, same noise)
    (one_step,) = run(llm, how, PROMPT, sp(max_new_tokens=3 * C, max_denoising_steps=1))
    (timed,) = run(llm, how, PROMPT, sp(max_new_tokens=3 * C, max_time=1e-9))
    assert timed.decoder_passes == 1
    assert len(timed.token_ids) <= C and timed.token_ids == one_step.token_ids[:len(timed.token_ids)]
    eos = set(llm.eos_ids)
    ended_on_eos = bool(timed.token_ids) and timed.token_ids[-1] in eos
    assert timed.finish_reason == ("stop" if ended_on_eos else "length")
    assert ended_on_eos or len(timed.token_ids) == C  # no EOS: the whole first canvas
    # a budget that is never spent changes nothing
    (free,) = run(llm, how, PROMPT, sp(max_new_tokens=3 * C))
    (roomy,) = run(llm, how, PROMPT, sp(max_new_tokens=3 * C, max_time=1e6))
    assert (roomy.token_ids, roomy.decoder_passes) == (free.token_ids, free.decoder_passes)
    assert free.decoder_passes > 1


@pytest.mark.parametrize("how", ["generate", "continuous"])
def test_a_timed_request_leaves_its_batch_mates_alone(llm, how):
    C = llm.cfg.canvas_length
    prompts = [PROMPT, "the quick brown fox jumps over"]
    plain = [sp(seed=3, max_new_tokens=2 * C), sp(seed=4, max_new_tokens=2 * C)]
    timed = [sp(seed=3, max_new_tokens=2 * C, max_time=1e-9), plain[1]]
    a, b = run(llm, how, prompts, plain), run(llm, how, prompts, timed)
    assert b[0].decoder_passes == 1 and a[0].decoder_passes > 1
    assert (b[1].token_ids, b[1].decoder_passes) == (a[1].token_ids, a[1].decoder_passes)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_max_time_must_be_a_positive_number_of_seconds(bad):
    with pytest.raises(ConfigError, match="max_time"):
        DiffusionParams(max_time=bad)


def test_max_time_with_a_constraint_is_limited_to_one_canvas(llm):
    # as the server refuses it: a spent budget would end a constrained output mid-way, past its first canvas
    C = llm.cfg.canvas_length
    with pytest.raises(GenerationError, match=rf"max_time with a constraint needs max_new_tokens <= {C}"):
        llm.generate(PROMPT, sp(max_new_tokens=2 * C, max_time=5.0, choice=["yes", "no"]))
    with pytest.raises(GenerationError, match="max_time"):
        llm.generate(PROMPT, sp(max_new_tokens=C + 1, max_time=5.0, regex="[a-z]+"))
    (fits,) = llm.generate(PROMPT, sp(max_new_tokens=C, max_time=1e6, choice=["yes", "no"]))
    assert fits.text in ("yes", "no")
    (free,) = llm.generate(PROMPT, sp(max_new_tokens=2 * C, max_time=1e6))  # no constraint: no limit
    assert len(free.token_ids) <= 2 * C
