"""A stability_threshold past max_denoising_steps can never be met, so the engine's argmax history is sized
to the steps (DiffusionParams.stability_depth), not the threshold: LLM.generate_continuous, the server's
launch and its per-request check (a threshold of 2,000,000 allocated gigabytes of history)."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from canvaslm.engine import engine as engine_mod
from canvaslm.engine.engine import EngineConfig
from canvaslm.llm import LLM, SamplingParams
from canvaslm.server.app import build_app
from canvaslm.server.launch import state_from_model


@pytest.fixture
def depths(monkeypatch):
    seen = []
    real = engine_mod.Engine.__init__

    def spy(self, model, config, history_depth=1):
        seen.append(history_depth)
        real(self, model, config, history_depth)

    monkeypatch.setattr(engine_mod.Engine, "__init__", spy)
    return seen


def test_generate_continuous_sizes_the_history_to_the_steps(tiny_checkpoint, depths):
    llm = LLM(tiny_checkpoint, device="cpu")
    huge = SamplingParams(max_new_tokens=4, max_denoising_steps=3, stability_threshold=2_000_000, seed=1)
    got = llm.generate_continuous(["hi"], huge, max_batch=1)[0].token_ids
    assert depths == [3]
    never = SamplingParams(max_new_tokens=4, max_denoising_steps=3, stability_threshold=3, seed=1)
    assert llm.generate_continuous(["hi"], never, max_batch=1)[0].token_ids == got  # same tokens


def test_server_history_and_requests_use_the_capped_depth(tiny_checkpoint, depths):
    llm = LLM(tiny_checkpoint, device="cpu")
    defaults = dataclasses.replace(llm.defaults, stability_threshold=2_000_000, max_denoising_steps=4)
    state = state_from_model(llm.model, defaults, llm.tokenizer, EngineConfig(max_batch=1, max_model_len=64),
                             served_model_name="tiny")
    try:
        assert depths == [4]
        client = TestClient(build_app(state))
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4,
                                                  "stability_threshold": 50, "max_denoising_steps": 2})
        assert ok.status_code == 200, ok.text  # never met in 2 steps: as a threshold of 2 (was refused)
        over = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4,
                                                    "stability_threshold": 5, "max_denoising_steps": 8})
        assert over.status_code == 400 and "stability_threshold" in over.text
    finally:
        state.shutdown()
