"""Images in prompts, side by side with the `transformers` reference: soft tokens in place of the image
placeholders, an image's tokens seeing each other both ways in the encoder, the engine keeping an image in
one encoder call and prefix caching telling images apart."""

from __future__ import annotations

import pytest
import torch

from canvaslm.checkpoint import load_model
from canvaslm.kv_cache import KVCache

from conftest import REFERENCE_CONFIGS, VISION

TOL = 1e-4
V = 384
IMG, BOI, EOI = V - 1, V - 3, V - 2


def build_mm_reference(out_dir, bidirectional: bool = True, seed: int = 0, vision: dict | None = None):
    """A tiny reference DiffusionGemma with image token ids inside its vocabulary, perturbed and saved."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    spec = REFERENCE_CONFIGS["window8_canvas16"]
    text = dict(spec["text"], vocab_size=V, use_bidirectional_attention="vision" if bidirectional else None)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision or VISION, canvas_length=spec["canvas_length"],
                               image_token_id=IMG, boi_token_id=BOI, eoi_token_id=EOI)
    torch.manual_seed(seed)
    ref = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n or "scale" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif n.endswith("embed_tokens.weight"):
                p.mul_(30.0)
        for n, b in ref.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(0.5 + torch.rand((), generator=g).item())
    ref.save_pretrained(out_dir)
    return ref


def image_prompt(counts, text_len=5, seed=0):
    """Token ids with text, then per image boi + IMG * n + eoi and more text; and mm_token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 4, (text_len,), generator=g).tolist()
    for n in counts:
        ids += [BOI] + [IMG] * n + [EOI] + torch.randint(3, V - 4, (3,), generator=g).tolist()
    return ids


@pytest.fixture(scope="module", params=[True, False], ids=["bidirectional", "causal"])
def mm_reference(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("mm")
    return request.param, out, build_mm_reference(out, bidirectional=request.param)


@torch.no_grad()
def test_soft_tokens_and_image_attention_match_the_reference(mm_reference):
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    bidirectional, path, ref = mm_reference
    model = load_model(path)
    cfg = model.cfg
    assert cfg.bidirectional_vision is bidirectional and cfg.image_token_id == IMG
    ids = image_prompt([6, 4], text_len=11)  # longer than the sliding window (8)
    n = len(ids)
    mask = torch.tensor([[t == IMG for t in ids]])
    feats = torch.randn(int(mask.sum()), cfg.hidden_size, generator=torch.Generator().manual_seed(5)) * 3
    cache_ref = DynamicCache(config=ref.config.get_text_config(decoder=True))
    # the masks as the reference's generate builds them (its encoder forward drops the ones it builds itself)
    masks = ref.model.encoder.create_masks_for_generate(
        config=ref.config, inputs_embeds=torch.empty(1, n, 0), attention_mask=None, past_key_values=cache_ref,
        position_ids=torch.arange(n)[None], mm_token_type_ids=mask.long())
    out = ref.model.encoder(input_ids=torch.tensor([ids]), past_key_values=cache_ref, position_ids=torch.arange(n)[None],
                            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
                            attention_mask=masks)
    cache = KVCache(cfg, 1, n + cfg.canvas_length)
    hidden = model.encode(torch.tensor([ids]), torch.arange(n)[None], torch.tensor([0]), cache,
                          image_embeds=feats, image_mask=mask)
    assert (hidden - out.last_hidden_state).abs().max() <= TOL * max(1.0, hidden.abs().max().item())
    canvas = torch.randint(0, V, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(2))
    want = ref(decoder_input_ids=canvas, past_key_values=cache_ref).logits
    got = model.denoise(canvas, torch.tensor([0]), cache)
    assert (got - want).abs().max() <= TOL
    # the soft tokens matter, and so does the mask: a causal encode differs from the reference's where
    # the config asks for bidirectional image attention
    cache2 = KVCache(cfg, 1, n + cfg.canvas_length)
    plain = model.encode(torch.tensor([ids]), torch.arange(n)[None], torch.tensor([0]), cache2)
    assert (plain - hidden).abs().max() > 1e-2
    if bidirectional:
        first = ids.index(IMG)
        model.cfg.__dict__["bidirectional_vision"] = False
        try:
            causal = model.encode(torch.tensor([ids]), torch.arange(n)[None], torch.tensor([0]),
                                  KVCache(cfg, 1, n + cfg.canvas_length), image_embeds=feats, image_mask=mask)
        finally:
            model.cfg.__dict__["bidirectional_vision"] = True
        assert (causal[0, first] - hidden[0, first]).abs().max() > 1e-3  # the first image token saw the others
        assert (causal[0, :first] - hidden[0, :first]).abs().max() <= 1e-5  # text before it did not


def test_image_blocks_are_runs_of_image_tokens():
    from canvaslm.model.diffusion_gemma import DiffusionGemma

    m = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert DiffusionGemma.image_blocks(m).tolist() == [[-1, 1, 1, -1, 2, -1], [1, 1, 1, 1, -1, -1]]
