"""Training images as inference reads them (train/vision.py, data.py): the user's own images (local files,
bytes as a Hugging Face Image column gives them, PIL) have no byte limit, only the pixel limit; and an
image part's OpenAI `detail` sets its soft-token budget, so a training example's prompt and soft tokens
are those LLM.chat builds for the same message."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import build_vision_chat_checkpoint, data_url, png
from PIL import Image

from canvaslm.checkpoint import load_model
from canvaslm.images import MAX_BYTES
from canvaslm.llm import LLM, SamplingParams
from canvaslm.multimodal import image_parts_to_placeholders
from canvaslm.tokenizer import Tokenizer
from canvaslm.train.data import DataError, ImageExample, load_examples
from canvaslm.train.vision import TrainVision

PROCESSOR_140 = {"image_processor": {"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 140,
                                     "patch_size": 16, "pooling_kernel_size": 3}}  # over "low"'s 70


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_review")
    build_vision_chat_checkpoint(out)
    (out / "processor_config.json").write_text(json.dumps(PROCESSOR_140))
    return out


@pytest.fixture(scope="module")
def setup(vision_dir):
    model = load_model(vision_dir, dtype="float32")
    return model, Tokenizer.from_dir(vision_dir), TrainVision(model, vision_dir)


def ask(image_part) -> list:
    return [{"role": "user", "content": [image_part, {"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "cat"}]


def url_part(url: str, detail=None) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def big_png(seed: int = 1) -> bytes:
    """A small picture in a file past images.MAX_BYTES (PIL ignores the bytes after the PNG's end)."""
    return png(60, 40, seed) + bytes(MAX_BYTES + 1024)


def test_local_files_bytes_and_pil_images_have_no_byte_limit(setup, tmp_path, monkeypatch):
    """A file past 20 MiB (it was refused: 'too large'), the same bytes as a datasets Image column's
    {"bytes", "path"}, and a PIL image all load, to the example a small file gives; the pixel limit stays."""
    _, tok, vision = setup
    (tmp_path / "big.png").write_bytes(big_png())
    (tmp_path / "small.png").write_bytes(png(60, 40, 1))
    small, big = load_examples(write_rows(tmp_path / "d.jsonl", [
        {"messages": ask({"type": "image", "image": "small.png"})},
        {"messages": ask({"type": "image", "image": "big.png"})}]), tok, vision=vision)
    assert isinstance(small, ImageExample) and big == small
    (tmp_path / "byte_rows.py").write_text(
        "from PIL import Image\n\n\ndef rows(path, messages):\n"
        "    data = open(path, 'rb').read()\n"
        "    return [{'messages': messages, 'images': [{'bytes': data, 'path': None}]},\n"
        "            {'messages': messages, 'images': [Image.open(path)]}]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bare = ask({"type": "image"})
    got = load_examples("byte_rows:rows", tok, {"path": str(tmp_path / "big.png"), "messages": bare}, vision=vision)
    soft = vision.inputs([small])[0].embeds
    for ex in got:
        assert ex == small
        torch.testing.assert_close(vision.inputs([ex])[0].embeds, soft, rtol=0, atol=0)
    buf = io.BytesIO()
    Image.new("1", (8200, 8200)).save(buf, "PNG")  # 67 M pixels in 8 KiB
    (tmp_path / "huge.png").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"d2\.jsonl:1: image 0: .*8200 x 8200 pixels, over the limit"):
        load_examples(write_rows(tmp_path / "d2.jsonl", [{"messages": ask({"type": "image", "image": "huge.png"})}]),
                      tok, vision=vision)


def test_llm_takes_image_bytes_of_any_size(vision_dir, tmp_path):
    """LLM with a file's bytes as with its path (the bytes were refused past 20 MiB); a data URL, text a
    client could send a server, keeps the limit."""
    llm = LLM(vision_dir, device="cpu")
    (tmp_path / "big.png").write_bytes(big_png())
    prompt = {"prompt": llm.image_placeholder + "hi"}
    by_path = llm.prompt_with_images({**prompt, "multi_modal_data": {"image": str(tmp_path / "big.png")}})
    by_bytes = llm.prompt_with_images({**prompt, "multi_modal_data": {"image": big_png()}})
    assert by_bytes[0] == by_path[0] and by_bytes[1].digests == by_path[1].digests
    torch.testing.assert_close(by_bytes[1].embeds, by_path[1].embeds, rtol=0, atol=0)
    from canvaslm.generate import GenerationError
    with pytest.raises(GenerationError, match="image 0: the image bytes is not an image"):
        llm.prompt_with_images({**prompt, "multi_modal_data": {"image": b"not an image"}})
    with pytest.raises(GenerationError, match="image 0: the data URL is too large"):
        llm.prompt_with_images({**prompt, "multi_modal_data": {"image": data_url(big_png())}})


def test_a_low_detail_image_trains_on_the_prompt_llm_chat_builds(setup, vision_dir, tmp_path):
    """detail "low" (70 soft tokens here, "high" 140's 126): the example's prompt ids equal LLM.chat's and its
    soft tokens the inference path's (training ignored the detail: 147 prompt tokens for both); Responses'
    "original" is "high"; past the cache budget the image is encoded again at its own budget."""
    model, tok, vision = setup
    url = data_url(png(60, 40, 1))
    parts = {"low": url_part(url, "low"), "high": url_part(url, "high"), "auto": url_part(url, "auto"),
             None: url_part(url), "original": {"type": "input_image", "image_url": url, "detail": "original"}}
    rows = [{"messages": ask(p)} for p in parts.values()]
    got = dict(zip(parts, load_examples(write_rows(tmp_path / "d.jsonl", rows), tok, vision=vision)))
    llm = LLM(vision_dir, device="cpu")
    for detail, ex in got.items():
        messages = ask(parts[detail])[:1]
        out = llm.chat(messages, SamplingParams(max_new_tokens=1, max_denoising_steps=1, seed=0))
        assert ex[0] == out.prompt_ids, detail
        details = []
        conv, sources = image_parts_to_placeholders(messages, llm.image_placeholder, details)
        ids, inputs = llm.prompt_with_images({"prompt_token_ids": tok.encode_chat(conv),
                                              "multi_modal_data": {"image": sources}, "image_details": details})
        assert ids == ex[0] and ex.images[0].digest == inputs.digests[0]
        torch.testing.assert_close(vision.inputs([ex])[0].embeds, inputs.embeds, rtol=0, atol=0)
    assert got["low"].images[0].num_soft_tokens == 60 < got["high"].images[0].num_soft_tokens == 126
    assert got["high"] == got["auto"] == got[None] == got["original"]
    lean = TrainVision(model, vision_dir, cache_bytes=0)
    (ex,) = load_examples(write_rows(tmp_path / "low.jsonl", rows[:1]), tok, vision=lean)
    assert ex.images[0].soft_tokens is None and ex == got["low"]
    torch.testing.assert_close(lean.inputs([ex])[0].embeds, vision.inputs([got["low"]])[0].embeds, rtol=0, atol=0)
    with pytest.raises(DataError, match=r"bad\.jsonl:1: image 0: detail 'medium' is not one of 'auto', 'low', 'high'"):
        load_examples(write_rows(tmp_path / "bad.jsonl", [{"messages": ask(url_part(url, "medium"))}]), tok,
                      vision=vision)

