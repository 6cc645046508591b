"""Sampling review fixes: float16 self-conditioning at near-greedy temperatures, frozen rows of a shared
generator's batch, stability thresholds past the step count, schedules below float32's range, logit_bias on
bfloat16 models, and out-of-range integer parameters."""

from __future__ import annotations

import asyncio

import pytest
import torch

from canvaslm.config import ConfigError, DiffusionParams
from canvaslm.generate import GenerationError, narrowed_sc_logits
from canvaslm.llm import LLM, SamplingParams
from canvaslm.sampling.schedules import GREEDY_TEMPERATURE, linear_temperature


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("samp_review"), std=1.5)  # peaked: steps converge


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, device="cpu", dtype="float32")


# --------------------------------------------------------------- float16 self-conditioning

def test_narrowed_sc_logits_shifts_only_float16_and_keeps_the_softmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, generator=g) * 30 / 4e-4  # softcapped logits at a near-greedy temperature
    x[0, 0, 7:] = float("-inf")  # banned ids
    for dtype in (torch.float32, torch.bfloat16):  # float32's exponent range: cast as before, bit for bit
        assert torch.equal(narrowed_sc_logits(x.clone(), dtype), x.to(dtype))
    half = narrowed_sc_logits(x.clone(), torch.float16)
    assert half.dtype == torch.float16 and not half.isnan().any() and not half.isposinf().any()
    assert torch.allclose(torch.softmax(half.float(), -1), torch.softmax(x, -1), atol=1e-3)
    assert x.to(torch.float16).isinf().any()  # what the plain cast gave


@pytest.fixture(scope="module")
def confident(ckpt, tmp_path_factory):
    """The checkpoint with a peaked head (logits near the softcap, 30, as a trained model's): 30 / 4e-4 > 65504."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("samp_confident") / "ckpt"
    shutil.copytree(ckpt, d)
    w = load_file(d / "model.safetensors")
    w["model.decoder.norm.weight"] = w["model.decoder.norm.weight"] * 8 + 8
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("impl", ["auto", "reference", "fused"])
def test_float16_near_greedy_generation_is_not_all_padding(confident, impl):
    """temperature 0 (the server's and CLI's GREEDY_TEMPERATURE) on a float16 model: logits / 4e-4 passed
    float16's 65504 in the self-conditioning logits, inf -> NaN, and every output token was 0 (padding)."""
    llm16 = LLM(confident, device="cpu", dtype="float16", sampler_impl=impl)
    sp = SamplingParams(max_new_tokens=16, seed=1, temperature=GREEDY_TEMPERATURE, max_denoising_steps=48,
                        confidence_threshold=1e-30)
    overflow = []
    ids = llm16.generate("hello", sp, on_draft=lambda k, st: overflow.append(
        bool(st.sc_logits.isposinf().any() or st.sc_logits.isnan().any())))[0].token_ids
    assert overflow and not any(overflow)
    assert ids.count(0) < len(ids) // 2, ids
    assert llm16.generate_continuous("hello", sp, use_tqdm=False)[0].token_ids == ids


# --------------------------------------------------------------- a shared generator's frozen rows

def test_a_stopped_row_keeps_its_last_temperature():
    t_min, span, n = torch.tensor([0.0, 0.4]), torch.tensor([0.8, 0.4]), torch.tensor([2, 2], dtype=torch.int32)
    last = linear_temperature(torch.tensor([1, 1]), n, t_min, span)
    for cur in (0, -1, -5):
        assert torch.equal(linear_temperature(torch.tensor([cur, cur]), n, t_min, span), last)
    assert torch.equal(linear_temperature(torch.tensor([2, 1]), n, t_min, span), torch.tensor([0.8, 0.6]))


@pytest.mark.parametrize("t_min", [0.0, 0.4])
def test_shared_generator_row_with_fewer_steps_does_not_crash_the_batch(ckpt, t_min):
    """A row with fewer steps stays, frozen, in a shared generator's batch while its cur_step fell to 0, -1,
    ...: its temperature reached 0 (t_min = 0 at once, the default 0.4 four steps later), NaN probabilities,
    and torch.multinomial raised for the whole batch. Its batch-mate's tokens do not depend on it."""
    ref = LLM(ckpt, device="cpu", dtype="float32", sampler_impl="reference")

    def run(a_t_min):
        ps = [SamplingParams(max_new_tokens=8, t_min=a_t_min, max_denoising_steps=2),
              SamplingParams(max_new_tokens=8, max_denoising_steps=8, confidence_threshold=1e-9)]
        return ref.generate(["hi", "yo"], ps, generator=torch.Generator().manual_seed(0))

    out = run(t_min)
    assert out[1].token_ids == run(0.2)[1].token_ids
    assert all(len(o.token_ids) for o in out)


# --------------------------------------------------------------- stability thresholds past the steps

