"""canvaslm.images against transformers' Gemma 4 image processor and processor (the reference), plus
image loading from every source an API client may send."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from canvaslm.images import (SUPPORTED_SOFT_TOKENS, ImageProcessorConfig, expand_placeholders, load_image,
                             preprocess, stack, target_size)

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "default": ImageProcessorConfig(),
    "small": ImageProcessorConfig(max_soft_tokens=70),
    "odd": ImageProcessorConfig(patch_size=14, max_soft_tokens=140, pooling_kernel_size=2, do_normalize=True,
                                image_mean=(0.5, 0.4, 0.3), image_std=(0.25, 0.5, 0.75)),
}
# (height, width): landscape, tall, wide, tiny, large, thinner than one pooling unit after scaling, and
# the exact target sizes of the default and small configs (no resampling)
SIZES = [(480, 640), (1000, 300), (120, 900), (5, 7), (1536, 2048), (2, 900), (900, 3), (960, 672), (480, 336)]


def _random_image(h: int, w: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "P":  # palette with one transparent entry
        img = Image.fromarray(rng.integers(0, 16, (h, w), dtype=np.uint8), "P")
        img.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tolist())
        img.info["transparency"] = 3
        return img
    # smooth + noise so bicubic overshoot (clipping) and fine detail both occur
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    noise = rng.integers(-40, 41, (h, w, 3))
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")
    return Image.fromarray(rgb, "RGB")


def _reference(cfg: ImageProcessorConfig, image: Image.Image):
    proc = transformers.Gemma4ImageProcessorPil(
        patch_size=cfg.patch_size, max_soft_tokens=cfg.max_soft_tokens,
        pooling_kernel_size=cfg.pooling_kernel_size, do_normalize=cfg.do_normalize,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))
    return proc(images=[image], return_tensors="pt")


def _check_parity(cfg: ImageProcessorConfig, image: Image.Image, atol: float = 1e-6):
    ours = preprocess(image, cfg)
    ref = _reference(cfg, image)
    assert ours.pixel_values.shape == ref["pixel_values"][0].shape == (cfg.max_patches, cfg.patch_dim)
    assert ours.pixel_values.dtype == torch.float32 and ours.position_ids.dtype == torch.long
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"][0], atol=atol, rtol=0)
    assert torch.equal(ours.position_ids, ref["image_position_ids"][0])
    assert ours.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0])
    return ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_preprocess_matches_reference(name):
    cfg = CONFIGS[name]
    for i, (h, w) in enumerate(SIZES):
        out = _check_parity(cfg, _random_image(h, w, "RGB", i))
        real = int((out.position_ids[:, 0] >= 0).sum())
        assert real == out.num_soft_tokens * cfg.pooling_kernel_size ** 2
        assert (out.pixel_values[real:] == 0).all() and (out.position_ids[real:] == -1).all()


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
@pytest.mark.parametrize("name", ["default", "small"])
def test_preprocess_modes_match_reference(name, mode):
    for i, (h, w) in enumerate([(300, 200), (37, 53)]):
        _check_parity(CONFIGS[name], _random_image(h, w, mode, 100 + i))


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_transparency_is_composited_in_bands(mode, monkeypatch):
    """A big transparent image is composited a band of rows at a time (whole, its RGBA copies of a 64 M-pixel
    image took ~1 GiB), with the reference's pixels."""
    from canvaslm import images
    sizes = []
    real = Image.alpha_composite
    monkeypatch.setattr(images, "COMPOSITE_BAND_PIXELS", 53 * 8)
    monkeypatch.setattr(images.Image, "alpha_composite", lambda a, b: sizes.append(b.size) or real(a, b))
    image = _random_image(37, 53, mode, 7)
    banded = images.preprocess(image, CONFIGS["small"])
    assert sizes and max(w * h for w, h in sizes) <= 53 * 8 and sum(h for _, h in sizes) == 37
    monkeypatch.undo()  # the reference composites too
    assert torch.equal(_check_parity(CONFIGS["small"], image).pixel_values, banded.pixel_values)


def test_target_size_matches_processor_token_count():
    """The reference processor's own token arithmetic (used for prompt lengths) agrees with ours."""
    from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size

    cfg = ImageProcessorConfig()
    for h, w in SIZES + [(1, 1), (3000, 1), (1, 5000), (333, 777), (4096, 4096)]:
        ref = get_aspect_ratio_preserving_size(h, w, cfg.patch_size, cfg.max_patches, cfg.pooling_kernel_size)
        assert target_size(h, w, cfg) == ref


