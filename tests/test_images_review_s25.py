"""Image loading under hostile inputs (review s25): a fetch's deadline holds while a host trickles its
headers, malformed image URLs are errors that name the image, only the documented image formats are
opened, and `Vision.prepare` can stop (or only count) before the vision tower runs."""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import pytest
import torch
from PIL import Image

from canvaslm.images import FORMATS, load_image

from conftest import PROCESSOR_70, build_mm_reference

V = 384
IMG = V - 1  # build_mm_reference's image token


def _header_trickler(pause: float, limit: float):
    """A server answering one request with its status line and headers a byte at a time (one every `pause`
    seconds, for at most `limit` seconds); returns (url, when the client went away: a list)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Pad: " + b"a" * 200 + b"\r\nContent-Length: 4\r\n\r\nabcd"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    gone = []

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        end = time.monotonic() + limit
        try:
            for i in range(len(head)):
                if time.monotonic() > end:
                    break
                conn.sendall(head[i:i + 1])
                time.sleep(pause)
        except OSError:  # the client shut its socket
            gone.append(time.monotonic())
        finally:
            conn.close()
            listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", gone


def test_a_fetch_whose_headers_trickle_in_ends_at_its_deadline():
    """Each header byte came within httpx's per-read timeout, so the fetch ran for minutes past its limit:
    now the caller gets its error at the deadline, and the fetch's socket is shut (the worker ends too)."""
    url, gone = _header_trickler(pause=0.1, limit=6)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"image: fetching http://127\.0\.0\.1:\d+/x\.png took over 1 s"):
        load_image(url, timeout=1.0)
    took = time.monotonic() - t0
    assert took < 2.5, took
    for _ in range(40):  # the next byte the server sends meets a shut socket
        if gone:
            break
        time.sleep(0.05)
    assert gone and gone[0] - t0 < 3.5


@pytest.mark.parametrize("url, why", [
    ("http://exa\tmple.com/x.png", "non-printable"),
    ("http://[::1/x", "port"),
    ("http://example.com:abc/x", "Invalid port: 'abc'"),
    ("http://" + "a" * 70 + ".com/x.png", "label"),
    ("http:///x.png", "no host"),
])
def test_a_malformed_image_url_is_a_value_error_that_names_it(url, why):
    """httpx's InvalidURL is no ValueError (the server answered 500), nor did a bad host name say what failed."""
    with pytest.raises(ValueError, match=r"^image: malformed URL ") as e:
        load_image(url, timeout=1.0)
    assert why in str(e.value)


def _eps() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="EPS")
    return buf.getvalue()


def test_only_the_documented_formats_are_opened(monkeypatch):
    """EPS went to Ghostscript (any format PIL knows was opened): now a format outside FORMATS is refused by
    name, before any decoder runs; every format in FORMATS (and MPO, a JPEG from a phone) still loads."""
    from PIL import EpsImagePlugin

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    with pytest.raises(ValueError, match=r"image: the image bytes is in EPS format, which is not supported "
                                         r"\(supported: PNG, JPEG, GIF, WEBP, BMP, TIFF\)"):
        load_image(_eps())
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PPM")
    with pytest.raises(ValueError, match="in PPM format, which is not supported"):
        load_image(buf.getvalue())
    with pytest.raises(ValueError, match=r"is not an image \(PIL cannot identify its format\)"):
        load_image(b"<html>not an image</html>" * 20)
    pic = Image.new("RGB", (20, 10), (10, 200, 30))
    for fmt in (*FORMATS, "MPO"):
        buf = io.BytesIO()
        pic.save(buf, format=fmt, **({"save_all": True, "append_images": [pic]} if fmt == "MPO" else {}))
        assert load_image(buf.getvalue()).size == (20, 10), fmt


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    from canvaslm.checkpoint import load_model
    from canvaslm.multimodal import Vision

    out = tmp_path_factory.mktemp("mm_vision_s25")
    build_mm_reference(out, bidirectional=True, seed=4, vision_std=0.5)
    (out / "processor_config.json").write_text(json.dumps(PROCESSOR_70))
    return lambda **kw: Vision(load_model(out), out, **kw)


def test_a_malformed_url_under_an_allow_list_names_the_image(vision):
    """urllib's ValueError ("Invalid IPv6 URL") escaped the domain check: a 500 on the server."""
    from canvaslm.multimodal import ImageError

    v = vision(allowed_media_domains=["example.com"])
    with pytest.raises(ImageError, match=r"^image 1: malformed URL 'http://\[::1/x' \(Invalid IPv6 URL\)"):
        v.prepare([5, IMG, IMG], [Image.new("RGB", (20, 20)), "http://[::1/x"])
    with pytest.raises(ImageError, match=r"^image 0: malformed URL 'http://example.com:abc/x' \(Invalid port"):
        v.prepare([5, IMG], ["http://example.com:abc/x"])


def _counting(v):
    calls = []
    encode = v.encode
    v.encode = lambda p: calls.append(1) or encode(p)
    return calls


def test_prepare_checks_the_expanded_ids_before_the_tower_runs(vision):
    """A prompt over the context ran every image through the tower before its 400: `check` sees the expanded
    ids first, and what it raises stops prepare there; encode=False counts without the tower."""
    v = vision()
    calls = _counting(v)
    pics = [Image.new("RGB", (30 + k, 20), (k, 2 * k, 3)) for k in range(3)]
    prompt = [5, IMG, 6, IMG, IMG]
    seen = []

    class TooLong(Exception):
        pass

    def check(ids):
        seen.append(list(ids))
        raise TooLong(len(ids))

    with pytest.raises(TooLong):
        v.prepare(prompt, pics, check=check)
    assert calls == [] and len(seen) == 1
    counted, only = v.prepare(prompt, pics, encode=False)
    assert calls == [] and only.embeds is None
    ids, full = v.prepare(prompt, pics, check=seen.append)
    assert len(calls) == 3 and seen[-1] == ids == counted == seen[0]
    assert (only.positions, only.spans, only.digests) == (full.positions, full.spans, full.digests)
    assert full.embeds.shape[0] == len(full.positions) and isinstance(full.embeds, torch.Tensor)
    v.prepare([5, 6], [], check=seen.append)  # no images: checked all the same
    assert seen[-1] == [5, 6]