def test_stability_threshold_past_the_steps_is_capped(llm):
    """A threshold >= max_denoising_steps is never met; its history was [B, threshold, C], copied every step
    (2,000,000: 6 s and 800 MB more for the same tokens). It is sized from the capped value now."""
    assert DiffusionParams(stability_threshold=10**6, max_denoising_steps=8).stability_depth == 8
    assert DiffusionParams(stability_threshold=3, max_denoising_steps=8).stability_depth == 3
    depths = []
    outs = [llm.generate("hi", SamplingParams(max_new_tokens=32, seed=0, max_denoising_steps=8, stability_threshold=s),
                         on_draft=lambda k, st: depths.append(st.history.shape[1]))[0].token_ids
            for s in (8, 9, 100_000)]
    assert outs[0] == outs[1] == outs[2]
    assert set(depths) == {8}


def test_runner_takes_a_threshold_it_caps_within_its_history(llm):
    from canvaslm.engine.engine import Engine, EngineConfig, GenerationRequest
    from canvaslm.engine.runner import Runner, RunnerError

    big = DiffusionParams(max_new_tokens=16, max_denoising_steps=8, stability_threshold=10**6)
    Runner(llm.model, num_slots=1, max_model_len=64, history_depth=8).add("a", big, 0, (1,))
    with pytest.raises(RunnerError, match=r"stability_threshold=1000000 \(with max_denoising_steps=8\) exceeds"):
        Runner(llm.model, num_slots=1, max_model_len=64, history_depth=7).add("a", big, 0, (1,))
    prompt = "a prompt of sixteen tokens or more"  # generate's geometry: equal outputs
    sp = SamplingParams(max_new_tokens=16, seed=3, max_denoising_steps=8, stability_threshold=10**6)
    row = llm.rows([prompt], sp)[0]
    engine = Engine(llm.model, EngineConfig(max_batch=1, max_model_len=len(row.prompt_ids) + 16, prefix_caching=False),
                    history_depth=8).start()
    try:
        tokens, fin = asyncio.run(engine.run(GenerationRequest.from_row("a", row, 3)))
    finally:
        engine.shutdown()
    assert fin.reason in ("stop", "length")
    assert list(tokens) == llm.generate(prompt, sp)[0].token_ids


# --------------------------------------------------------------- schedules below float32's range

@pytest.mark.parametrize("t_min, t_max", [(0.0, 1e-40), (1e-45, 1e-44), (0.0, 1e-37)])
def test_a_schedule_whose_last_step_overflows_the_logits_is_refused(llm, t_min, t_max):
    """Explicit t_min / t_max were checked only against each other: a last step below ~1e-37 divides the
    logits past float32's max, and the output was all padding (or noise)."""
    with pytest.raises(ConfigError, match=r"t_max gives the last of max_denoising_steps=8 steps .* below 1e-30"):
        DiffusionParams(t_min=t_min, t_max=t_max, max_denoising_steps=8)
    with pytest.raises(ConfigError, match="generation parameter t_max"):
        llm.generate("hi", SamplingParams(max_new_tokens=8, seed=3, t_min=t_min, t_max=t_max))


def test_schedules_that_stay_in_range_are_kept(llm):
    DiffusionParams(t_min=1e-45, t_max=0.8)  # t_min itself is never a step's temperature
    DiffusionParams(t_min=0.0, t_max=1e-3)
    assert SamplingParams(temperature=GREEDY_TEMPERATURE).resolve(llm.defaults).t_min > 0
    with pytest.raises(GenerationError, match=r"temperature=1e-31 scales the schedule .* last step at"):
        SamplingParams(temperature=1e-31).resolve(llm.defaults)


# --------------------------------------------------------------- logit_bias on bfloat16 models

def test_logit_bias_is_exact_on_a_bfloat16_model(ckpt, monkeypatch):
    """The dense bias was built in the model's dtype: on bfloat16, 57.3 moved a logit by 57.25 and 99.9 by
    100.0 (past OpenAI's limit)."""
    import canvaslm.generate as G

    seen = []
    apply = G.logit_bias.apply

    def spy(logits, rows):
        before = logits[0, 0, [5, 6, 7]].clone()
        apply(logits, rows)
        seen.append(logits[0, 0, [5, 6, 7]] - before)

    monkeypatch.setattr(G.logit_bias, "apply", spy)
    llm16 = LLM(ckpt, device="cpu", dtype="bfloat16")
    llm16.generate("hi", SamplingParams(max_new_tokens=4, seed=0, max_denoising_steps=1,
                                        logit_bias={5: 57.3, 6: 0.3, 7: 99.9}))
    want = torch.tensor([57.3, 0.3, 99.9])
    assert seen and torch.allclose(seen[0], want, rtol=0, atol=2e-5), seen[0]


# --------------------------------------------------------------- out-of-range integers

@pytest.mark.parametrize("name, value, limit", [("top_k", 2**63, "2\\*\\*63"), ("stability_threshold", 2**63, "2\\*\\*63"),
                                                ("max_denoising_steps", 2**31, "2\\*\\*31")])
def test_integers_past_their_tensor_type_name_the_field(llm, name, value, limit):
    """They reached torch.tensor: "Overflow when unpacking long long", "value cannot be converted to type int32"."""
    with pytest.raises(ConfigError, match=f"generation parameter {name} must be below {limit}, got {value}"):
        llm.generate("hi", SamplingParams(max_new_tokens=4, seed=0, **{name: value}))
    DiffusionParams(**{name: value - 1})
