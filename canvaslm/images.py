"""User images -> the tensors DiffusionGemma's vision tower takes, matching the Gemma 4 image processor.

Pipeline (`preprocess`), the same arithmetic as `transformers`' Gemma 4 processor (PIL backend):
  1. RGB: images with an alpha band (or a palette/colour-key transparency) are composited onto white,
     anything else is converted with PIL.
  2. Resize, keeping the aspect ratio, to the largest size whose sides are multiples of
     `pooling_kernel_size * patch_size` and whose patch count fits `max_patches`
     (= max_soft_tokens * pooling_kernel_size**2); PIL bicubic. Very thin images get one pooling unit
     on the short side. An image already at that size is not resampled.
  3. Scale by `rescale_factor` (in float64, stored as float32), then `(x - mean) / std` when
     `do_normalize`.
  4. Cut into patch_size x patch_size patches in row-major order, each flattened as (row, column,
     channel); each patch's position is (x, y) = (column, row) in the patch grid.
  5. Pad to `max_patches` rows with zero pixels and (-1, -1) positions.
  The image then stands for `patches // pooling_kernel_size**2` soft tokens.

`load_image` turns what API clients send (data URLs, http(s) URLs, bare base64, bytes, local files under
an allowed directory) into a decoded RGB PIL image, with errors that say what was wrong with the input.
`expand_placeholders` widens each image placeholder token in a prompt into
`<boi> <image>*num_soft_tokens <eoi>`, as the Gemma 4 processor does to the text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import read_json

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
MAX_BYTES = 20 * 2 ** 20  # an encoded image from a client (a data URL, a fetch, an allowed server file)
MAX_PIXELS = 64 * 2 ** 20  # a decoded image's pixels (64 M: 192 MiB as RGB); Pillow only warns below 179 M
COMPOSITE_BAND_PIXELS = 2 ** 22  # pixels per band when compositing transparency onto white (_to_rgb)
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # encoded images PIL may open (JPEG covers MPO)
BICUBIC = 3  # PIL's number for bicubic resampling, as `resample` is written in processor configs
_ACCEPTED_TYPES = ("Gemma4ImageProcessor", "Gemma4ImageProcessorPil", "Gemma4ImageProcessorFast")
_REQUIRED_TRUE = ("do_resize", "do_rescale", "do_convert_rgb")  # steps this module always performs


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing settings of a checkpoint (defaults: the Gemma 4 reference processor's)."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple = (0.0, 0.0, 0.0)
    image_std: tuple = (1.0, 1.0, 1.0)

    def __post_init__(self):
        for name in ("image_mean", "image_std"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("patch_size", "pooling_kernel_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.max_soft_tokens) or self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}, "
                             f"got {self.max_soft_tokens!r}")
        if not _is_number(self.rescale_factor) or self.rescale_factor <= 0:
            raise ValueError(f"rescale_factor must be a positive number, got {self.rescale_factor!r}")
        if not isinstance(self.do_normalize, bool):
            raise ValueError(f"do_normalize must be true or false, got {self.do_normalize!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if (not isinstance(value, tuple) or len(value) != 3 or not all(map(_is_number, value))):
                raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {value!r}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std!r}")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ImageProcessorConfig":
        """Read `processor_config.json` (its "image_processor" object) or else `preprocessor_config.json`
        from `model_dir`; the defaults when neither holds image processor settings. Keys that do not
        change the arithmetic (image_seq_length, size, ...) are ignored; a value this module cannot
        honour is a ValueError naming the file and the field."""
        model_dir = Path(model_dir)
        found = _read_settings(model_dir)
        if found is None:
            return cls()
        path, settings = found
        try:
            return cls(**_fields_from(settings))
        except ValueError as e:
            raise ValueError(f"{path}: image_processor.{e}" if path.name == "processor_config.json"
                             else f"{path}: {e}") from None


def check_against_tower(processor: ImageProcessorConfig, vision_config, model_dir: str | Path | None) -> None:
    """ValueError unless the processor cuts patches the way the vision tower reads them: its patch_size and
    pooling_kernel_size must be config.json's vision_config values (else every image would fail in the
    tower). Names the processor file and field (or the default it fell back to) and config.json's value."""
    found = _read_settings(Path(model_dir)) if model_dir is not None and Path(model_dir).is_dir() else None
    for name in ("patch_size", "pooling_kernel_size"):
        tower = vision_config.get(name)
        if tower is None:
            tower = getattr(ImageProcessorConfig, name)  # the tower's defaults are the processor's (16, 3)
        value = getattr(processor, name)
        if value == tower:
            continue
        if found is None:
            where = f"no processor_config.json or preprocessor_config.json: the default {name}={value}"
        else:
            path, settings = found
            field = f"image_processor.{name}" if path.name == "processor_config.json" else name
            where = f"{path}: {field}={value}" if settings.get(name) is not None else \
                f"{path}: {field} is not set, so it is the default {value},"
        raise ValueError(f"{where} disagrees with config.json's vision_config.{name}={tower}, which the vision "
                         "tower reads (every image would fail); make them agree")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_settings(model_dir: Path) -> tuple[Path, dict] | None:
    """(file, image processor settings) as transformers looks them up: a nested "image_processor" in
    processor_config.json first, then preprocessor_config.json."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = model_dir / name
        if not path.is_file():
            continue
        data = read_json(path)
        if key is None:
            return path, data
        if key in data:
            if not isinstance(data[key], dict):
                raise ValueError(f"{path}: {key} must be an object, got {type(data[key]).__name__}")
            return path, data[key]
    return None


def _fields_from(settings: dict) -> dict:
    """The dataclass fields in a processor settings dict; rejects settings that would change the
    arithmetic in ways this module does not implement."""
    kind = settings.get("image_processor_type")
    if kind is not None and kind not in _ACCEPTED_TYPES:
        raise ValueError(f"image_processor_type {kind!r} is not a Gemma 4 image processor")
    for name in _REQUIRED_TRUE:
        if settings.get(name) not in (None, True):
            raise ValueError(f"{name}={json.dumps(settings[name])} is not supported (only true)")
    if settings.get("resample") not in (None, BICUBIC):
        raise ValueError(f"resample={settings['resample']!r} is not supported (only {BICUBIC}, bicubic)")
    out = {}
    for name in ("patch_size", "max_soft_tokens", "pooling_kernel_size", "rescale_factor", "do_normalize"):
        if settings.get(name) is not None:
            out[name] = settings[name]
    for name in ("image_mean", "image_std"):
        value = settings.get(name)
        if value is None:
            continue
        out[name] = (value,) * 3 if _is_number(value) else value
    return out


# ----------------------------------------------------------------------------------------------------
# preprocessing


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [max_patches, patch_size**2 * 3] float32, zero rows after the real patches
    position_ids: torch.Tensor  # [max_patches, 2] long (x, y) per patch, (-1, -1) on padding rows
    num_soft_tokens: int  # placeholder tokens this image stands for in the prompt
    digest: str  # sha256 of the patch grid and processed pixels: equal digests, equal vision inputs


def target_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """(height, width) the image is resized to (module docstring, step 2)."""
    if height < 1 or width < 1:
        raise ValueError(f"image: empty image ({width}x{height})")
    unit = cfg.pooling_kernel_size * cfg.patch_size
    budget = cfg.max_patches * cfg.patch_size ** 2  # pixels
    scale = math.sqrt(budget / (height * width))
    new_h = math.floor(scale * height / unit) * unit
    new_w = math.floor(scale * width / unit) * unit
    longest = cfg.max_soft_tokens * unit
    if new_h == 0 and new_w == 0:
        raise ValueError(f"image: {width}x{height} would be resized to nothing with patch budget "
                         f"{cfg.max_patches}")
    if new_h == 0:
        new_h, new_w = unit, min(math.floor(width / height) * unit, longest)
    elif new_w == 0:
        new_h, new_w = min(math.floor(height / width) * unit, longest), unit
    if new_h * new_w > budget:
        raise ValueError(f"image: resizing {width}x{height} to {new_w}x{new_h} would exceed "
                         f"{cfg.max_patches} patches of {cfg.patch_size}px")
    return new_h, new_w


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent parts composited onto white (as the reference processor does). The compositing
    goes a band of rows at a time: done whole, its RGBA copies of a 64 M-pixel image took ~1 GiB at once."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        out = Image.new("RGB", image.size)
        rows = max(1, COMPOSITE_BAND_PIXELS // image.width)
        for top in range(0, image.height, rows):
            band = image.crop((0, top, image.width, min(image.height, top + rows))).convert("RGBA")
            white = Image.new("RGBA", band.size, (255, 255, 255, 255))
            out.paste(Image.alpha_composite(white, band).convert("RGB"), (0, top))
        return out
    return image if image.mode == "RGB" else image.convert("RGB")


def _patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, C] -> [(H/p)*(W/p), p*p*C], patches row-major, each flattened as (row, column, channel)."""
    h, w, c = pixels.shape
    grid = pixels.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape((h // patch) * (w // patch), patch * patch * c)


def preprocess(image: Image.Image, cfg: ImageProcessorConfig) -> ProcessedImage:
    """One image -> padded patches, positions and soft-token count (module docstring)."""
    image = _to_rgb(image)
    new_h, new_w = target_size(image.height, image.width, cfg)
    if (new_h, new_w) != (image.height, image.width):
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)
        std = np.asarray(cfg.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
    p = cfg.patch_size
    patches = np.ascontiguousarray(_patchify(pixels, p))
    rows, cols = new_h // p, new_w // p
    n = rows * cols

    pixel_values = torch.zeros(cfg.max_patches, cfg.patch_dim, dtype=torch.float32)
    pixel_values[:n] = torch.from_numpy(patches)
    position_ids = torch.full((cfg.max_patches, 2), -1, dtype=torch.long)
    index = torch.arange(n)
    position_ids[:n, 0] = index % cols
    position_ids[:n, 1] = index // cols

    digest = hashlib.sha256(f"{rows}x{cols}x{p}:".encode())
    digest.update(patches.tobytes())
    return ProcessedImage(pixel_values, position_ids, n // cfg.pooling_kernel_size ** 2, digest.hexdigest())


def stack(images: list[ProcessedImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch: ([N, max_patches, D] pixel values, [N, max_patches, 2] positions)."""
    if not images:
        raise ValueError("stack: no images")
    shapes = {tuple(im.pixel_values.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"stack: images were processed with different configs (shapes {sorted(shapes)})")
    return torch.stack([im.pixel_values for im in images]), torch.stack([im.position_ids for im in images])


def expand_placeholders(ids: list[int], counts: list[int], *, image_token_id: int, boi_id: int,
                        eoi_id: int) -> list[int]:
    """Each `image_token_id` in `ids` (the i-th standing for image i) -> [boi] + [image]*counts[i] + [eoi]."""
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(counts):
        raise ValueError(f"the prompt has {found} image placeholder(s) but {len(counts)} image(s) were given")
    if any(not _is_int(c) or c < 1 for c in counts):
        raise ValueError(f"soft token counts must be positive integers, got {counts}")
    out: list[int] = []
    it = iter(counts)
    for t in ids:
        if t == image_token_id:
            out += [boi_id] + [image_token_id] * next(it) + [eoi_id]
        else:
            out.append(t)
    return out


# ----------------------------------------------------------------------------------------------------
# loading

_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
_MIN_BARE_BASE64 = 256  # a shorter string is only taken as base64 when it decodes to a known image header


def load_image(source, *, allowed_local_media_path: str | Path | None = None, timeout: float = 10.0,
               max_bytes: int = MAX_BYTES, follow_redirects: bool = True,
               max_file_bytes: int | None = MAX_BYTES) -> Image.Image:
    """A decoded RGB image from `source`: a PIL image; encoded bytes; or a string holding a data URL, an
    http(s) URL, a file:// URL or a path (only under `allowed_local_media_path`; relative paths are taken
    from the working directory), or bare base64; encoded images in one of FORMATS (another is refused by
    name). EXIF orientation is applied, transparency composited onto white. Encoded inputs over `max_bytes` are refused, and local files and raw bytes (a caller's own
    data: no server client sends raw bytes) over `max_file_bytes` (None: only the pixel limit applies, for
    the user's own files and bytes: LLM, the CLI, training). A fetch takes at most `timeout`
    seconds in all (a server that trickles bytes is cut off); `follow_redirects=False` (an allow-list of
    hosts is in force) refuses a redirect, which could lead elsewhere. Errors are ValueError('image: ...')."""
    if isinstance(source, Image.Image):
        return _finish(source, "the image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), "the image bytes", max_file_bytes)
    if isinstance(source, os.PathLike):
        return _read_file(os.fspath(source), allowed_local_media_path, max_file_bytes, "local file")
    if not isinstance(source, str):
        raise TypeError(f"image: unsupported source type {type(source).__name__}")
    text = source.strip()
    lower = text[:10].lower()
    if lower.startswith("data:"):
        return _decode(_data_url_bytes(text, max_bytes), "the data URL", max_bytes)
    if lower.startswith(("http://", "https://")):
        return _decode(_fetch(text, timeout, max_bytes, follow_redirects), _short(text), max_bytes)
    if lower.startswith("file:"):
        url = urlparse(text)
        if url.netloc not in ("", "localhost"):
            raise ValueError(f"image: file URL {_short(text)} names a remote host")
        return _read_file(unquote(url.path), allowed_local_media_path, max_file_bytes, "file URL")
    data = _bare_base64(text, max_bytes)
    if data is not None:
        return _decode(data, "the base64 image", max_bytes)
    return _read_file(text, allowed_local_media_path, max_file_bytes)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _too_large(size: int, max_bytes: int, what: str) -> ValueError:
    return ValueError(f"image: {what} is too large ({size} bytes, the limit is {max_bytes})")


def _b64decode(payload: str, what: str, max_bytes: int) -> bytes:
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise _too_large(len(payload) * 3 // 4, max_bytes, what)
    payload += "=" * (-len(payload) % 4)
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload.encode("ascii"))
        return base64.b64decode(payload.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise ValueError(f"image: {what} is not valid base64 ({e})") from None


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise ValueError("image: malformed data URL (no ',' before the data)")
    if "base64" not in (p.strip().lower() for p in header[5:].split(";")):
        raise ValueError("image: data URL must be base64-encoded ('data:image/png;base64,...')")
    return _b64decode(payload, "the data URL", max_bytes)


def _bare_base64(text: str, max_bytes: int) -> bytes | None:
    """The bytes `text` encodes when it reads as base64 image data, else None (then it is a path)."""
    compact = "".join(text.split())
    if not compact or not _BASE64.match(compact):
        return None
    if len(compact) >= _MIN_BARE_BASE64:
        return _b64decode(compact, "the base64 image", max_bytes)
    try:
        data = _b64decode(compact, "the base64 image", max_bytes)
    except ValueError:
        return None
    return data if data.startswith(_MAGIC) else None


def _fetch(url: str, timeout: float, max_bytes: int, follow_redirects: bool = True) -> bytes:
    """The body at `url`, in at most `timeout` seconds in all. httpx's timeouts bound each read, not the
    whole (a host sending its headers a byte every half second kept a 2 s fetch going for minutes), so the
    fetch runs in a worker thread: at the deadline the caller gets its error and the fetch's sockets are
    shut down, which ends the worker's read at once (and a DNS lookup or connect still under way ends on
    its own timeout, its result dropped)."""
    try:
        import httpx
    except ImportError:
        raise ValueError("image: fetching http(s) URLs needs httpx (pip install httpx)") from None
    what = _short(url)
    try:  # httpx's InvalidURL is no ValueError; a bad IDNA host name is a UnicodeError (a ValueError)
        host = httpx.URL(url).host
    except (httpx.InvalidURL, ValueError) as e:
        raise _malformed(what, e) from None
    if not host:
        raise ValueError(f"image: malformed URL {what!r} (no host)")
    cutoff, done, box = _Cutoff(), threading.Event(), {}

    def work():
        try:
            box["data"] = _get(httpx, url, what, timeout, max_bytes, follow_redirects, cutoff)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name="canvaslm-image-fetch", daemon=True).start()
    if not done.wait(timeout):
        cutoff.expire()
        raise ValueError(f"image: fetching {what} took over {timeout:g} s (the limit for a whole fetch)")
    if "error" in box:
        raise box["error"]
    return box["data"]


def _malformed(what: str, e: Exception) -> ValueError:
    return ValueError(f"image: malformed URL {what!r} ({e})")


class _Cutoff:
    """The sockets of one fetch (from httpcore's `trace` request extension, as each connection opens), shut
    down when the fetch's deadline passes. `shutdown` (not `close`) wakes a read blocked in another thread
    and leaves the descriptor to its owner, which closes it as usual."""

    def __init__(self):
        self.expired, self._socks, self._lock = False, [], threading.Lock()

    def trace(self, event: str, info: dict) -> None:
        if not event.endswith(".complete"):  # connection.connect_tcp.complete, connection.start_tls.complete
            return
        get = getattr(info.get("return_value"), "get_extra_info", None)
        sock = get("socket") if callable(get) else None
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            self._socks.append(sock)
            expired = self.expired
        if expired:  # a connection (a redirect's) opened after the deadline
            _shut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired, socks = True, list(self._socks)
        for sock in socks:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:  # the plain socket's shutdown: an SSLSocket's own would also drop its TLS state under the reader
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed (or a TCP socket a TLS one took over)


def _get(httpx, url: str, what: str, timeout: float, max_bytes: int, follow_redirects: bool,
         cutoff: _Cutoff) -> bytes:
    """`_fetch`'s worker: the GET itself, its sockets reported to `cutoff`."""
    deadline = time.monotonic() + timeout
    try:
        with httpx.Client(timeout=timeout, follow_redirects=follow_redirects) as client:
            request = client.build_request("GET", url, extensions={"trace": cutoff.trace})
            resp = client.send(request, stream=True)
            try:
                if resp.is_redirect and not follow_redirects:
                    raise ValueError(f"image: {what} redirects (HTTP {resp.status_code}), and redirects are not "
                                     "followed where only some hosts are allowed (--allowed-media-domains)")
                if not resp.is_success:
                    raise ValueError(f"image: fetching {what} failed with HTTP {resp.status_code}")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise _too_large(int(declared), max_bytes, what)
                chunks, size = [], 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_large(size, max_bytes, what)
                    if cutoff.expired or time.monotonic() > deadline:
                        raise ValueError(f"image: fetching {what} took over {timeout:g} s (got {size} bytes)")
                    chunks.append(chunk)
            finally:
                resp.close()
    except httpx.HTTPError as e:
        if cutoff.expired:
            raise ValueError(f"image: fetching {what} took over {timeout:g} s (the limit for a whole fetch)") from None
        raise ValueError(f"image: fetching {what} failed ({type(e).__name__}: {e})") from None
    except (httpx.InvalidURL, UnicodeError) as e:  # a redirect's bad URL; a host name the resolver cannot encode
        raise _malformed(what, e) from None
    return b"".join(chunks)


def _read_file(path: str, allowed: str | Path | None, max_bytes: int | None, kind: str | None = None) -> Image.Image:
    """The image in a local file; kind: what named it ("file URL", "local file"; None: a bare string, which
    may have been meant as something else)."""
    if allowed is None:
        what = f"{_short(path)!r} is not a URL, data URL or base64 image, and" if kind is None else \
            f"{kind} {_short(path)!r}:"
        raise ValueError(f"image: {what} local files are refused unless an allowed local media path is set "
                         "(--allowed-local-media-path)")
    what = _short(path)
    try:
        root = Path(allowed).resolve()
        if not root.is_dir():
            raise ValueError(f"image: the allowed local media path {allowed} is not a directory")
        target = Path(path).resolve()
        if not target.is_relative_to(root):
            raise ValueError(f"image: {what} is outside the allowed local media path {root}")
        if not target.is_file():
            raise ValueError(f"image: no such file {what}")
        size = target.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise _too_large(size, max_bytes, what)
        data = target.read_bytes()
    except ValueError as e:
        if str(e).startswith("image: "):
            raise
        raise ValueError(f"image: bad local path {what!r} ({e})") from None
    except OSError as e:
        raise ValueError(f"image: cannot read {what} ({e.strerror or e})") from None
    return _decode(data, what, max_bytes)


def _decode(data: bytes, what: str, max_bytes: int | None) -> Image.Image:
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, what)
    if not data:
        raise ValueError(f"image: {what} is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ValueError(f"image: {what} is {_other_format(data)}") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"image: {what} is too large to decode ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image: {what} could not be read ({e})") from None
    w, h = image.size  # from the header: refuse before decoding what would take gigabytes
    if w * h > MAX_PIXELS:
        raise ValueError(f"image: {what} is {w} x {h} pixels, over the limit of {MAX_PIXELS:,} (the processor "
                         "shrinks every image to at most ~2.6 M pixels anyway)")
    return _finish(image, what)


def _other_format(data: bytes) -> str:
    """What `data`, which no FORMATS reader took, is: its format's name when PIL knows it, so the error says
    what came. Only PIL's header parsers run here, never a decoder (EPS's would start Ghostscript)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is "not an image" alike
        kind = None
    if kind is None:
        return "not an image (PIL cannot identify its format)"
    return f"in {kind} format, which is not supported (supported: {', '.join(FORMATS)})"


def _finish(image: Image.Image, what: str) -> Image.Image:
    """Decode fully (so broken data fails here), apply EXIF orientation, convert to RGB."""
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"image: {what} is too large to decode ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"image: {what} could not be decoded ({e})") from None
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        pass  # an unreadable EXIF block: keep the pixels as stored
    return _to_rgb(image)
