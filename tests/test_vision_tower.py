"""The vision tower against the `transformers` reference (`get_image_features(...).pooler_output`), on tiny
random checkpoints and real image-processor output (two aspect ratios, so both images carry padding)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from canvaslm.model.vision import VisionConfig, VisionTower, load_vision_tower

TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, global_head_dim=8, num_global_key_value_heads=1, sliding_window=4,
            num_experts=2, top_k_experts=1, moe_intermediate_size=8, max_position_embeddings=64,
            layer_types=["full_attention"])
BASE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=8,
            patch_size=4, position_embedding_size=96)
VISION = {
    # GQA, clipped linears with finite random bounds, standardized outputs, 3x3 pooling
    "clip_std_k3": dict(BASE, num_key_value_heads=1, pooling_kernel_size=3, use_clipped_linears=True,
                        standardize=True),
    # plain linears, no standardization, 2x2 pooling, another RoPE theta and norm eps
    "plain_k2": dict(BASE, num_key_value_heads=2, pooling_kernel_size=2, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "axial", "rope_theta": 37.0}),
}
IMAGE_SIZES = [(33, 45), (8, 90)]  # (height, width): 63 and 56 soft tokens at 70 max, both padded
PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def _perturb(ref, seed: int):
    """Give every constant-initialised tensor random values, so a test can see it being ignored."""
    g = torch.Generator().manual_seed(seed)
    enc = ref.model.encoder
    with torch.no_grad():
        for name, p in list(enc.vision_tower.named_parameters()) + list(enc.embed_vision.named_parameters()):
            if "norm" in name or "position_embedding" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5, generator=g)  # large enough for the bounds to bite
        for name, b in enc.vision_tower.named_buffers():
            if name.endswith(("input_min", "output_min")):
                b.fill_(-0.4 - 0.4 * torch.rand((), generator=g).item())
            elif name.endswith(("input_max", "output_max")):
                b.fill_(0.4 + 0.4 * torch.rand((), generator=g).item())
            elif name.endswith("std_bias"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("std_scale"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _images(cfg: dict):
    from PIL import Image
    from transformers import Gemma4ImageProcessorPil

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    proc = Gemma4ImageProcessorPil(patch_size=cfg["patch_size"], pooling_kernel_size=cfg["pooling_kernel_size"],
                                   max_soft_tokens=70)
    out = proc(images, return_tensors="pt")
    return out["pixel_values"], out["image_position_ids"], out["num_soft_tokens_per_image"].tolist()


def _carried(path) -> dict:
    """What a checkpoint loader would hand over: every vision tensor name -> the file holding it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    return {k: path / f for k, f in weight_map.items() if k.startswith(PREFIXES)}


@pytest.fixture(scope="module", params=sorted(VISION))
def case(request, tmp_path_factory):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    vision = VISION[request.param]
    torch.manual_seed(0)
    cfg = DiffusionGemmaConfig(text_config=TEXT, vision_config=vision, canvas_length=8)
    ref = DiffusionGemmaForBlockDiffusion(cfg).eval()
    _perturb(ref, seed=1)
    out = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    pixels, pos, n_tokens = _images(vision)
    with torch.no_grad():
        want = ref.model.encoder.get_image_features(pixels, pos).pooler_output
    return dict(name=request.param, ref=ref, raw=raw, carried=_carried(out), pixels=pixels, pos=pos,
                n_tokens=n_tokens, want=want, dir=out)


@torch.no_grad()
def test_matches_reference_float32(case):
    tower = load_vision_tower(case["carried"], case["raw"])
    got = tower(case["pixels"], case["pos"])
    want = case["want"]
    assert got.dtype == torch.float32 and got.shape == want.shape == (sum(case["n_tokens"]), TEXT["hidden_size"])
    assert (got - want).abs().max().item() < 1e-5, (got - want).abs().max()
    assert want.abs().mean() > 0.1  # not a trivially small output