def test_torchvision_processor_close():
    pytest.importorskip("torchvision", reason="torchvision is not installed; the torch backend cannot run")
    cfg = CONFIGS["default"]
    image = _random_image(480, 640, "RGB", 7)
    ref = transformers.Gemma4ImageProcessor()(images=[image], return_tensors="pt")
    ours = preprocess(image, cfg)
    assert torch.equal(ours.position_ids, ref["image_position_ids"][0])
    assert (ours.pixel_values - ref["pixel_values"][0]).abs().mean() < 0.02  # different bicubic kernels


def test_digest_and_stack():
    cfg = CONFIGS["small"]
    a, b = _random_image(100, 80, "RGB", 1), _random_image(100, 80, "RGB", 2)
    pa, pa2, pb = preprocess(a, cfg), preprocess(a.copy(), cfg), preprocess(b, cfg)
    assert pa.digest == pa2.digest != pb.digest and len(pa.digest) == 64
    assert preprocess(a, CONFIGS["default"]).digest != pa.digest
    pixels, positions = stack([pa, pb])
    assert pixels.shape == (2, cfg.max_patches, cfg.patch_dim) and positions.shape == (2, cfg.max_patches, 2)
    ref = transformers.Gemma4ImageProcessorPil(max_soft_tokens=70)(images=[a, b], return_tensors="pt")
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(positions, ref["image_position_ids"])
    with pytest.raises(ValueError, match="different configs"):
        stack([pa, preprocess(a, CONFIGS["default"])])
    with pytest.raises(ValueError, match="no images"):
        stack([])


# ----------------------------------------------------------------------------------------------------
# placeholder expansion, against Gemma4Processor on a tiny word-level tokenizer

IMG, BOI, EOI = 5, 4, 6


def _reference_processor(cfg: ImageProcessorConfig):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<|image>": BOI, "<|image|>": IMG, "<image|>": EOI,
             "<|video|>": 7, "<|audio|>": 8, "<|audio>": 9, "<audio|>": 10, "hello": 11, "world": 12, "and": 13}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                              "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"})

    class Processor(transformers.Gemma4Processor):  # no video processor: it needs torchvision, unused here
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    images = transformers.Gemma4ImageProcessorPil(max_soft_tokens=cfg.max_soft_tokens)
    return Processor(feature_extractor=transformers.Gemma4AudioFeatureExtractor(), image_processor=images,
                     tokenizer=tok, video_processor=None), tok


def test_expand_placeholders_matches_reference_processor():
    cfg = CONFIGS["small"]
    proc, tok = _reference_processor(cfg)
    images = [_random_image(30, 50, "RGB", 1), _random_image(90, 20, "RGB", 2), _random_image(5, 7, "RGB", 3)]
    text = "hello <|image|> world <|image|> and <|image|>"
    ref = proc(text=[text], images=[images], return_tensors="pt")
    counts = [preprocess(im, cfg).num_soft_tokens for im in images]
    ids = tok(text)["input_ids"]
    assert ids.count(IMG) == 3
    ours = expand_placeholders(ids, counts, image_token_id=IMG, boi_id=BOI, eoi_id=EOI)
    assert ours == ref["input_ids"][0].tolist()
    pixels, positions = stack([preprocess(im, cfg) for im in images])
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(positions, ref["image_position_ids"])


def test_expand_placeholders_structure_and_errors():
    assert expand_placeholders([1, 9, 2, 9], [2, 1], image_token_id=9, boi_id=7, eoi_id=8) == \
        [1, 7, 9, 9, 8, 2, 7, 9, 8]
    assert expand_placeholders([1, 2], [], image_token_id=9, boi_id=7, eoi_id=8) == [1, 2]
    with pytest.raises(ValueError, match="2 image placeholder.*1 image"):
        expand_placeholders([9, 9], [3], image_token_id=9, boi_id=7, eoi_id=8)
    with pytest.raises(ValueError, match="0 image placeholder.*1 image"):
        expand_placeholders([1], [3], image_token_id=9, boi_id=7, eoi_id=8)


# ----------------------------------------------------------------------------------------------------
# config files

