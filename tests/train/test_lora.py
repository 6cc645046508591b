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

from .helpers import SMALL, tiny_config, vision_tensors


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


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_qlora_trains_adapters_on_a_quantised_base_and_exports_float(tmp_path, fmt):
    """QLoRA: the base is quantised and frozen, float32 adapters train, and the export (base dequantised +
    update) is a plain float checkpoint with the adapted model's logits; resuming restores the adapters."""
    from canvaslm.model.moe import Experts
    from canvaslm.quant import FP8Experts, FP8Linear
    from canvaslm.quant_int4 import Int4Experts, Int4Linear

    linear_cls, experts_cls = (Int4Linear, Int4Experts) if fmt == "int4" else (FP8Linear, FP8Experts)
    cfg = tiny_config(tmp_path, max_steps=12, lr=1e-2, lora={"rank": 4, "alpha": 8}, quantization=fmt, save_every=6)
    trainer = Trainer(TrainConfig.from_dict(cfg))
    layer = trainer.model.model.decoder.layers[0]
    assert isinstance(layer.self_attn.q_proj, LoRALinear) and isinstance(layer.self_attn.q_proj.base, linear_cls)
    assert isinstance(layer.experts, experts_cls) and layer.self_attn.q_proj.lora_A.dtype == torch.float32
    frozen = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    hist = trainer.train()
    losses = [h["loss"] for h in hist]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    for k, v in trainer.model.state_dict().items():  # the quantised base never moves
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k
    adapted = _logits(trainer.model)
    merged = load_model(tmp_path / "run" / "final")
    assert type(merged.text.layers[0].experts) is Experts and merged.embed_weight.dtype == torch.float32
    torch.testing.assert_close(_logits(merged), adapted, rtol=1e-4, atol=1e-4)
    again = Trainer(TrainConfig.from_dict(cfg), resume=True)
    assert again.step == 12
    torch.testing.assert_close(_logits(again.model), adapted)
    # checkpoints hold the adapters, not a merged float model; export merges them onto the rebuilt base
    for step in (6, 12):
        ck = tmp_path / "run" / f"checkpoint-{step:07d}"
        assert (ck / "trainer_state.pt").is_file() and not (ck / "config.json").exists()
    from canvaslm.cli import main

    assert main(["export", str(tmp_path / "run" / "checkpoint-0000012"), str(tmp_path / "exported")]) == 0
    torch.testing.assert_close(_logits(load_model(tmp_path / "exported")), adapted, rtol=1e-4, atol=1e-4)
    assert main(["export", str(tmp_path / "run" / "checkpoint-0000006"), str(tmp_path / "at6")]) == 0
    assert not torch.allclose(_logits(load_model(tmp_path / "at6")), adapted)  # earlier adapters


def test_qlora_config_errors(tmp_path):
    from canvaslm.train.checkpointing import ConfigError

    with pytest.raises(ConfigError, match="quantization needs lora"):
        TrainConfig.from_dict(tiny_config(tmp_path, quantization="int4"))
    with pytest.raises(ConfigError, match="does not combine with lora.include_experts"):
        TrainConfig.from_dict(tiny_config(tmp_path, quantization="int4", lora={"include_experts": True}))
    with pytest.raises(ConfigError, match="save_merged can be false only with lora"):
        TrainConfig.from_dict(tiny_config(tmp_path, save_merged=False))
    with pytest.raises(ConfigError, match=r"quantization must be int4 \| fp8 \(or absent\), got .nf4."):
        TrainConfig.from_dict(tiny_config(tmp_path, quantization="nf4", lora={}))


def test_full_fine_tuning_of_a_quantised_checkpoint_is_refused_by_name(tmp_path):
    """An int4 checkpoint loads quantised by itself; full fine-tuning cannot update its codes, so the
    trainer says which tensor and what to do instead (LoRA on it trains: the QLoRA test)."""
    from canvaslm.checkpoint import save_model
    from canvaslm.quant import quantize_model

    cfg = model_config("tiny", canvas_length=8, vocab_size=32, **SMALL)
    path = save_model(quantize_model(build_random_model(cfg, std=0.1), fmt="int4"), tmp_path / "int4")
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.weight holds quantised weights \(torch\.uint8\)"):
        Trainer(TrainConfig.from_dict(tiny_config(tmp_path, model=str(path))))
    trainer = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "lora", model=str(path), max_steps=2,
                                                        lora={"rank": 2})))
    assert len(trainer.train()) == 2


def test_merging_adapters_into_a_quantised_base_gives_plain_linears():
    """merge_lora on a QLoRA model: each adapted quantised linear becomes an nn.Linear holding the
    dequantised weight plus the update, with the adapted model's logits."""
    from canvaslm.quant import quantize_model
    from canvaslm.quant_int4 import Int4Linear

    model = quantize_model(build_random_model(model_config("tiny", canvas_length=8, vocab_size=32, **SMALL),
                                              std=0.1), fmt="int4")
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapted = _logits(model)
    merge_lora(model)
    q_proj = model.model.decoder.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and not has_lora(model)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())  # every target was adapted
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-4, atol=1e-4)


