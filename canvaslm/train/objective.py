"""The DiffusionGemma fine-tuning objective (Google's public SFT recipe) and the AR baseline's pieces.

One training example is (prompt_ids, response_ids). The response is split into canvases of
`canvas_length`; the last partial canvas is filled with EOS (supervised), rows are right-padded beyond
their last canvas (not supervised). Per example: t ~ U[1e-4, 1-1e-4], one valid canvas chosen uniformly,
each of its tokens kept with probability 1-t and otherwise replaced by a uniform random vocabulary token.

One encoder pass over the whole clean sequence writes a full-window KV cache (gradients flow through
the writes); the decoder then denoises the noisy selected canvas at its true positions, and because the
decoder hides cached keys at or after `canvas_start` it sees the prompt and earlier clean canvases only,
never a later canvas. Self-conditioning: a first decoder pass under no_grad, then per example with
probability `sc_prob` the second pass gets those logits, otherwise a zero signal (sc_mask False -> zero
soft embeddings, exactly inference's first step). Loss = diffusion_weight * CE(second pass, clean canvas)
+ ar_weight * encoder next-token CE over the valid clean sequence. Both terms are averaged per example
then over the batch, so the loss of a batch is the mean of its examples' losses: data-parallel ranks
and gradient-accumulation micro-batches of equal size average to exactly the combined batch's loss.

Images (`make_batch(..., images=...)`, from `vision.TrainVision.inputs`): the prompt holds each image
expanded (boi + image_token * n + eoi); the encoder pass puts the image's soft tokens (from the frozen
vision tower, constant) at its image-token positions, and the next-token CE leaves out the targets that
are image tokens (placeholders for soft tokens, nothing to predict); boi and eoi stay supervised like any
prompt token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..kv_cache import KVCache
from ..quant import is_quantized

T_EPS = 1e-4  # t ~ U[T_EPS, 1 - T_EPS]


@dataclass(frozen=True)
class TrainBatch:
    """Right-padded clean sequences: prompt at positions 0..P-1, canvas k at P + k*C ... P + (k+1)*C - 1."""

    tokens: torch.Tensor  # [B, L] long, pad beyond each row's end
    positions: torch.Tensor  # [B, L] long, -1 = padding
    prompt_lens: torch.Tensor  # [B] long
    num_canvases: torch.Tensor  # [B] long, >= 1
    canvas_length: int
    noise_seeds: torch.Tensor | None = None  # [B] long: per-example RNG seeds (DDP-invariant draws)
    image_embeds: torch.Tensor | None = None  # [n, d] the images' soft tokens, in image_mask's row-major order
    image_mask: torch.Tensor | None = None  # [B, L] bool: the image-token positions they replace

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        """Valid (non-padding) tokens in the clean sequences."""
        return int((self.positions >= 0).sum())

    def to(self, device) -> "TrainBatch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, tokens=mv(self.tokens), positions=mv(self.positions),
                                   prompt_lens=mv(self.prompt_lens), num_canvases=mv(self.num_canvases),
                                   image_embeds=mv(self.image_embeds), image_mask=mv(self.image_mask))

    def with_noise_seeds(self, seeds: torch.Tensor | Sequence[int]) -> "TrainBatch":
        seeds = torch.as_tensor(seeds, dtype=torch.long).cpu()
        if seeds.shape != (self.batch_size,):
            raise ValueError(f"noise_seeds must have shape ({self.batch_size},), got {tuple(seeds.shape)}")
        return dataclasses.replace(self, noise_seeds=seeds)

    @property
    def image_args(self) -> dict:
        """The encoder's image arguments (empty without images)."""
        return {} if self.image_mask is None else {"image_embeds": self.image_embeds, "image_mask": self.image_mask}


def _eos_set(eos_id) -> tuple[int, ...]:
    return (int(eos_id),) if isinstance(eos_id, int) else tuple(int(e) for e in eos_id)


def canvases_of(response: Sequence[int], canvas_length: int, eos_id) -> int:
    """How many canvases make_batch gives a response: with an EOS appended unless it ends in one."""
    n = len(response) + (0 if response and int(response[-1]) in _eos_set(eos_id) else 1)
    return math.ceil(n / canvas_length)