@torch.no_grad()
def test_soft_token_counts_match_reference_rows(case):
    pos, k = case["pos"], case["raw"]["vision_config"]["pooling_kernel_size"]
    counts = VisionTower.soft_token_counts(pos, k)
    assert counts == case["n_tokens"] and len(set(counts)) == 2
    assert all(((pos == -1).all(-1)).any(-1).tolist())  # every image has padding patches
    enc = case["ref"].model.encoder
    for i, n in enumerate(counts):  # one image at a time: the reference's own row count
        assert enc.get_image_features(case["pixels"][i:i + 1], pos[i:i + 1]).pooler_output.shape[0] == n


@torch.no_grad()
def test_clipping_and_standardization_matter(case):
    """The perturbed bounds and std buffers change the output, so the parity test really covers them."""
    if case["name"] != "clip_std_k3":
        pytest.skip("only the clipped, standardized config has them")
    tower = load_vision_tower(case["carried"], case["raw"])
    base = tower(case["pixels"], case["pos"])
    for m in tower.modules():
        if getattr(m, "clip", False):
            m.clip = False
    assert (tower(case["pixels"], case["pos"]) - base).abs().max() > 1e-3
    tower.vision_tower.std_bias.zero_()
    tower.vision_tower.std_scale.fill_(1.0)
    unclipped = tower(case["pixels"], case["pos"])
    tower.vision_tower.cfg = VisionConfig(**{**tower.vision_tower.cfg.__dict__, "standardize": False})
    assert (tower(case["pixels"], case["pos"]) - unclipped).abs().max() < 1e-5  # identity buffers = off


@torch.no_grad()
def test_bfloat16_load(case):
    tower = load_vision_tower(case["carried"], case["raw"], dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in tower.state_dict().values())
    got = tower(case["pixels"], case["pos"])
    assert got.dtype == torch.bfloat16
    want = case["want"]
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 0.05, rel


def test_missing_tensor_names_the_key(case):
    carried = dict(case["carried"])
    key = "model.encoder.vision_tower.encoder.layers.1.self_attn.k_norm.weight"
    del carried[key]
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.self_attn\.k_norm\.weight"):
        load_vision_tower(carried, case["raw"])


def test_tensor_absent_from_its_file_names_file_and_key(case, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"unrelated": torch.zeros(1)}, str(other))
    key = "model.encoder.embed_vision.embedding_projection.weight"
    with pytest.raises(ValueError, match=r"other\.safetensors.*embed_vision\.embedding_projection\.weight"):
        load_vision_tower({**case["carried"], key: other}, case["raw"])


def test_unexpected_tensor_is_an_error(case):
    key = "model.encoder.vision_tower.encoder.layers.2.input_layernorm.weight"  # a layer the config lacks
    first = next(iter(case["carried"].values()))
    with pytest.raises(ValueError, match=r"layers\.2\.input_layernorm.*unexpected"):
        load_vision_tower({**case["carried"], key: first}, case["raw"])


def test_wrong_shape_names_file_key_and_shapes(case, tmp_path):
    key = "model.encoder.vision_tower.patch_embedder.position_embedding_table"
    bad = tmp_path / "bad.safetensors"
    save_file({key: torch.zeros(2, 7, 16)}, str(bad))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*position_embedding_table.*\(2, 7, 16\)"):
        load_vision_tower({**case["carried"], key: bad}, case["raw"])


def test_config_defaults_are_the_reference_defaults():
    from transformers import Gemma4VisionConfig

    ref = Gemma4VisionConfig()
    ours = VisionConfig.from_dict({"model_type": "gemma4_vision"})
    for field, value in ours.__dict__.items():
        want = ref.rope_parameters["rope_theta"] if field == "rope_theta" else getattr(ref, field)
        assert value == want, field


def test_no_transformers_import():
    code = "import sys, canvaslm.model.vision; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