def test_runs_from_a_multimodal_checkpoint_keep_its_vision_tower(tmp_path):
    """Fine-tuning a checkpoint that has a vision tower (LoRA and full; checkpoints rotated, a resumed run,
    export) writes that tower, unchanged, into every checkpoint and export."""
    from canvaslm.cli import main

    from conftest import build_reference

    base = tmp_path / "base"
    build_reference(base, "window8_canvas16")
    (base / "processor_config.json").write_text('{"image_seq_length": 280}')

    src = vision_tensors(base)
    assert src
    for name, extra in (("lora", {"lora": {"rank": 4, "alpha": 8}}), ("full", {})):
        cfg = tiny_config(tmp_path / name, model=str(base), max_steps=2, save_every=1, keep_checkpoints=1, **extra)
        Trainer(TrainConfig.from_dict(cfg)).train()
        cfg["max_steps"] = 4  # resumed: full fine-tuning reloads checkpoint-2, whose files rotation then deletes
        Trainer(TrainConfig.from_dict(cfg), resume=True).train()
        run = tmp_path / name / "run"
        assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-0000004"]
        assert main(["export", str(run), str(tmp_path / name / "exported")]) == 0
        for d in (run / "checkpoint-0000004", run / "final", tmp_path / name / "exported"):
            got = vision_tensors(d)
            assert sorted(got) == sorted(src) and all(torch.equal(got[k], src[k]) for k in src), d
            assert (d / "processor_config.json").read_text() == '{"image_seq_length": 280}'


def test_adapter_init_follows_the_config_seed(tmp_path):
    def adapters(name, seed):
        torch.rand(7)  # whatever the process drew before does not matter
        t = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / name, seed=seed, lora={"rank": 4, "alpha": 8})))
        return {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_A" in n}

    a, b, c = adapters("a", 0), adapters("b", 0), adapters("c", 1)
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)


def test_lora_dropout_is_off_in_evaluation_and_seeded_per_step(tmp_path):
    cfg = dict(max_steps=4, save_every=2, eval_every=2, lora={"rank": 4, "alpha": 8, "dropout": 0.5})
    t = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "one", **cfg)))
    t.train(stop_at=1)
    first = t.evaluate()
    assert t.evaluate() == first and t.model.training  # the same weights, the same loss; train mode restored
    t.model.eval()
    assert t.evaluate() == first and not t.model.training

    def run(name, seed_before, stop_at=None, resume=False):
        torch.manual_seed(seed_before)  # whatever the process drew before does not matter
        return Trainer(TrainConfig.from_dict(tiny_config(tmp_path / name, **cfg)), resume=resume).train(stop_at)

    full, again = run("a", 1), run("b", 2)
    assert [r["loss"] for r in full] == [r["loss"] for r in again]
    run("killed", 3, stop_at=3)  # the last checkpoint is step 2
    resumed = run("killed", 4, resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r.get("eval_loss") for r in resumed] == [r.get("eval_loss") for r in full]


def test_an_adapters_only_checkpoint_names_its_base_by_absolute_path(tmp_path, tiny_checkpoint, monkeypatch):
    """A run given `model: ../model` (relative to where it trained) saves the base's absolute path: export
    from another working directory merges onto that base, not onto whatever `../model` is there, and a
    resume from there whose `../model` is another directory is refused."""
    import json
    import shutil

    from canvaslm.cli import main
    from canvaslm.config import ConfigError
    from canvaslm.testing import make_tiny_checkpoint

    for side in ("a", "b"):
        (tmp_path / side / "work").mkdir(parents=True)
    shutil.copytree(tiny_checkpoint, tmp_path / "a" / "model")
    make_tiny_checkpoint(tmp_path / "b" / "model", seed=1)  # another base at the same relative path
    monkeypatch.chdir(tmp_path / "a" / "work")
    cfg = tiny_config(tmp_path / "a", model="../model", max_steps=1, lora={"rank": 2}, save_merged=False)
    trainer = Trainer(TrainConfig.from_dict(cfg))
    trainer.train()
    run = tmp_path / "a" / "run"
    want = trainer.export(tmp_path / "want")  # merged onto the base it trained on
    state = torch.load(run / "checkpoint-0000001" / "trainer_state.pt", weights_only=False)
    assert state["config"]["model"] == str(tmp_path / "a" / "model")
    monkeypatch.chdir(tmp_path / "b" / "work")
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    torch.testing.assert_close(_logits(load_model(tmp_path / "exported")), _logits(load_model(want)))
    assert main(["export", str(run), str(tmp_path / "adapter"), "--adapter"]) == 0
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "a" / "model")
    with pytest.raises(ConfigError, match=r"--resume with a config that changes model \("):
        Trainer(TrainConfig.from_dict({**cfg, "max_steps": 2}), resume=True)
    monkeypatch.chdir(tmp_path / "a" / "work")
    assert Trainer(TrainConfig.from_dict({**cfg, "max_steps": 2}), resume=True).step == 1


@pytest.mark.parametrize("merged", [False, True])
def test_checkpoints_carry_the_named_chat_templates(tmp_path, tiny_checkpoint, merged):
    """additional_chat_templates/NAME.jinja of the model dir comes along into every checkpoint, adapters-only
    (save_merged: false, the QLoRA default) or merged, in a folder others may enter."""
    import shutil

    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    cfg = tiny_config(tmp_path, model=str(model), max_steps=1, lora={"rank": 2}, save_merged=merged)
    Trainer(TrainConfig.from_dict(cfg)).train()
    named = tmp_path / "run" / "checkpoint-0000001" / "additional_chat_templates"
    assert (named / "tool_use.jinja").read_text() == "{{ tools }}"
    assert named.stat().st_mode & 0o111 == (named.stat().st_mode & 0o444) >> 2  # searchable where readable