REAL_IMAGE_PROCESSOR = {
    "image_processor_type": "Gemma4ImageProcessor", "do_convert_rgb": True, "do_normalize": False,
    "do_rescale": True, "do_resize": True, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
    "image_seq_length": 280, "max_soft_tokens": 280, "patch_size": 16, "pooling_kernel_size": 3,
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224},
}


def _write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")


def test_from_dir_processor_config(tmp_path):
    _write(tmp_path / "processor_config.json", {"processor_class": "Gemma4Processor", "image_seq_length": 280,
                                                "image_processor": dict(REAL_IMAGE_PROCESSOR, max_soft_tokens=140)})
    cfg = ImageProcessorConfig.from_dir(tmp_path)
    assert cfg == ImageProcessorConfig(max_soft_tokens=140) and cfg.max_patches == 1260
    assert cfg.rescale_factor == 1 / 255
    ref = transformers.Gemma4ImageProcessorPil.from_pretrained(str(tmp_path))
    assert (ref.patch_size, ref.max_soft_tokens, ref.pooling_kernel_size) == (16, 140, 3)


def test_from_dir_preprocessor_config_and_precedence(tmp_path):
    assert ImageProcessorConfig.from_dir(tmp_path) == ImageProcessorConfig()
    _write(tmp_path / "preprocessor_config.json", {"max_soft_tokens": 560, "patch_size": 14, "do_normalize": True,
                                                   "image_mean": 0.5, "image_std": [0.5, 0.25, 0.125]})
    cfg = ImageProcessorConfig.from_dir(tmp_path)
    assert (cfg.max_soft_tokens, cfg.patch_size, cfg.do_normalize) == (560, 14, True)
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.5, 0.25, 0.125)
    _write(tmp_path / "processor_config.json", {"processor_class": "Gemma4Processor"})  # no image_processor
    assert ImageProcessorConfig.from_dir(tmp_path).max_soft_tokens == 560
    _write(tmp_path / "processor_config.json", {"image_processor": {"max_soft_tokens": 70}})
    assert ImageProcessorConfig.from_dir(tmp_path).max_soft_tokens == 70


@pytest.mark.parametrize("field,value,pattern", [
    ("max_soft_tokens", 100, r"image_processor\.max_soft_tokens must be one of 70, 140, 280, 560, 1120, got 100"),
    ("patch_size", 0, r"image_processor\.patch_size must be a positive integer"),
    ("resample", 2, r"image_processor\.resample=2 is not supported"),
    ("do_rescale", False, r"image_processor\.do_rescale=false is not supported"),
    ("image_std", [1.0, 0.0, 1.0], r"image_processor\.image_std must not contain 0"),
    ("image_mean", [0.5, 0.5], r"image_processor\.image_mean must be 3 numbers"),
    ("image_processor_type", "SiglipImageProcessor", r"not a Gemma 4 image processor"),
])
def test_from_dir_rejects_bad_values(tmp_path, field, value, pattern):
    _write(tmp_path / "processor_config.json", {"image_processor": dict(REAL_IMAGE_PROCESSOR, **{field: value})})
    with pytest.raises(ValueError, match=pattern) as e:
        ImageProcessorConfig.from_dir(tmp_path)
    assert "processor_config.json" in str(e.value)


