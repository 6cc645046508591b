"""Images in training examples: the frozen vision side of fine-tuning.

An example whose prompt shows images (`data.ImageExample`) holds `TrainImage`s, one per image, shared by
the examples that show it (the assistant turns of one conversation). When the data is loaded, each image
is read and preprocessed exactly as inference does it (`canvaslm.images`, the checkpoint's processor
settings), which fixes its soft-token count, so the example's prompt is stored expanded
(`boi + image_token * n + eoi` per image) and lengths, `max_length` and canvases are the real ones. The
vision tower (loaded from the checkpoint's own tensors, `model.carried_tensors`) is frozen: it is neither
trained nor saved by the trainer (saves copy the checkpoint's vision tensors unchanged), so an image's soft
tokens never change during a run. They are computed once, when the image is loaded, under no_grad in the
model's device and dtype (autocast off), one image per tower call (so they do not depend on which images
share a call: a resumed run gets the same numbers), and kept in host memory, up to `cache_bytes` in all
(`SOFT_TOKEN_CACHE_BYTES`); an image past that budget keeps its source instead and is read, preprocessed and
encoded again each time a batch uses it (same numbers, more work). Each training step then hands the
encoder the batch's soft tokens and where they go (`inputs` -> `objective.make_batch(..., images=...)`).

An image's OpenAI `detail` ("low": `multimodal.LOW_DETAIL_TOKENS` soft tokens) picks its processor budget as
at inference, so an example trains on the prompt `LLM.chat` and the server build for the same message. The
data is the user's own: local files, bytes and PIL images have no byte limit (only the pixel limit, as `LLM`
has for files); data URLs, base64 and fetched URLs keep `images.MAX_BYTES`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..images import load_image, preprocess
from ..multimodal import DETAILS, ImageInputs, Vision, for_detail, image_spans
from .data import DataError, ImageExample

SOFT_TOKEN_CACHE_BYTES = 8 << 30  # host memory for cached soft tokens (a 280-token image of a 2816-wide model: 3 MiB)


class TrainImage:
    """One image of the training data: its soft-token count, and its soft tokens (cached) or its source
    (with its detail, which an uncached image is preprocessed with again)."""

    __slots__ = ("source", "num_soft_tokens", "digest", "soft_tokens", "detail")

    def __init__(self, source, num_soft_tokens: int, digest: str, soft_tokens: torch.Tensor | None,
                 detail: str | None = None):
        self.source, self.num_soft_tokens, self.digest, self.soft_tokens = source, num_soft_tokens, digest, soft_tokens
        self.detail = detail

    def __repr__(self) -> str:
        state = "cached" if self.soft_tokens is not None else "not cached"
        return f"TrainImage({self.num_soft_tokens} soft tokens, {state})"


class TrainVision:
    """The image side of one model for training: processor settings, image token ids, the frozen tower."""

    def __init__(self, model, model_dir: str | Path | None = None, cache_bytes: int = SOFT_TOKEN_CACHE_BYTES):
        self.model, self.cfg = model, model.cfg
        self.model_dir = model_dir
        self._loaded = None  # multimodal.Vision, made on the first image: text-only data never reads its settings
        self.cache_bytes, self.cached_bytes, self.uncached = cache_bytes, 0, 0

    @property
    def _vision(self) -> Vision:
        """The processor settings and the tower, as inference has them."""
        if self._loaded is None:
            self._loaded = Vision(self.model, self.model_dir, cache_bytes=0)  # this class keeps its own
        return self._loaded

    @property
    def processor(self):
        return self._vision.processor

    @staticmethod
    def usable(cfg) -> bool:
        """The config names image, boi and eoi tokens inside its vocabulary (prompts can hold images)."""
        ids = (cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id)
        return bool(cfg.has_vision) and all(i is not None and 0 <= i < cfg.vocab_size for i in ids)

    @property
    def image_token_id(self) -> int:
        return self.cfg.image_token_id

    def release(self) -> None:
        """Drop the tower when every image's soft tokens are cached (it is then not needed again)."""
        if self.uncached == 0 and self._loaded is not None:
            self._loaded.release()

    @staticmethod
    def _decoded(source):
        """The decoded image. Local files, bytes and PIL images are the user's own (trusted, any size: only
        the pixel limit); data URLs, base64 and fetches keep load_image's byte limit."""
        folder = source.resolve().parent if isinstance(source, Path) else None
        return load_image(source.resolve() if folder else source, allowed_local_media_path=folder,
                          max_file_bytes=None)

    def _processed(self, source, detail: str | None = None):
        # a detail's budget as at inference (digests cover the patch grid: they differ where the soft tokens do)
        return preprocess(self._decoded(source), for_detail(self.processor, detail))

    @torch.no_grad()
    def _encode(self, processed) -> torch.Tensor:
        """[num_soft_tokens, hidden] soft tokens of one preprocessed image, on the CPU."""
        self._vision.need()  # an ImageError (a ValueError) naming what is missing
        with torch.autocast(self.model.embed_weight.device.type, enabled=False):
            out = self._vision.encode(processed)
        if out.shape[0] != processed.num_soft_tokens:
            raise ValueError(f"the vision tower gave {out.shape[0]} soft tokens for an image of "
                             f"{processed.num_soft_tokens}")
        return out.cpu()

    def images(self, sources, where: str, details=None) -> list[TrainImage]:
        """Load, preprocess and encode the images of one data row (`where` names it in errors); details: per
        image, its OpenAI detail (None: the processor's budget for all)."""
        out = []
        details = [None] * len(sources) if details is None else list(details)
        for k, (src, detail) in enumerate(zip(sources, details, strict=True)):
            if detail not in DETAILS:
                raise DataError(f"{where}: image {k}: detail {detail!r} is not one of "
                                f"{', '.join(repr(d) for d in DETAILS if d)}")
            try:
                p = self._processed(src, detail)
                tokens = self._encode(p)
            except (ValueError, TypeError) as e:  # images.load_image / preprocess / a checkpoint without a tower
                raise DataError(f"{where}: image {k}: {str(e).removeprefix('image: ')}") from None
            size = tokens.numel() * tokens.element_size()
            keep = self.cached_bytes + size <= self.cache_bytes
            self.cached_bytes += size if keep else 0
            self.uncached += 0 if keep else 1
            out.append(TrainImage(None if keep else src, p.num_soft_tokens, p.digest, tokens if keep else None,
                                  detail))
        return out

    def expand(self, prompt: list[int], images: list[TrainImage], where: str) -> list[int]:
        """The prompt with its i-th image token widened to `boi + image_token * n_i + eoi`."""
        from ..images import expand_placeholders

        img = self.image_token_id
        found = sum(1 for t in prompt if t == img)
        if found != len(images):
            raise DataError(f"{where}: the prompt holds {found} image token(s) (id {img}) for {len(images)} image(s)"
                            + ("; text that names an image needs the image itself" if not images else ""))
        if not images:
            return prompt
        return expand_placeholders(prompt, [im.num_soft_tokens for im in images], image_token_id=img,
                                   boi_id=self.cfg.boi_token_id, eoi_id=self.cfg.eoi_token_id)

    def soft_tokens(self, image: TrainImage) -> torch.Tensor:
        if image.soft_tokens is not None:
            return image.soft_tokens
        return self._encode(self._processed(image.source, image.detail))

    def inputs(self, examples) -> list[ImageInputs | None]:
        """Per example: its ImageInputs (soft tokens and the prompt positions they go to), None without images."""
        out = []
        for i, ex in enumerate(examples):
            if not isinstance(ex, ImageExample):
                out.append(None)
                continue
            positions = [j for j, t in enumerate(ex[0]) if t == self.image_token_id]
            counts = [im.num_soft_tokens for im in ex.images]
            spans = image_spans(positions)
            if [b - a for a, b in spans] != counts:
                raise DataError(f"example {i}: its prompt's image token runs {[b - a for a, b in spans]} do not match "
                                f"its images' soft tokens {counts} (a transform must keep the image tokens)")
            embeds = torch.cat([self.soft_tokens(im) for im in ex.images])
            out.append(ImageInputs(embeds, tuple(positions), tuple(spans), tuple(im.digest for im in ex.images)))
        return out


__all__ = ["TrainVision", "TrainImage", "SOFT_TOKEN_CACHE_BYTES"]
