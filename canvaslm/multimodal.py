"""Images in prompts: from user images to the placeholder ids and soft tokens the encoder reads.

A prompt names each image with one image token (the tokenizer's `<|image|>`, `ModelConfig.image_token_id`),
as the Gemma 4 processor expects. `Vision.prepare` loads and preprocesses the images (`canvaslm.images`),
expands each placeholder into `boi + image_token * n + eoi` (n: the image's soft tokens) and runs the vision
tower, loaded from the checkpoint's own tensors on first use (`model.carried_tensors`), into an
`ImageInputs`: the soft tokens in prompt order and where they go. The encoder puts them in place of the
placeholder embeddings and, when the config says so, lets one image's tokens see each other both ways;
whoever splits a prompt into encoder calls keeps each image in one call (`ImageInputs.spans`).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

IMAGE_PART_TYPES = ("image_url", "image", "input_image")
PROCESSOR_KWARGS = ("max_soft_tokens",)  # what a request (or --mm-processor-kwargs) may set: the image budget
LOW_DETAIL_TOKENS = 70  # an image sent with detail "low": the processor's smallest budget
MAX_FILE_BYTES = 20 << 20  # a local image file an API client names (images.MAX_BYTES, as for its other images)
ENCODER_CACHE_BYTES = 512 << 20  # host memory for recent images' soft tokens (280 x 2816 in bf16: 1.5 MiB each)


class ImageError(ValueError):
    """An image or an image prompt that cannot be used (bad data, wrong placeholder count, no vision)."""


DETAILS = (None, "auto", "low", "high")  # OpenAI's image detail values


def checked_details(details, n: int) -> list:
    """Per-image details for n images: None (the request's budget for all) or a list of n DETAILS values;
    anything else is an ImageError that names image_details."""
    if details is None:
        return [None] * n
    if not isinstance(details, (list, tuple)) or len(details) != n:
        raise ImageError(f"image_details must be a list with one entry per image ({n}), got {details!r}")
    bad = [d for d in details if d not in DETAILS]
    if bad:
        raise ImageError(f"image_details: {bad[0]!r} is not a detail; expected one of {DETAILS}")
    return list(details)


def for_detail(processor, detail: str | None):
    """The processor settings for an image sent with OpenAI's `detail`: "low" takes the smallest budget
    (LOW_DETAIL_TOKENS soft tokens, as OpenAI's cheap low-resolution pass); any other, the settings given."""
    return dataclasses.replace(processor, max_soft_tokens=LOW_DETAIL_TOKENS) if detail == "low" else processor


@dataclass(frozen=True)
class ImageInputs:
    """A prompt's images, ready for the encoder."""

    embeds: torch.Tensor | None  # [n, d] soft tokens of every image, in prompt order (None: only counted)
    positions: tuple[int, ...]  # the n prompt positions they replace (ascending)
    spans: tuple[tuple[int, int], ...]  # each image's [start, end) run of positions
    digests: tuple[str, ...]  # one per image (images.ProcessedImage.digest)

    def rows(self, start: int, end: int) -> tuple[list[int], torch.Tensor]:
        """The image positions in [start, end), as offsets from start, and their soft tokens."""
        lo, hi = bisect.bisect_left(self.positions, start), bisect.bisect_left(self.positions, end)
        return [p - start for p in self.positions[lo:hi]], self.embeds[lo:hi]

    def chunk_end(self, start: int, end: int) -> int:
        """`end`, moved to the end of the image it would cut in two (an image is encoded in one call)."""
        for a, b in self.spans:
            if a < end < b and b > start:
                return b
        return end

    def prompt_key(self, prompt_ids) -> tuple:
        """The prompt as prefix caching compares it: each image token stands for (its image, its index),
        so two prompts share KV only where they hold the same images."""
        key = list(prompt_ids)
        for (a, b), digest in zip(self.spans, self.digests):
            for i in range(a, b):
                key[i] = (digest, i - a)
        return tuple(key)


def image_token_text(tokenizer, cfg) -> str:
    """The text of the image token (what a prompt writes where an image goes): the tokenizer's string for
    `cfg.image_token_id`, or Gemma 4's "<|image|>" where the tokenizer lacks that id."""
    tid = cfg.image_token_id
    if tokenizer is not None and tid is not None and 0 <= tid < cfg.vocab_size:
        try:
            return tokenizer.id_to_token(tid)
        except (KeyError, ValueError):
            pass
    return "<|image|>"


class ImagePrompt(list):
    """Prompt ids with the sources of the images its placeholders stand for (one image token each), as a
    chat template writes them; `Vision.prepare` turns them into the expanded ids and ImageInputs."""

    def __init__(self, ids, sources, processor_kwargs: dict | None = None, details=None):
        super().__init__(ids)
        self.sources = list(sources)
        self.processor_kwargs = processor_kwargs  # vLLM's mm_processor_kwargs (e.g. {"max_soft_tokens": 560})
        self.details = list(details) if details else None  # per image, OpenAI's detail ("low": LOW_DETAIL_TOKENS)
        self.images: ImageInputs | None = None  # set once loaded (server.serving.load_images)


def image_spans(positions: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive positions (one image's soft tokens)."""
    spans = []
    for p in positions:
        if spans and spans[-1][1] == p:
            spans[-1] = (spans[-1][0], p + 1)
        else:
            spans.append((p, p + 1))
    return spans


def image_parts_to_placeholders(messages: list, placeholder: str, details: list | None = None) -> tuple[list, list]:
    """Chat messages with every image part (OpenAI `image_url`, `image`, Responses `input_image`) turned
    into {"type": "image", "text": placeholder} (the image token's text: what a template that takes content
    as a string gets; one that loops over parts gets {"type": "image"}: Tokenizer.renders_parts), and the
    images' sources in order. `details`, if a list, gets each image's OpenAI `detail` (or None)."""
    sources, out = [], []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in IMAGE_PART_TYPES:
                parts.append(part)
                continue
            src = part.get(kind) if kind != "input_image" else part.get("image_url")
            if details is not None:
                detail = (src if isinstance(src, dict) else part).get("detail")
                # Responses' input_image also takes "original" (full resolution): the largest budget here
                details.append("high" if kind == "input_image" and detail == "original" else detail)
            if isinstance(src, dict):
                src = src.get("url")
            if src is None and kind == "image":
                src = part.get("image") or part.get("url")
            if not isinstance(src, (str, bytes, os.PathLike)) and not hasattr(src, "convert"):
                raise ImageError(f"messages[{i}].content[{j}]: an {kind!r} part needs an image "
                                 f"(e.g. {{'type': 'image_url', 'image_url': {{'url': 'data:image/png;base64,...'}}}})")
            sources.append(src)
            parts.append({"type": "image", "text": placeholder})
        out.append({**msg, "content": parts})
    return out, sources


class Vision:
    """Everything one model needs to take images: processor settings, the image token ids and the vision
    tower, which loads on the first image (a text-only workload never pays for it)."""

    def __init__(self, model, model_dir: str | Path | None, allowed_local_media_path: str | Path | None = None,
                 max_images: int | None = None, allowed_media_domains=None, processor_kwargs: dict | None = None,
                 cache_bytes: int = ENCODER_CACHE_BYTES, max_file_bytes: int | None = MAX_FILE_BYTES):
        """max_images: images per prompt (vLLM's --limit-mm-per-prompt; None: no limit, 0: text only).
        allowed_media_domains: the hosts http(s) image URLs may name (vLLM's --allowed-media-domains; None:
        any host, an empty list: no URL is fetched). processor_kwargs: defaults over the checkpoint's processor
        settings (vLLM's --mm-processor-kwargs; `PROCESSOR_KWARGS`). cache_bytes: memory for the soft tokens
        of recent images, reused when an image comes again (0: none). max_file_bytes: the size limit of a local
        image file (None: only the pixel limit, for files the user names rather than an API client)."""
        from .images import ImageProcessorConfig, check_against_tower

        if max_images is not None and (not isinstance(max_images, int) or max_images < 0):
            raise ValueError(f"max_images={max_images!r}: expected None or an int >= 0")
        self.model, self.cfg = model, model.cfg
        self.allowed_local_media_path, self.max_images = allowed_local_media_path, max_images
        self.max_file_bytes = max_file_bytes
        self.allowed_media_domains = None if allowed_media_domains is None else \
            frozenset(d.lower().rstrip(".") for d in allowed_media_domains)
        # read only for a model with a vision tower, and image=0 not even then (a text-only checkpoint may
        # carry an unrelated preprocessor_config.json)
        use = model.cfg.has_vision and max_images != 0
        read = use and model_dir is not None and Path(model_dir).is_dir()
        self.processor = ImageProcessorConfig.from_dir(model_dir) if read else ImageProcessorConfig()
        if use:
            tower = model.cfg.raw.get("vision_config")
            check_against_tower(self.processor, tower if isinstance(tower, dict) else {}, model_dir)
        self.processor = self.processor_for(processor_kwargs, "--mm-processor-kwargs")
        self._tower, self._lock = None, threading.Lock()
        # soft tokens of recent images by digest (an API client resends a conversation's images every turn)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.cache_bytes, self._cached, self.cache_hits = cache_bytes, 0, 0

    @property
    def available(self) -> bool:
        """Images can be served: a vision tower in the checkpoint, and not switched off."""
        return bool(self.cfg.has_vision and getattr(self.model, "carried_tensors", None) and self.max_images != 0
                    and not getattr(self.model, "quantized_vision", None))

    def need(self) -> None:
        """ImageError unless this model can read images."""
        if not self.cfg.has_vision:
            raise ImageError("this model has no vision tower (config.json has no vision_config): it takes text only")
        if not getattr(self.model, "carried_tensors", None):
            raise ImageError("this model's checkpoint holds no vision tower weights (model.encoder.vision_tower.*), "
                             "so it cannot read images")
        if getattr(self.model, "quantized_vision", None):  # quant_io: a tower stored FP8 (the text model loads)
            raise ImageError(self.model.quantized_vision)
        if self.cfg.image_token_id is None or not 0 <= self.cfg.image_token_id < self.cfg.vocab_size:
            raise ImageError(f"config.json: image_token_id={self.cfg.image_token_id} is outside the vocabulary")

    def release(self) -> None:
        """Forget the loaded tower (its memory goes back; the next image loads it again)."""
        with self._lock:
            self._tower = None

    def tower(self):
        with self._lock:
            if self._tower is None:
                from .model.vision import load_vision_tower

                w = self.model.embed_weight
                self._tower = load_vision_tower(self.model.carried_tensors, self.cfg.raw, dtype=w.dtype,
                                                device=w.device).eval()
            return self._tower

    def processor_for(self, kwargs: dict | None, field: str = "mm_processor_kwargs"):
        """The processor settings with a request's `mm_processor_kwargs` over them (only the image budget,
        max_soft_tokens: 70, 140, 280, 560 or 1120 soft tokens per image)."""
        if not kwargs:
            return self.processor
        if not isinstance(kwargs, dict):
            raise ImageError(f"{field} must be an object, e.g. {{\"max_soft_tokens\": 560}}")
        unknown = sorted(set(kwargs) - set(PROCESSOR_KWARGS))
        if unknown:
            raise ImageError(f"{field}: {unknown[0]!r} is not supported (only {', '.join(PROCESSOR_KWARGS)})")
        try:
            return dataclasses.replace(self.processor, **kwargs)
        except ValueError as e:
            raise ImageError(f"{field}.{e}") from None

    def load(self, sources, processor=None) -> list:
        """Each source loaded and preprocessed; processor: one for all (None: the server's) or one per source."""
        from .images import load_image, preprocess

        processors = processor if isinstance(processor, list) else [processor or self.processor] * len(sources)
        out = []
        for k, (src, processor) in enumerate(zip(sources, processors)):
            self._check_domain(k, src)
            try:
                img = load_image(src, allowed_local_media_path=self.allowed_local_media_path,
                                 follow_redirects=self.allowed_media_domains is None,
                                 max_file_bytes=self.max_file_bytes)
                out.append(preprocess(img, processor))
            except ValueError as e:
                msg = str(e)
                raise ImageError(f"image {k}: {msg.removeprefix('image: ')}") from None
        return out

    def _check_domain(self, k: int, src) -> None:
        if self.allowed_media_domains is None or not isinstance(src, str):
            return
        text = src.strip()
        if not text[:8].lower().startswith(("http://", "https://")):  # what load_image fetches
            return
        try:
            url = urlparse(text)
        except ValueError as e:  # "Invalid IPv6 URL": an unclosed "["
            from .images import _short

            raise ImageError(f"image {k}: malformed URL {_short(text)!r} ({e})") from None
        host = (url.hostname or "").rstrip(".")
        if host not in self.allowed_media_domains:
            allowed = ", ".join(sorted(self.allowed_media_domains)) or "none"
            raise ImageError(f"image {k}: {url.hostname!r} is not among the allowed media domains ({allowed}; "
                             "--allowed-media-domains)")

    @torch.no_grad()
    def prepare(self, prompt_ids, sources, processor_kwargs: dict | None = None, details=None, *,
                check=None, encode: bool = True) -> tuple[list[int], ImageInputs | None]:
        """(prompt ids with every image expanded, ImageInputs). `prompt_ids` holds one image token per image
        (or each image already expanded to its soft-token count, as `prepare` returns it);
        processor_kwargs: the request's mm_processor_kwargs (`processor_for`); details: per image, OpenAI's
        `detail` ("low": LOW_DETAIL_TOKENS soft tokens, as OpenAI's cheap low-resolution pass; "high", "auto"
        or None: the request's budget). check: called with the expanded ids once the images' soft-token
        counts are known, before the vision tower runs (it may raise: a prompt over the context then costs
        no tower work). encode=False: only count (/tokenize): the ImageInputs has no soft tokens (embeds
        None), only where they go, and the tower never runs."""
        ids = [int(t) for t in prompt_ids]
        if not sources:
            if self.cfg.image_token_id in ids:
                raise ImageError(f"the prompt holds image tokens (id {self.cfg.image_token_id}) but no image was given")
            if check is not None:
                check(ids)
            return ids, None
        self.need()
        if self.max_images is not None and len(sources) > self.max_images:
            raise ImageError(f"{len(sources)} image{'s' if len(sources) != 1 else ''} in one prompt, over the limit "
                             f"of {self.max_images} (--limit-mm-per-prompt)")
        details = checked_details(details, len(sources))
        processor = self.processor_for(processor_kwargs)
        processed = self.load(sources, [for_detail(processor, d) for d in details])
        ids = self._expand(ids, [p.num_soft_tokens for p in processed])
        if check is not None:
            check(ids)
        positions = [i for i, t in enumerate(ids) if t == self.cfg.image_token_id]
        digests = tuple(p.digest for p in processed)
        if not encode:
            return ids, ImageInputs(None, tuple(positions), tuple(image_spans(positions)), digests)

        embeds = torch.cat([self.encode(p) for p in processed])
        if embeds.shape[0] != len(positions):
            raise ImageError(f"the vision tower gave {embeds.shape[0]} soft tokens for {len(positions)} image "
                             "positions")
        return ids, ImageInputs(embeds, tuple(positions), tuple(image_spans(positions)), digests)

    @torch.no_grad()
    def encode(self, processed) -> torch.Tensor:
        """[n, d] soft tokens of one preprocessed image: from the cache when the same image (digest: pixels
        and processor settings) was encoded lately, else from the tower, alone (an image's soft tokens never
        depend on the images next to it, so a cached copy equals a fresh one bit for bit)."""
        w = self.model.embed_weight
        with self._lock:
            hit = self._cache.get(processed.digest)
            if hit is not None:
                self._cache.move_to_end(processed.digest)
                self.cache_hits += 1
                return hit.to(w.device, non_blocking=True)
        from .images import stack

        pixels, pos = stack([processed])
        try:
            tower = self.tower()
            table, side = tower.cfg.position_embedding_size, int(pos.max()) + 1
            if side > table:  # the reference would index past its position table
                raise ImageError(f"the image is {side} patches along one side, over the vision tower's {table} "
                                 "positions; send it less elongated or with a smaller "
                                 "mm_processor_kwargs.max_soft_tokens")
            out = tower(pixels.to(w.device, w.dtype), pos.to(w.device))
        except ImageError:
            raise
        except ValueError as e:  # a tower that cannot load or take these patches: the image fails, not the server
            raise ImageError(f"the vision tower cannot read the image: {e}") from None
        size = out.numel() * out.element_size()
        with self._lock:
            if size <= self.cache_bytes and processed.digest not in self._cache:
                self._cache[processed.digest] = out.to("cpu")  # host memory: the KV cache has the device's
                self._cached += size
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.numel() * old.element_size()
        return out

    def _expand(self, ids: list[int], counts: list[int]) -> list[int]:
        img = self.cfg.image_token_id
        runs = image_spans([i for i, t in enumerate(ids) if t == img])
        if [b - a for a, b in runs] == counts and all(n > 1 for n in counts):
            return ids  # already expanded (e.g. token ids from an earlier `prepare`)
        n = sum(b - a for a, b in runs)
        if n != len(counts):
            raise ImageError(f"the prompt has {n} image placeholder token(s) (id {img}) for {len(counts)} image(s); "
                             "put one image token where each image goes, in order")
        from .images import expand_placeholders

        return expand_placeholders(ids, counts, image_token_id=img, boi_id=self.cfg.boi_token_id,
                                   eoi_id=self.cfg.eoi_token_id)


def encoder_images(rows, B: int, T: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The `image_embeds` and `image_mask` [B, T] of one encoder call, from (batch row, ImageInputs or
    None, first position, end position) per row that encodes prompt positions; (None, None) when no row
    holds an image in its range."""
    mask, parts = None, []
    for b, images, start, end in sorted(rows, key=lambda r: r[0]):  # masked_scatter fills row-major
        if images is None:
            continue
        off, emb = images.rows(start, end)
        if off:
            mask = torch.zeros(B, T, dtype=torch.bool) if mask is None else mask
            mask[b, off] = True
            parts.append(emb)
    if mask is None:
        return None, None
    return torch.cat(parts).to(device), mask.to(device)
