"""Canvas control leaves unconstrained generation alone: token-identical to `transformers` (the
reference) and to a stored run of the unconstrained path, with and without an empty constraint."""

from __future__ import annotations

import pytest
import torch

from canvaslm.llm import SamplingParams
from canvaslm.sampling.constraints import PinnedConstraint

# canvaslm generate on make_tiny_checkpoint(), prompt "hi there", 40 tokens, 4 steps, recorded before
# constraints existed in generate.py (with torch.multinomial's draws: sampler_impl="reference")
STORED = {
    0: [79, 13, 37, 49, 44, 39, 38, 14, 42, 61, 29, 42, 55, 73, 96, 39, 55, 83, 58, 10, 37, 37, 58, 76, 54, 54,
        83, 73, 39, 72, 37, 18, 53, 83, 21, 83, 39, 12, 33, 90],
    5: [58, 13, 12, 7, 58, 58, 37, 43, 12, 54, 46, 35, 7, 90, 7, 59, 46, 13, 54, 73, 55, 87, 58, 58, 76, 54, 54,
        37, 83, 46, 90, 12, 46, 55, 13, 37, 90, 2, 37, 96],
}


@pytest.mark.parametrize("seed", sorted(STORED))
@pytest.mark.parametrize("constraint", [None, PinnedConstraint({})], ids=["none", "empty"])
def test_matches_stored_unconstrained_run(tiny_llm, seed, constraint):
    from canvaslm.llm import LLM

    llm = LLM.from_model(tiny_llm.model, tiny_llm.defaults, tiny_llm.tokenizer, sampler_impl="reference")
    r = llm.generate("hi there", SamplingParams(seed=seed, max_new_tokens=40, max_denoising_steps=4,
                                                     constraint=constraint))[0]
    assert r.token_ids == STORED[seed]


def test_empty_constraint_matches_transformers(tmp_path):
    from canvaslm.llm import LLM
    from tests.conftest import build_reference

    ref = build_reference(tmp_path, "window8_canvas16")
    llm = LLM(tmp_path, device="cpu", sampler_impl="reference")  # transformers' draws
    prompt = [5, 17, 9, 33, 2, 71, 8]
    n_new = 40
    torch.manual_seed(1)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n_new, max_denoising_steps=4)
    want = out.sequences[0, len(prompt):].tolist()[:n_new]
    cut = next((i for i, t in enumerate(want) if t in llm.eos_ids), None)
    want = want if cut is None else want[:cut + 1]
    got = llm.generate(prompt, SamplingParams(max_new_tokens=n_new, max_denoising_steps=4, seed=1,
                                              constraint=PinnedConstraint({})))[0]
    assert got.token_ids == want
