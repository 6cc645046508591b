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


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_a_quantised_checkpoint_counts_in_its_own_format(tiny_checkpoint, tmp_path, capsys, fmt):
    """Its config.json's quantization_config, not bf16; a conflicting --quantization is refused as
    load_model refuses it."""
    from canvaslm.checkpoint import save_model
    from canvaslm.quant import QuantError, quantize_model

    path = save_model(quantize_model(load_model(tiny_checkpoint), fmt=fmt), tmp_path / "q")
    model = load_model(path, dtype="bfloat16")
    held = sum(t.numel() * t.element_size() for n, t in (*model.named_parameters(), *model.named_buffers())
               if not n.startswith("rotary."))
    cfg = ModelConfig.from_dir(path)
    assert weight_bytes(cfg, "bfloat16") == weight_bytes(cfg, "bfloat16", fmt) == held
    other = "fp8" if fmt == "int4" else "int4"
    words = f"quantization '{other}' needs a bf16/fp32 checkpoint; this one is already {fmt.upper()}"
    for fails in (lambda: load_model(path, quantization=other), lambda: weight_bytes(cfg, quantization=other)):
        with pytest.raises(QuantError, match=words):
            fails()
    assert main(["memory", str(path), "--gpu-memory", "24"]) == 0
    assert f"({fmt})" in capsys.readouterr().out
    assert main(["memory", str(path), "--gpu-memory", "24", "--quantization", other]) == 2
    assert words in capsys.readouterr().err


def test_a_26b_int4_checkpoint_fits_24_gib(tmp_path, capsys):
    import json

    raw = model_config("26b-a4b").to_hf_dict()
    raw["quantization_config"] = {"quant_method": "canvaslm-int4", "group_size": 128, "bits": 4, "symmetric": True}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert main(["memory", str(tmp_path), "--gpu-memory", "24"]) == 0
    assert "weights 13.5 GiB (int4)" in capsys.readouterr().out


def test_no_room_for_any_kv_cache_says_what_can_help(tiny_checkpoint, capsys):
    """The weights and the reserve fill the share (or the GPU): no --max-batch helps, and no max_model_len was
    asked for; the error says so and points at a larger share, smaller weights or a bigger GPU."""
    assert main(["memory", "--shape", "26b-a4b", "--gpu-memory", "80", "--gpu-memory-utilization", "0.5",
                 "--max-batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "no room for a KV cache: 48.0 GiB in use (the weights and the runtime) and 2.0 GiB kept for " \
           "activations leave nothing of the 40.0 GiB --gpu-memory-utilization 0.5 allows; raise " \
           "--gpu-memory-utilization, load the weights with --quantization int4 or fp8, or use a bigger GPU" in err
    assert main(["memory", str(tiny_checkpoint), "--gpu-memory", "3", "--max-batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "2.0 GiB kept for activations leave nothing of the GPU's 3.0 GiB;" in err and "bigger GPU" in err
    assert "max-batch" not in err and "max_model_len" not in err
