"""CUDA-graph replay of the denoise + fused sampling step equals the eager step (GPU only)."""

from __future__ import annotations

import pytest
import torch

from canvaslm.checkpoint import build_random_model
from canvaslm.config import DiffusionParams
from canvaslm.kv_cache import KVCache
from canvaslm.sampling.fused import fused_step_from_hidden
from canvaslm.sampling.samplers import CanvasState, SamplerParams
from canvaslm.sampling.stopping import new_history
from canvaslm.shapes import model_config


def test_graphs_refuse_cpu():
    from canvaslm.engine.graphs import StepGraphs

    cfg = model_config("tiny", canvas_length=8)
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(build_random_model(cfg), KVCache(cfg, 1, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("n", [1, 3])
def test_replay_matches_eager(n):
    from canvaslm.engine.graphs import StepGraphs

    cfg = model_config("tiny", canvas_length=16)
    model = build_random_model(cfg, device="cuda", dtype="bfloat16", std=0.5)
    cache = KVCache(cfg, 4, 128, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(n, device="cuda")
    model.encode(torch.randint(0, cfg.vocab_size, (n, 20), device="cuda"),
                 torch.arange(20, device="cuda").expand(n, -1), slots, cache)
    p = SamplerParams.build([DiffusionParams(max_denoising_steps=4)] * n, "cuda")
    canvas = torch.randint(0, cfg.vocab_size, (n, 16), device="cuda")
    st = CanvasState(canvas, canvas, None, torch.zeros(n, dtype=torch.bool, device="cuda"),
                     new_history(n, 1, 16, "cuda"), p.n_steps.clone())
    seeds = torch.arange(n, device="cuda") + 7
    graphs = StepGraphs(model, cache)
    starts = cache.lengths[:n].clone()
    for _ in range(3):
        hidden = model.denoise(st.canvas, slots, cache, sc_embeds=st.sc_embeds, canvas_start=starts,
                               return_hidden=True)
        eager = fused_step_from_hidden(hidden, model, st, p, seeds, cfg.vocab_size)
        replay = graphs.run(st, p, slots, starts, seeds)
        assert torch.equal(replay.canvas, eager.canvas) and torch.equal(replay.argmax, eager.argmax)
        torch.testing.assert_close(replay.sc_embeds, eager.sc_embeds)
        st, seeds = eager, seeds + 100
