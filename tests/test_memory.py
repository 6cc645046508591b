"""`canvaslm memory`: the weights and context a GPU would get, by arithmetic, before any download."""

from __future__ import annotations

import pytest
import torch

from canvaslm.checkpoint import load_model
from canvaslm.cli import main
from canvaslm.config import ModelConfig
from canvaslm.engine.engine import GIB, EngineConfig, plan_max_model_len
from canvaslm.memory import plan, weight_bytes
from canvaslm.shapes import model_config


@pytest.mark.parametrize("dtype,quantization", [("float32", None), ("bfloat16", None), ("bfloat16", "int4"),
                                                ("bfloat16", "fp8")])
def test_planned_weights_are_what_loading_holds(tiny_checkpoint, dtype, quantization):
    model = load_model(tiny_checkpoint, dtype=dtype, quantization=quantization)
    held = sum(t.numel() * t.element_size() for n, t in (*model.named_parameters(), *model.named_buffers())
               if not n.startswith("rotary."))
    assert weight_bytes(ModelConfig.from_dir(tiny_checkpoint), dtype, quantization) == held


def test_the_context_is_the_servers_own_plan(capsys):
    cfg = model_config("26b-a4b")
    weights = weight_bytes(cfg, torch.bfloat16, "int4")
    assert 14.0e9 < weights < 15.0e9  # "the 26B model in 14.5 GB"
    got = plan(cfg, 24, quantization="int4", max_batch=4)
    free = 24 * GIB - weights - GIB
    want, _ = plan_max_model_len(cfg, EngineConfig(max_batch=4, max_model_len=None), "cuda", torch.bfloat16,
                                 free_total=(free, 24 * GIB))
    assert got["max_model_len"] == want and got["free"] == free
    fp8 = plan(cfg, 24, quantization="int4", max_batch=4, kv_cache_dtype="fp8")
    assert fp8["max_model_len"] > want and fp8["kv_per_position"] * 2 == got["kv_per_position"] == 20 * 1024
    k = got["agent_slots"]
    for n, fits in ((k, True), (k + 1, False)):  # the most slots that still reach 64k
        cfg_n = EngineConfig(max_batch=n, max_model_len=None, prefix_caching=False)
        try:
            ctx, _ = plan_max_model_len(cfg, cfg_n, "cuda", torch.bfloat16, free_total=(free, 24 * GIB))
        except ValueError:
            ctx = 0
        assert (ctx >= 65536) == fits, (n, ctx)
    assert main(["memory", "--shape", "26b-a4b", "--gpu-memory", "24", "--quantization", "int4", "--max-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert f"context: {want} positions for 4 slots" in out and "weights 13.5 GiB (int4)" in out
    assert f"agent frameworks check for: {k} (--max-batch" in out
    assert main(["memory", "--shape", "26b-a4b", "--gpu-memory", "24"]) == 2
    assert "over the GPU's 24.0 GiB; try --quantization int4" in capsys.readouterr().err
