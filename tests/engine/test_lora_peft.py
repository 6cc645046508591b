"""Served LoRA adapters against `transformers` + `peft` side by side: an adapter that `peft` trains and
saves on the reference DiffusionGemma loads with `read_adapter` and gives the reference's logits, with
decoder-mode modules only and with the encoder's own modules adapted too (each mode its own weights)."""

from __future__ import annotations

import pytest
import torch

from canvaslm.checkpoint import load_model
from canvaslm.kv_cache import KVCache
from canvaslm.lora_serving import install, read_adapter
from canvaslm.testing import make_tiny_checkpoint

peft = pytest.importorskip("peft")
LAYER = r"\.layers\.\d+\.(self_attn\.(q_proj|v_proj|o_proj)|mlp\.(gate_proj|down_proj))"


def _side_by_side(ref, model, served, g, n: int = 10):
    """Canvas logits of the peft model `ref` and of ours with adapter 1, after encoding the same prompt."""
    from transformers.cache_utils import DynamicCache

    ids = torch.randint(3, model.cfg.vocab_size, (1, n), generator=g)
    canvas = torch.randint(3, model.cfg.vocab_size, (1, model.cfg.canvas_length), generator=g)
    with torch.no_grad():
        cache_ref = DynamicCache(config=ref.config.get_text_config(decoder=True))
        ref.base_model.model.model.encoder(input_ids=ids, past_key_values=cache_ref, position_ids=torch.arange(n)[None])
        want = ref(decoder_input_ids=canvas, past_key_values=cache_ref).logits
        cache = KVCache(model.cfg, 1, n + model.cfg.canvas_length)
        with served.using(1):
            model.encode(ids, torch.arange(n)[None], torch.tensor([0]), cache)
            got = model.denoise(canvas, torch.tensor([0]), cache)
    return want, got


@pytest.mark.parametrize("which", [r".*decoder", r".*(encoder\.language_model|decoder)"])
def test_peft_adapter_gives_the_reference_logits(tmp_path, which):
    from transformers import DiffusionGemmaForBlockDiffusion

    ckpt = make_tiny_checkpoint(tmp_path / "base")
    ref = peft.get_peft_model(DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt).eval(),
                              peft.LoraConfig(r=4, lora_alpha=6, target_modules=which + LAYER))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh adapter is a no-op: give every B random values, each module its own
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ref.save_pretrained(tmp_path / "adapter")
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.scale == 1.5 and any("encoder" in m for m in adapter.modules) == ("encoder" in which)

    model = load_model(ckpt)
    served = install(model, [adapter], 1)
    same = torch.Generator().set_state(g.get_state())  # the same prompt and canvas for the base run
    want, got = _side_by_side(ref, model, served, g)
    with ref.disable_adapter():
        plain, _ = _side_by_side(ref, model, served, same)
    assert (want - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_our_adapter_files_load_in_peft(tmp_path):
    """What `write_adapter` (and so `canvaslm export --adapter`) writes loads with `PeftModel.from_pretrained`
    on the reference model and gives the logits we serve."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from canvaslm.lora_serving import write_adapter

    ckpt = make_tiny_checkpoint(tmp_path / "base")
    model = load_model(ckpt)
    g = torch.Generator().manual_seed(1)
    weights = {}
    for name, mod in model.named_modules():
        if name.rpartition(".")[2] in ("q_proj", "up_proj", "down_proj") and ".layers." in name:
            weights[name] = (torch.randn(3, mod.in_features, generator=g), torch.randn(mod.out_features, 3, generator=g))
    write_adapter(tmp_path / "ours", weights, rank=3, alpha=1.5)
    ref = peft.PeftModel.from_pretrained(DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt).eval(), tmp_path / "ours")
    served = install(model, [read_adapter(tmp_path / "ours")], 1)
    want, got = _side_by_side(ref, model, served, g)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
