"""frequency / presence / repetition penalties: the penalised logits against a per-position brute force
from the definition (committed output + the draft at every other position before its first end token,
plus the prompt for the repetition penalty), checked input, and the same outputs through LLM.generate
and the engine (the server's fields: tests/server/test_openai_client.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from canvaslm.config import ConfigError, DiffusionParams
from canvaslm.generate import GenerationError
from canvaslm.llm import SamplingParams
from canvaslm.sampling import penalties
from canvaslm.sampling.penalties import Penalties, PenaltyState

END = (1, 2)


def _brute(logits, prompt, committed, draft, f, p, r):
    """Penalised logits [C, V] from the definition, position by position, in float64."""
    x = logits.double().numpy().copy()
    C, _ = x.shape
    if draft is not None:
        first_end = next((j for j, t in enumerate(draft) if t in END), C)
    for i in range(C):
        out = Counter(committed)
        if draft is not None:
            out.update(t for j, t in enumerate(draft[:first_end]) if j != i)
        for v, n in out.items():
            x[i, v] -= f * n + p * (n > 0)
        if r != 1:
            for v in set(prompt) | set(out):
                # the multiplicative penalty comes first, on the unpenalised logit
                orig = logits[i, v].item()
                scaled = orig / r if orig > 0 else orig * r
                x[i, v] += scaled - orig
    return x


CASES = [(0.5, 0.0, 1.0), (0.0, 1.5, 1.0), (0.0, 0.0, 1.3), (0.7, -0.4, 0.8), (-1.0, 2.0, 1.6)]


@pytest.mark.parametrize("with_draft", [False, True])
@pytest.mark.parametrize("f,p,r", CASES)
def test_penalised_logits_match_a_brute_force_per_position(f, p, r, with_draft, monkeypatch):
    monkeypatch.setattr(penalties, "POSITIONS_PER_CHUNK", 3)  # several chunks in a row of 8
    C, V = 8, 40
    g = torch.Generator().manual_seed(int(10 * f + 3 * p + 7 * r) + with_draft)
    logits = torch.randn(C, V, generator=g) * 3
    logits[0, 5] = float("-inf")  # a banned token stays banned
    prompt, committed = [3, 4, 4, 9], [4, 7, 7, 7, 11]
    draft = [7, 12, 12, 3, 2, 7, 7, 30] if with_draft else None  # 2 ends it: positions 4-7 do not count
    st = PenaltyState(Penalties(f, p, r), prompt, END, V, "cpu")
    st.commit(committed[:2])
    st.commit(torch.tensor(committed[2:]))
    got = st.apply(logits.clone(), None if draft is None else torch.tensor(draft))
    want = _brute(logits, prompt, committed, draft, f, p, r)
    assert np.array_equal(np.isinf(got.numpy()), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got.numpy()[fin], want[fin], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got.numpy()[fin], logits.numpy()[fin])  # something was penalised


def test_bad_values_name_the_field():
    for kw, name in [({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty"),
                     ({"repetition_penalty": 0}, "repetition_penalty"),
                     ({"repetition_penalty": 5e-324}, "repetition_penalty"),
                     ({"repetition_penalty": 101}, "repetition_penalty"),
                     ({"repetition_penalty": float("inf")}, "repetition_penalty"),
                     ({"frequency_penalty": True}, "frequency_penalty")]:
        with pytest.raises(ConfigError, match=name):
            DiffusionParams(**kw)
        with pytest.raises((GenerationError, ConfigError), match=name):
            SamplingParams(**kw).resolve(DiffusionParams())
    assert Penalties.of(DiffusionParams()) is None  # the defaults penalise nothing


def _repeats(ids) -> int:
    return sum(n - 1 for n in Counter(ids).values())


def test_penalties_cut_repeats_and_the_engine_agrees(tiny_llm):
    """A strong frequency + presence penalty leaves fewer repeated tokens in the output than none (same
    seeds); the engine gives LLM.generate's tokens for a batch that mixes penalised and plain requests."""
    C = tiny_llm.cfg.canvas_length
    prompts = [f"Once upon a time {i}" for i in range(4)]
    plain = [SamplingParams(seed=s, max_new_tokens=3 * C) for s in range(4)]
    strong = [SamplingParams(seed=s, max_new_tokens=3 * C, frequency_penalty=2.0, presence_penalty=2.0)
              for s in range(4)]
    base = tiny_llm.generate(prompts, plain)
    pen = tiny_llm.generate(prompts, strong)
    assert sum(_repeats(o.token_ids) for o in pen) < sum(_repeats(o.token_ids) for o in base)
    rep = [SamplingParams(seed=s, max_new_tokens=3 * C, repetition_penalty=1.8) for s in range(4)]
    assert [o.token_ids for o in tiny_llm.generate(prompts, rep)] != [o.token_ids for o in base]

    mixed = [strong[0], plain[1], rep[2], SamplingParams(seed=3, max_new_tokens=3 * C, frequency_penalty=-1.0)]
    alone = [tiny_llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, mixed)]
    together = tiny_llm.generate_continuous(prompts, mixed, max_batch=4,
                                            max_model_len=len(tiny_llm.encode_prompt(prompts[0])) + 3 * C)
    assert [o.token_ids for o in together] == alone