def make_batch(examples: list[tuple[list[int], list[int]]], canvas_length: int, pad_id: int, eos_id,
               device=None, noise_seeds: Sequence[int] | None = None, images: Sequence | None = None) -> TrainBatch:
    """Build a TrainBatch from (prompt_ids, response_ids) pairs.

    A response that does not already end in EOS gets one appended (so a response that fills its last
    canvas exactly still teaches the model to stop: the EOS then opens a new canvas of EOS fill). The last
    partial canvas is filled with EOS. eos_id: one id, or several (the first is used to append and fill).
    images: per example a multimodal.ImageInputs (its soft tokens and their prompt positions) or None;
    needed when an example is a data.ImageExample (`vision.TrainVision.inputs(examples)`).
    """
    if not examples:
        raise ValueError("make_batch: examples is empty; at least one (prompt_ids, response_ids) is needed")
    if canvas_length < 1:
        raise ValueError(f"make_batch: canvas_length must be >= 1, got {canvas_length}")
    if images is None and any(getattr(ex, "images", None) for ex in examples):
        raise ValueError("make_batch: an example shows images; pass images=TrainVision.inputs(examples) (without "
                         "them the encoder would read the placeholders' embeddings)")
    if images is not None and len(images) != len(examples):
        raise ValueError(f"make_batch: {len(images)} image inputs for {len(examples)} examples")
    eos = _eos_set(eos_id)
    rows, prompt_lens, n_canvases = [], [], []
    for i, (prompt, response) in enumerate(examples):
        prompt, response = [int(t) for t in prompt], [int(t) for t in response]
        if not prompt:
            raise ValueError(f"make_batch: example {i} has an empty prompt; at least one token is needed")
        n = canvases_of(response, canvas_length, eos)
        if not response or response[-1] not in eos:
            response.append(eos[0])
        response += [eos[0]] * (n * canvas_length - len(response))
        rows.append(prompt + response)
        prompt_lens.append(len(prompt))
        n_canvases.append(n)
    L = max(len(r) for r in rows)
    tokens = torch.full((len(rows), L), pad_id, dtype=torch.long)
    positions = torch.full((len(rows), L), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
        positions[b, :len(r)] = torch.arange(len(r))
    embeds, mask = None, None
    if images is not None:
        for b, inp in enumerate(images):
            if inp is not None and (not inp.positions or inp.positions[-1] >= prompt_lens[b]):
                raise ValueError(f"make_batch: example {b}'s image positions are not inside its prompt")
        from ..multimodal import encoder_images
        embeds, mask = encoder_images([(b, inp, 0, L) for b, inp in enumerate(images)], len(rows), L, "cpu")
    batch = TrainBatch(tokens, positions, torch.tensor(prompt_lens), torch.tensor(n_canvases), canvas_length,
                       image_embeds=embeds, image_mask=mask)
    if noise_seeds is not None:
        batch = batch.with_noise_seeds(noise_seeds)
    return batch.to(device) if device is not None else batch


def example_noise_seed(seed: int, step: int, example_index: int) -> int:
    """A 63-bit seed for one example's noise, from (run seed, optimizer step, global example index)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + example_index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


@dataclass
class NoiseDraw:
    """Everything random about one objective evaluation (per example)."""

    t: torch.Tensor  # [B] float32 in [T_EPS, 1 - T_EPS]
    canvas_index: torch.Tensor  # [B] long, in [0, num_canvases)
    replace: torch.Tensor  # [B, C] bool: position replaced by a random token
    random_tokens: torch.Tensor  # [B, C] long
    sc_taken: torch.Tensor  # [B] bool: second pass self-conditions on the first pass's logits


def draw_noise(batch: TrainBatch, generator: torch.Generator | None, vocab_size: int, sc_prob: float,
               device=None) -> NoiseDraw:
    """Draw t, canvas, corruption and SC coin per example: from batch.noise_seeds when set (one CPU
    generator per example, so an example's draws do not depend on its batch), else from `generator`."""
    B, C = batch.batch_size, batch.canvas_length
    device = device if device is not None else batch.tokens.device
    if batch.noise_seeds is not None:
        parts = []
        for s in batch.noise_seeds.tolist():
            g = torch.Generator().manual_seed(int(s))
            parts.append((torch.rand(3, generator=g), torch.rand(C, generator=g),
                          torch.randint(0, vocab_size, (C,), generator=g)))
        u = torch.stack([p[0] for p in parts])  # [B, 3]
        u_keep = torch.stack([p[1] for p in parts])  # [B, C]
        rand_tok = torch.stack([p[2] for p in parts])  # [B, C]
    else:
        if generator is None:
            raise ValueError("draw_noise: pass a generator or a batch with noise_seeds")
        gd = generator.device
        u = torch.rand(B, 3, generator=generator, device=gd)
        u_keep = torch.rand(B, C, generator=generator, device=gd)
        rand_tok = torch.randint(0, vocab_size, (B, C), generator=generator, device=gd)
    u, u_keep, rand_tok = u.to(device), u_keep.to(device), rand_tok.to(device)
    t = T_EPS + (1 - 2 * T_EPS) * u[:, 0]
    n = batch.num_canvases.to(device)
    k = torch.minimum((u[:, 1] * n).long(), n - 1)
    return NoiseDraw(t=t, canvas_index=k, replace=u_keep < t[:, None], random_tokens=rand_tok,
                     sc_taken=u[:, 2] < sc_prob)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    diffusion_loss: torch.Tensor  # scalar (0 in ar_only mode)
    ar_loss: torch.Tensor  # scalar (0 when ar_weight == 0 and not ar_only)
    num_tokens: int  # valid clean tokens in the batch
    sc_taken: torch.Tensor  # [B] bool
    t: torch.Tensor  # [B]
    canvas_index: torch.Tensor  # [B]
    noisy_canvas: torch.Tensor | None = None  # [B, C] what the decoder saw
    per_example_diffusion: torch.Tensor | None = None  # [B]


def selected_canvas(batch: TrainBatch, canvas_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean canvas tokens [B, C], canvas_start positions [B]) of each row's selected canvas."""
    C = batch.canvas_length
    start = batch.prompt_lens.to(canvas_index.device) + canvas_index * C  # [B]
    cols = start[:, None] + torch.arange(C, device=start.device)  # [B, C]; position == column index
    return batch.tokens.gather(1, cols.to(batch.tokens.device)), start


# the float32 logits one chunk of token_ce may hold (x ~3 with the softcap and log-softmax it makes)
CE_CHUNK_BYTES = 64 << 20


def _ce_rows(model, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.logits(hidden), target, reduction="none")


def token_ce(model, hidden: torch.Tensor, target: torch.Tensor, rows_per_chunk: int | None = None) -> torch.Tensor:
    """Cross-entropy of the LM head's logits of `hidden` [..., d] against `target` [...], per token (float32,
    target's shape), never holding the float32 [tokens, vocab] logits: a chunk of rows at a time, each
    chunk's logits recomputed in the backward instead of kept (with a 262k vocabulary the whole logits of
    a sequence of 1k tokens are 1 GiB, times three with the softcap and the log-softmax). rows_per_chunk:
    None = as many as CE_CHUNK_BYTES of logits; 0 = all rows at once, kept for the backward."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    n = flat_t.shape[0]
    if rows_per_chunk is None:
        rows_per_chunk = max(1, CE_CHUNK_BYTES // (4 * model.cfg.vocab_size))
    if rows_per_chunk == 0 or rows_per_chunk >= n:
        return _ce_rows(model, flat_h, flat_t).view(target.shape)
    recompute = torch.is_grad_enabled() and flat_h.requires_grad
    out = []
    for i in range(0, n, rows_per_chunk):
        h, t = flat_h[i:i + rows_per_chunk], flat_t[i:i + rows_per_chunk]
        out.append(checkpoint(_ce_rows, model, h, t, use_reentrant=False) if recompute else _ce_rows(model, h, t))
    return torch.cat(out).view(target.shape)


def encoder_ar_loss(model, hidden: torch.Tensor, batch: TrainBatch, rows_per_chunk: int | None = None) -> torch.Tensor:
    """Next-token CE of the encoder over valid clean tokens, per-example mean, then batch mean. Targets that
    are image tokens (the positions of batch.image_mask) are left out."""
    ce = token_ce(model, hidden[:, :-1], batch.tokens[:, 1:], rows_per_chunk)  # [B, L-1]
    valid = batch.positions[:, 1:] >= 0  # [B, L-1]
    if batch.image_mask is not None:
        valid = valid & ~batch.image_mask[:, 1:]
    valid = valid.float()
    per_example = (ce * valid).sum(1) / valid.sum(1).clamp(min=1)
    return per_example.mean()


def block_diffusion_loss(model, batch: TrainBatch, generator: torch.Generator | None, sc_prob: float = 0.5,
                         diffusion_weight: float = 1.0, ar_weight: float = 1.0, ar_only: bool = False,
                         noise: NoiseDraw | None = None, sc_passes: int = 1,
                         ce_rows_per_chunk: int | None = None) -> LossOutput:
    """The training loss of one batch (see the module docstring). `noise` overrides the draws (tests).
    ce_rows_per_chunk: how `token_ce` chunks both cross-entropies (None: by CE_CHUNK_BYTES; 0: unchunked).

    sc_passes > 1 (not in the reference recipe, which is sc_passes = 1) chains that many no-grad passes
    before the loss pass, each self-conditioned on the previous one's logits, as the inference loop
    does from step to step: the model is then trained to improve on its own earlier beliefs."""
    if not isinstance(sc_passes, int) or sc_passes < 1:
        raise ValueError(f"sc_passes must be a positive integer, got {sc_passes!r}")
    device = model.embed_weight.device
    batch = batch.to(device)
    B, V = batch.batch_size, model.cfg.vocab_size
    zero = torch.zeros((), device=device)
    if ar_only:
        hidden = model.encode(batch.tokens, batch.positions, torch.arange(B, device=device), None, **batch.image_args)
        ar = encoder_ar_loss(model, hidden, batch, ce_rows_per_chunk)
        empty = torch.zeros(B, device=device)
        return LossOutput(ar, zero, ar, batch.num_tokens, empty.bool(), empty, empty.long())
    noise = noise if noise is not None else draw_noise(batch, generator, V, sc_prob, device)
    clean, start = selected_canvas(batch, noise.canvas_index)  # [B, C], [B]
    noisy = torch.where(noise.replace, noise.random_tokens, clean)  # [B, C]

    slots = torch.arange(B, device=device)
    cache = KVCache(model.cfg, B, batch.tokens.shape[1], dtype=model.embed_weight.dtype, device=device,
                    keep_full_window=True)  # fresh per step: it carries this step's autograd graph
    hidden = model.encode(batch.tokens, batch.positions, slots, cache, fresh=True, **batch.image_args)  # [B, L, d]
    first = None  # [B, C, V] logits of the last no-grad pass; the first pass has no self-conditioning
    with torch.no_grad():
        for _ in range(sc_passes):
            first = model.denoise(noisy, slots, cache, canvas_start=start,
                                  sc_logits=None if first is None else first.to(model.embed_weight.dtype))
    out = model.denoise(noisy, slots, cache, sc_logits=first.to(model.embed_weight.dtype),
                        sc_mask=noise.sc_taken, canvas_start=start, return_hidden=True)  # [B, C, d]
    ce = token_ce(model, out, clean, ce_rows_per_chunk)  # [B, C]
    per_example = ce.mean(1)  # every canvas position is supervised (EOS fill included)
    diffusion = per_example.mean()
    ar = encoder_ar_loss(model, hidden, batch, ce_rows_per_chunk) if ar_weight != 0 else zero
    loss = diffusion_weight * diffusion + (ar_weight * ar if ar_weight != 0 else 0.0)
    return LossOutput(loss, diffusion, ar, batch.num_tokens, noise.sc_taken, noise.t, noise.canvas_index,
                      noisy, per_example.detach())


def set_trainable(model, freeze_router: bool = True) -> list[str]:
    """requires_grad True on every parameter except (by default) the MoE routers; returns frozen names."""
    frozen = []
    for name, p in model.named_parameters():
        if is_quantized(p):
            raise ValueError(f"{name} holds quantised weights ({p.dtype}), which full fine-tuning cannot "
                             "update: train LoRA adapters on it (lora: {...}), or start from a float checkpoint")
        trainable = not (freeze_router and ".router." in name)
        p.requires_grad_(trainable)
        if not trainable:
            frozen.append(name)
    return frozen


@torch.no_grad()
def greedy_ar_generate(model, prompt_ids, max_new_tokens: int, eos_ids) -> list:
    """The autoregressive baseline: the encoder as a causal LM, greedy, one token at a time via the KV
    cache. prompt_ids: one prompt (list[int]) -> list[int], or a list of prompts -> list of lists. Each
    output stops after (and includes) its first EOS."""
    single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], int)
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if not prompts:  # no prompts: no outputs (an empty prompt, [[]], is an error below)
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_ar_generate: empty prompt; at least one token is needed")
    eos = set(_eos_set(eos_ids))
    device = model.embed_weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    cache = KVCache(model.cfg, B, P + max_new_tokens, dtype=model.embed_weight.dtype, device=device)
    slots = torch.arange(B, device=device)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    positions = torch.full((B, P), -1, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p, device=device)
        positions[b, :len(p)] = torch.arange(len(p), device=device)
    hidden = model.encode(tokens, positions, slots, cache, fresh=True)  # [B, P, d]
    last = hidden[torch.arange(B, device=device), lens - 1]  # [B, d]
    outs, done = [[] for _ in range(B)], [False] * B
    for i in range(max_new_tokens):
        nxt = model.logits(last).argmax(-1)  # [B]
        for b, tok in enumerate(nxt.tolist()):
            if not done[b]:
                outs[b].append(tok)
                done[b] = tok in eos
        if all(done) or i == max_new_tokens - 1:
            break
        last = model.encode(nxt[:, None], (lens + i)[:, None], slots, cache)[:, 0]
    return outs[0] if single else outs


__all__ = ["TrainBatch", "make_batch", "block_diffusion_loss", "LossOutput", "NoiseDraw", "draw_noise",
           "example_noise_seed", "greedy_ar_generate", "set_trainable", "encoder_ar_loss", "selected_canvas",
           "token_ce", "canvases_of"]
