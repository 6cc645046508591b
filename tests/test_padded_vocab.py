"""A model vocabulary larger than its tokenizer's (padded embedding rows, as Gemma-style checkpoints have):
the padded ids are never sampled, offline (LLM.generate, generate_continuous, infill, every sampler) or in
the server's engine, so every output decodes (they failed with "ids [...] are outside the vocabulary",
a 500 on the server). A tokenizer that covers the whole vocabulary changes nothing."""

from __future__ import annotations

import httpx
import pytest
import torch

from canvaslm.llm import LLM, SamplingParams
from canvaslm.sampling.samplers import ban_unsampleable, sampleable_vocab, set_sampleable_vocab
from canvaslm.testing import CHARS, SPECIALS, make_tiny_checkpoint

TOKENIZER_VOCAB = len(SPECIALS) + len(CHARS)
PADDED = 120  # rows past the tokenizer's ids: a random model samples them often


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("padded"), vocab_size=TOKENIZER_VOCAB + PADDED)


@pytest.fixture(scope="module")
def padded_llm(padded_dir):
    return LLM(padded_dir, device="cpu", dtype="float32")


def test_the_checkpoint_is_padded(padded_llm):
    assert padded_llm.cfg.vocab_size == TOKENIZER_VOCAB + PADDED
    assert padded_llm.tokenizer.vocab_size == TOKENIZER_VOCAB
    assert sampleable_vocab(padded_llm.model) == TOKENIZER_VOCAB


@pytest.mark.parametrize("impl", ["auto", "reference", "fused"])
def test_generate_never_samples_padded_ids(padded_dir, impl):
    llm = LLM(padded_dir, device="cpu", dtype="float32", sampler_impl=impl)
    outs = llm.generate(["hello", "abc", "x"] * 2, [SamplingParams(seed=s, max_new_tokens=32, max_denoising_steps=4)
                                                   for s in range(6)])
    for o in outs:
        assert o.token_ids and max(o.token_ids) < TOKENIZER_VOCAB, o.token_ids
        assert isinstance(o.text, str)


def test_generate_continuous_never_samples_padded_ids(padded_llm):
    outs = padded_llm.generate_continuous(["hello", "abc", "x", "yz"],
                                          SamplingParams(seed=3, max_new_tokens=32, max_denoising_steps=4))
    for o in outs:
        assert o.token_ids and max(o.token_ids) < TOKENIZER_VOCAB, o.token_ids


def test_infill_never_samples_padded_ids(padded_llm):
    for seed in range(6):
        r = padded_llm.infill("hello w", "rld", SamplingParams(seed=seed, max_new_tokens=20, max_denoising_steps=4))
        assert r.text == r.prefix + r.middle + r.suffix and max(r.middle_ids, default=0) < TOKENIZER_VOCAB


def test_server_completions_never_sample_padded_ids(padded_dir):
    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.launch import BackgroundServer, build_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = build_state(padded_dir, "cpu", "float32", EngineConfig(max_batch=8, max_model_len=128),
                        served_model_name="tiny")
    try:
        with BackgroundServer(state) as srv:
            for seed in range(4):
                for extra in ({}, {"suffix": "rld"}):
                    r = httpx.post(srv.base_url + "/v1/completions", timeout=120,
                                   json={"model": "tiny", "prompt": "hello w", "max_tokens": 16, "seed": seed,
                                         "max_denoising_steps": 4, **extra})
                    assert r.status_code == 200, r.text
    finally:
        torch.set_num_threads(threads)
    assert sampleable_vocab(state.engine.runner.model) == TOKENIZER_VOCAB


def test_a_tokenizer_covering_the_vocabulary_bans_nothing(tmp_path):
    llm = LLM(make_tiny_checkpoint(tmp_path), device="cpu", dtype="float32")
    assert llm.tokenizer.vocab_size == llm.cfg.vocab_size and sampleable_vocab(llm.model) is None
    logits = torch.randn(2, 3, 7)
    assert torch.equal(ban_unsampleable(logits.clone(), None), logits)
    assert torch.equal(ban_unsampleable(logits.clone(), 7), logits)
    banned = ban_unsampleable(logits.clone(), 5)
    assert torch.equal(banned[..., :5], logits[..., :5]) and bool((banned[..., 5:] == float("-inf")).all())


def test_set_sampleable_vocab_follows_the_tokenizer(padded_dir):
    from canvaslm.checkpoint import load_model
    from canvaslm.tokenizer import Tokenizer

    model = load_model(padded_dir, device="cpu", dtype=torch.float32)
    assert sampleable_vocab(model) is None  # no tokenizer: token ids in and out, every id may be sampled
    set_sampleable_vocab(model, Tokenizer.from_dir(padded_dir))
    assert sampleable_vocab(model) == TOKENIZER_VOCAB
    set_sampleable_vocab(model, None)
    assert sampleable_vocab(model) is None
