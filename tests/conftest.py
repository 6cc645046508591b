"""Shared fixtures: tiny random DiffusionGemma checkpoints written by `transformers` (the reference)."""

from __future__ import annotations

import os

import pytest
import torch

# Triton fixes interpreter mode when it is first imported, and a library a test imports may import it
# (peft does, through accelerate) before tests/kernels/conftest.py is read: set it before anything runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=8, position_embedding_size=64)

# Several shapes: window shorter than the context, canvases of 16 / 8 / 24, GQA and MQA, default 5:1 pattern.
REFERENCE_CONFIGS = {
    "window8_canvas16": dict(
        canvas_length=16,
        text=dict(vocab_size=384, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                  sliding_window=8, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                  max_position_embeddings=512,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
    "pattern6_canvas8": dict(
        canvas_length=8,
        text=dict(vocab_size=320, hidden_size=48, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                  sliding_window=6, num_experts=6, top_k_experts=3, moe_intermediate_size=8,
                  max_position_embeddings=256)),
    "bias_canvas24": dict(
        canvas_length=24,
        text=dict(vocab_size=448, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, global_head_dim=16, num_global_key_value_heads=2,
                  sliding_window=12, num_experts=3, top_k_experts=1, moe_intermediate_size=16,
                  attention_bias=True, max_position_embeddings=512,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
}


def _perturbed(cfg, out_dir, seed: int):
    """A reference model from `cfg`, perturbed (so norms/scales/layer scalars matter) and saved."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    ref = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n or "scale" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif n.endswith("embed_tokens.weight"):
                p.mul_(30.0)  # a peaked (trained-like) output distribution; near-uniform logits make the
                # entropy ranking hinge on rounding noise, which no two implementations share
        for n, b in ref.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(0.5 + torch.rand((), generator=g).item())
    ref.save_pretrained(out_dir)
    return ref


def build_reference(out_dir, name: str, seed: int = 0):
    """Build, perturb and save a reference model of one of REFERENCE_CONFIGS; return it."""
    from transformers import DiffusionGemmaConfig

    spec = REFERENCE_CONFIGS[name]
    cfg = DiffusionGemmaConfig(text_config=spec["text"], vision_config=VISION, canvas_length=spec["canvas_length"])
    return _perturbed(cfg, out_dir, seed)


def build_mm_reference(out_dir, bidirectional: bool = True, seed: int = 0, vocab: int = 384,
                       image_ids: tuple | None = None, vision_std: float = 0.0):
    """A tiny reference DiffusionGemma that takes images: image / boi / eoi token ids inside its vocabulary
    (default: the last three ids: image, then boi and eoi before it), perturbed and saved. vision_std: noise
    added to the vision tower's weights too (a random tower's output hardly depends on the pixels)."""
    from transformers import DiffusionGemmaConfig

    spec = REFERENCE_CONFIGS["window8_canvas16"]
    img, boi, eoi = image_ids or (vocab - 1, vocab - 3, vocab - 2)
    text = dict(spec["text"], vocab_size=vocab, use_bidirectional_attention="vision" if bidirectional else None)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=VISION, canvas_length=spec["canvas_length"],
                               image_token_id=img, boi_token_id=boi, eoi_token_id=eoi)
    ref = _perturbed(cfg, out_dir, seed)
    if vision_std:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 2)
            for p in ref.model.encoder.vision_tower.parameters():
                p.add_(torch.randn(p.shape, generator=g) * vision_std)
        ref.save_pretrained(out_dir)
    return ref


IMAGE_SPECIALS = ["<|image>", "<|image|>", "<image|>"]  # boi, image, eoi (the Gemma 4 strings)
PROCESSOR_70 = {"image_processor": {"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 70,
                                    "patch_size": 16, "pooling_kernel_size": 3}}  # small images: 70 soft tokens


def build_vision_chat_checkpoint(out_dir, seed: int = 2):
    """A tiny reference checkpoint that reads images and chats: build_mm_reference with a char tokenizer
    whose specials include the Gemma 4 image token strings (at the config's ids), the test chat template,
    and an image processor config of 70 soft tokens. Returns the reference model."""
    import json

    from canvaslm.testing import CHARS, CHAT_TEMPLATE, SPECIALS
    from canvaslm.tokenizer import build_char_tokenizer

    specials = SPECIALS + IMAGE_SPECIALS
    boi, img, eoi = (specials.index(t) for t in IMAGE_SPECIALS)
    ref = build_mm_reference(out_dir, vocab=len(specials) + len(CHARS), image_ids=(img, boi, eoi), seed=seed,
                             vision_std=0.5)
    build_char_tokenizer(CHARS, specials, out_dir, chat_template=CHAT_TEMPLATE, bos_token="<bos>",
                         eos_token="<eos>", pad_token="<pad>")
    (out_dir / "processor_config.json").write_text(json.dumps(PROCESSOR_70))
    return ref


def png(w: int, h: int, seed: int) -> bytes:
    """A random w x h RGB image, PNG-encoded."""
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="session", params=sorted(REFERENCE_CONFIGS))
def reference(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return request.param, out, build_reference(out, request.param)


# Gemma 4's shape: with thinking on, the generation prompt opens the thought channel itself
OPENING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% if enable_thinking %}<|channel>thought\n{% endif %}{% endif %}")


@pytest.fixture(scope="session")
def chat_specials_dir(tmp_path_factory):
    """A tiny checkpoint whose tokenizer has Gemma 4's thought-channel and tool-call specials (read-only: copy it
    to change a file)."""
    from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN
    from canvaslm.testing import make_tiny_checkpoint
    from canvaslm.tool_parser import CALL_CLOSE, CALL_OPEN, QUOTE

    return make_tiny_checkpoint(tmp_path_factory.mktemp("chat_specials"), extra_specials=(
        CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE, QUOTE, "<|tool_response>"))


@pytest.fixture(scope="session")
def opening_template_dir(tmp_path_factory, chat_specials_dir):
    """chat_specials_dir's checkpoint with OPENING_TEMPLATE: with thinking on, the prompt opens the channel."""
    import shutil

    d = tmp_path_factory.mktemp("opening_template") / "ckpt"
    shutil.copytree(chat_specials_dir, d)
    (d / "chat_template.jinja").write_text(OPENING_TEMPLATE)
    return d


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