def test_from_dir_errors_name_the_file(tmp_path):
    _write(tmp_path / "preprocessor_config.json", {"max_soft_tokens": 99})
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: max_soft_tokens must be one of"):
        ImageProcessorConfig.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{nope", encoding="utf-8")
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: not valid JSON"):
        ImageProcessorConfig.from_dir(tmp_path)
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        ImageProcessorConfig(max_soft_tokens=64)
    assert SUPPORTED_SOFT_TOKENS == (70, 140, 280, 560, 1120)


# ----------------------------------------------------------------------------------------------------
# loading


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb():
    return _random_image(40, 60, "RGB", 11)


def _same(a: Image.Image, b: Image.Image):
    assert a.mode == "RGB" and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_load_data_url_base64_and_bytes(rgb):
    png = _encode(rgb)
    b64 = base64.b64encode(png).decode()
    _same(load_image(f"data:image/png;base64,{b64}"), rgb)
    _same(load_image(b64), rgb)  # bare base64, as Ollama and Anthropic send
    _same(load_image(b64[:50] + "\n" + b64[50:]), rgb)  # MIME line breaks
    _same(load_image(png), rgb)
    _same(load_image(bytearray(png)), rgb)
    _same(load_image(rgb), rgb)
    jpeg = _encode(rgb, "JPEG", quality=90)
    jb64 = base64.b64encode(jpeg).decode()
    assert jb64.startswith("/9j/")  # looks like a path, but is JPEG data
    _same(load_image(jb64), Image.open(io.BytesIO(jpeg)).convert("RGB"))


def test_load_converts_like_the_reference():
    rgba = _random_image(50, 70, "RGBA", 12)
    loaded = load_image(_encode(rgba))
    assert loaded.mode == "RGB"
    ref = _reference(CONFIGS["small"], rgba)  # the reference composites alpha onto white itself
    torch.testing.assert_close(preprocess(loaded, CONFIGS["small"]).pixel_values, ref["pixel_values"][0],
                               atol=1e-6, rtol=0)
    gray = _random_image(20, 30, "L", 13)
    _same(load_image(_encode(gray)), gray.convert("RGB"))


def test_load_applies_exif_orientation(rgb):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = load_image(_encode(rgb, "PNG", exif=exif.tobytes()))
    assert loaded.size == (rgb.height, rgb.width)
    _same(loaded, rgb.transpose(Image.Transpose.ROTATE_270))


def test_load_bad_inputs(rgb):
    png = _encode(rgb)
    with pytest.raises(ValueError, match="image: the data URL is not valid base64"):
        load_image("data:image/png;base64,iVBOR$$$w0KGgo")
    with pytest.raises(ValueError, match="must be base64-encoded"):
        load_image("data:image/png,abc")
    with pytest.raises(ValueError, match="image: the image bytes is not an image"):
        load_image(b"definitely not an image")
    with pytest.raises(ValueError, match="image: the base64 image is not an image"):
        load_image(base64.b64encode(b"x" * 300).decode())
    with pytest.raises(ValueError, match="image: the image bytes could not be"):
        load_image(png[: len(png) // 2])  # truncated PNG: identified, then fails to decode
    with pytest.raises(ValueError, match=r"too large \(\d+ bytes, the limit is 100\)"):
        load_image(png, max_file_bytes=100)  # raw bytes are a caller's own data, as its files
    assert load_image(png, max_bytes=100).size == rgb.size
    assert load_image(png, max_file_bytes=None).size == rgb.size
    with pytest.raises(ValueError, match="too large"):
        load_image("data:image/png;base64," + base64.b64encode(png).decode(), max_bytes=100)
    with pytest.raises(ValueError, match="image: the image bytes is empty"):
        load_image(b"")
    with pytest.raises(TypeError, match="unsupported source type int"):
        load_image(3)


def test_load_local_files(tmp_path, rgb, monkeypatch):
    allowed = tmp_path / "media"
    (allowed / "sub").mkdir(parents=True)
    inside = allowed / "sub" / "cat.png"
    inside.write_bytes(_encode(rgb))
    outside = tmp_path / "secret.png"
    outside.write_bytes(_encode(rgb))
    with pytest.raises(ValueError, match="local files are refused unless an allowed local media path"):
        load_image(str(inside))
    with pytest.raises(ValueError, match="local files are refused"):
        load_image(inside.as_uri())
    _same(load_image(str(inside), allowed_local_media_path=allowed), rgb)
    _same(load_image(inside.as_uri(), allowed_local_media_path=str(allowed)), rgb)
    _same(load_image(inside, allowed_local_media_path=allowed), rgb)
    monkeypatch.chdir(allowed)
    _same(load_image("sub/cat.png", allowed_local_media_path=allowed), rgb)  # relative: from the cwd
    for bad in (str(allowed / ".." / "secret.png"), str(outside), "../secret.png",
                (allowed / "sub" / ".." / ".." / "secret.png").as_uri()):
        with pytest.raises(ValueError, match="outside the allowed local media path"):
            load_image(bad, allowed_local_media_path=allowed)
    link = allowed / "link.png"
    link.symlink_to(outside)
    with pytest.raises(ValueError, match="outside the allowed local media path"):
        load_image(str(link), allowed_local_media_path=allowed)
    with pytest.raises(ValueError, match="no such file"):
        load_image(str(allowed / "missing.png"), allowed_local_media_path=allowed)
    with pytest.raises(ValueError, match="too large"):
        load_image(str(inside), allowed_local_media_path=allowed, max_file_bytes=10)
    with pytest.raises(ValueError, match="not a directory"):
        load_image(str(inside), allowed_local_media_path=inside)
    with pytest.raises(ValueError, match="remote host"):
        load_image("file://example.com/etc/passwd", allowed_local_media_path=allowed)


def test_a_local_file_the_user_names_has_no_byte_limit(tmp_path, rgb):
    """API clients' images keep the 20 MiB limit (a data URL, an allowed server file); max_file_bytes=None (LLM,
    the CLI: the user's own files) leaves only the pixel limit, so a big photo or PNG is read. Errors name the
    file, and a file URL refused for want of an allowed path is not called 'not a URL'."""
    big = tmp_path / "big.png"
    big.write_bytes(_encode(rgb) + bytes(21 << 20))  # 21 MiB past IEND, which decoders skip
    with pytest.raises(ValueError, match=rf"image: {big} is too large \(22\d+ bytes, the limit is 20971520\)"):
        load_image(big, allowed_local_media_path=tmp_path)
    with pytest.raises(ValueError, match="the data URL is too large"):
        load_image("data:image/png;base64," + base64.b64encode(big.read_bytes()).decode())
    _same(load_image(big, allowed_local_media_path=tmp_path, max_file_bytes=None), rgb)
    _same(load_image(str(big), allowed_local_media_path=tmp_path, max_file_bytes=None), rgb)
    (tmp_path / "not.png").write_bytes(b"hello")
    with pytest.raises(ValueError, match=rf"image: {tmp_path / 'not.png'} is not an image"):
        load_image(tmp_path / "not.png", allowed_local_media_path=tmp_path, max_file_bytes=None)
    with pytest.raises(ValueError, match=r"image: file URL '/[^']*big\.png': local files are refused unless"):
        load_image(big.as_uri())
    with pytest.raises(ValueError, match=r"image: local file '/[^']*big\.png': local files are refused unless"):
        load_image(big)


@pytest.fixture
def http_root(tmp_path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_load_http(http_root, rgb):
    root, url = http_root
    (root / "cat.png").write_bytes(_encode(rgb))
    (root / "junk.png").write_bytes(b"<html>not an image</html>")
    _same(load_image(f"{url}/cat.png"), rgb)
    with pytest.raises(ValueError, match=r"image: fetching http://127\.0\.0\.1:\d+/nope\.png failed with HTTP 404"):
        load_image(f"{url}/nope.png")
    with pytest.raises(ValueError, match="too large"):
        load_image(f"{url}/cat.png", max_bytes=100)
    with pytest.raises(ValueError, match="is not an image"):
        load_image(f"{url}/junk.png")
    with pytest.raises(ValueError, match="image: fetching http://127.0.0.1:1/x.png failed"):
        load_image("http://127.0.0.1:1/x.png", timeout=2)


def test_redirects_can_be_refused_and_a_fetch_has_a_total_deadline(http_root):
    import socket
    import time

    root, url = http_root
    (root / "sub").mkdir()  # the server answers /sub with a 301 to /sub/ (a listing: not an image)
    with pytest.raises(ValueError, match="is not an image"):
        load_image(f"{url}/sub")  # followed
    with pytest.raises(ValueError, match=r"redirects \(HTTP 301\).*--allowed-media-domains"):
        load_image(f"{url}/sub", follow_redirects=False)
    # a server that trickles a byte at a time: each read is quick, the whole fetch is not
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def trickle():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
        try:
            for _ in range(60):
                conn.sendall(b"x")
                time.sleep(0.1)
        except OSError:
            pass
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"took over 1 s"):
        load_image(f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png", timeout=1.0)
    assert time.monotonic() - t0 < 3
    listener.close()


def test_an_image_too_large_to_decode_is_refused_from_its_header(monkeypatch):
    import canvaslm.images as images

    big = io.BytesIO()
    Image.new("L", (300, 200)).save(big, format="PNG")  # a few hundred bytes of zeros, 60k pixels
    monkeypatch.setattr(images, "MAX_PIXELS", 50_000)
    with pytest.raises(ValueError, match=r"300 x 200 pixels, over the limit of 50,000"):
        load_image(big.getvalue())
    monkeypatch.setattr(images, "MAX_PIXELS", 60_000)
    assert load_image(big.getvalue()).size == (300, 200)
