"""LoRA: a fresh adapter is a no-op, only adapters train, merging reproduces the adapted model, and a
LoRA run's export loads in canvaslm and transformers with the adapted model's logits."""

from __future__ import annotations

import pytest
import torch

from canvaslm.checkpoint import build_random_model, load_model
from canvaslm.kv_cache import KVCache
from canvaslm.shapes import model_config
from canvaslm.train.lora import LoRAConfig, LoRALinear, apply_lora, has_lora, merge_lora
from canvaslm.train.trainer import TrainConfig, Trainer

from .helpers import SMALL, tiny_config


def _logits(model, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
    cache = KVCache(cfg, 2, 12 + cfg.canvas_length)
    slots = torch.arange(2)
    with torch.no_grad():
        model.encode(ids, torch.arange(12).expand(2, -1), slots, cache)
        return model.denoise(canvas, slots, cache)


@pytest.mark.parametrize("experts", [False, True])
def test_lora_noop_then_merge_matches(experts):
    model = build_random_model(model_config("tiny", canvas_length=8, vocab_size=32, **SMALL), std=0.1)
    before = _logits(model)
    adapted = apply_lora(model, LoRAConfig(rank=4, alpha=8, include_experts=experts))
    assert any(n.endswith("q_proj") for n in adapted) and any("experts" in n for n in adapted) == experts
    assert isinstance(model.model.decoder.layers[0].self_attn.q_proj, LoRALinear)
    torch.testing.assert_close(_logits(model), before)  # B = 0: no change yet
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapted_logits = _logits(model)
    assert not torch.allclose(adapted_logits, before)
    merge_lora(model)
    assert not has_lora(model)
    plain = build_random_model(model_config("tiny", canvas_length=8, vocab_size=32, **SMALL), materialize=False)
    assert set(model.state_dict()) == set(plain.state_dict())  # checkpoint names again
    torch.testing.assert_close(_logits(model), adapted_logits, rtol=1e-4, atol=1e-4)


def test_lora_config_errors():
    with pytest.raises(ValueError, match="unknown module names"):
        LoRAConfig(targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_lora_training_run_exports_merged_model(tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    cfg = tiny_config(tmp_path, max_steps=3, save_every=2, lr=1e-2,
                      lora={"rank": 4, "alpha": 8, "include_experts": True})
    trainer = Trainer(TrainConfig.from_dict(cfg))
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    hist = trainer.train()
    assert len(hist) == 3
    for n, p in trainer.model.named_parameters():  # the base weights never move
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    adapted = _logits(trainer.model)
    final = tmp_path / "run" / "final"
    merged = load_model(final)
    torch.testing.assert_close(_logits(merged), adapted, rtol=1e-4, atol=1e-4)
    # resuming a LoRA run restores the adapters from trainer_state.pt
    again = Trainer(TrainConfig.from_dict(cfg), resume=True)
    assert again.step == 3
    torch.testing.assert_close(_logits(again.model), adapted)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(final).eval()
    ids = torch.randint(3, 32, (1, 10), generator=torch.Generator().manual_seed(0))
    canvas = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache_ref = DynamicCache(config=ref.config.get_text_config(decoder=True))
        ref.model.encoder(input_ids=ids, past_key_values=cache_ref, position_ids=torch.arange(10)[None])
        want = ref(decoder_input_ids=canvas, past_key_values=cache_ref).logits
        cache = KVCache(merged.cfg, 1, 18)
        merged.encode(ids, torch.arange(10)[None], torch.tensor([0]), cache)
        got = merged.denoise(canvas, torch.tensor([0]), cache)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
