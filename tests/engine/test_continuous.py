"""LLM.generate_continuous: `generate` through the serving engine. A lone prompt gets generate's output;
in a list every output is what that prompt gets alone (continuous batching, queueing and prefix
caching change no token on the CPU); order and finish reasons are kept."""

from __future__ import annotations

import pytest

from canvaslm.generate import GenerationError
from canvaslm.llm import SamplingParams

PROMPTS = ["Hello there, general Kenobi", "a much longer prompt than the others, to vary lengths", "xy",
           "Hello there, general Kenobi, again", "zz top of the charts", "the quick brown fox"]


def params(i):
    return SamplingParams(seed=i, max_new_tokens=[8, 40, 16, 33, 24, 48][i], max_denoising_steps=[3, 6, 2, 5, 4, 6][i])


def test_a_lone_prompt_gets_generates_output(llm):
    sp = params(1)
    want = llm.generate(PROMPTS[1], sp)[0]
    (got,) = llm.generate_continuous(PROMPTS[1], sp)
    assert (got.token_ids, got.finish_reason, got.decoder_passes) == (want.token_ids, want.finish_reason,
                                                                     want.decoder_passes)
    assert got.text == want.text and got.prompt_ids == want.prompt_ids


@pytest.mark.parametrize("caching", [False, True])
def test_every_output_is_what_its_prompt_gets_alone(llm, caching):
    sps = [params(i) for i in range(len(PROMPTS))]
    together = llm.generate_continuous(PROMPTS, sps, max_batch=2, max_model_len=160, prefix_caching=caching)
    alone = [llm.generate_continuous(p, sp, max_model_len=160, prefix_caching=False)[0]
             for p, sp in zip(PROMPTS, sps)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
    assert all(len(r.token_ids) <= sp.max_new_tokens for r, sp in zip(together, sps))


def test_too_small_a_cache_is_refused(llm):
    with pytest.raises(GenerationError, match="max_model_len=20 is below the"):
        llm.generate_continuous(PROMPTS[0], params(0), max_model_len=20)


def test_bad_prompts_are_refused_as_generate_refuses_them(llm):
    V = llm.cfg.vocab_size
    for call in (llm.generate, llm.generate_continuous):
        with pytest.raises(GenerationError, match=rf"outside the vocabulary \[0, {V}\)"):
            call([[2, 5, V]], params(0))
        with pytest.raises(GenerationError, match="over max_position_embeddings"):
            call([[2] * llm.cfg.max_position_embeddings], params(0))


def test_the_default_context_is_what_the_longest_request_needs(llm):
    """Each request fits the model's context; the longest prompt plus the most canvases of another request do not:
    that is no request's need (generate runs the list too)."""
    C, top = llm.cfg.canvas_length, llm.cfg.max_position_embeddings
    long_prompt = [2] + [5 + k % 80 for k in range(top - 2 * C - 1)]  # needs top - C positions
    short = [2, 10, 11, 12]
    sps = [SamplingParams(seed=1, max_new_tokens=C, max_denoising_steps=1),
           SamplingParams(seed=2, max_new_tokens=3 * C, max_denoising_steps=1)]
    assert len(long_prompt) + C + 3 * C > top
    got = llm.generate_continuous([long_prompt, short], sps)
    assert [len(r.prompt_ids) for r in got] == [len(long_prompt), len(short)]
    assert got[1].token_ids == llm.generate_continuous([short], sps[1], max_model_len=len(long_prompt) + C)[0].token_ids
    with pytest.raises(GenerationError, match=f"below the {len(long_prompt) + C} positions"):
        llm.generate_continuous([long_prompt, short], sps, max_model_len=len(long_prompt))


def test_it_runs_inside_a_running_event_loop(llm):
    """In a notebook (or any async code) an event loop is already running: asyncio.run would refuse."""
    import asyncio

    sp = params(0)
    want = llm.generate_continuous(PROMPTS[0], sp)[0].token_ids

    async def inside():
        return llm.generate_continuous(PROMPTS[0], sp)[0].token_ids
    assert asyncio.run(inside()) == want
