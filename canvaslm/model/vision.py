"""DiffusionGemma's image encoder: the Gemma 4 vision tower and its projection into the text model.

An image arrives as N x P flattened patches (`pixel_values` [N, P, 3 * patch^2], pixels in [0, 1]) with
their grid coordinates (`position_ids` [N, P, 2] as (x, y); (-1, -1) marks a padding patch). Then:

1. Patch embedding: `W_in (2 p - 1)` plus two learned position tables, `T_x[x] + T_y[y]` (zero for padding).
2. L pre/post-normed transformer layers (RMSNorm around attention and around a gated GELU MLP). Attention
   is bidirectional over the valid patches of an image, with RMSNorm on q and k (learned scale) and on v
   (no scale), logit scale 1 and 2-D RoPE: the first half of each head is rotated by x, the second half by y,
   each half with the usual rotate-half RoPE over head_dim / 4 frequencies `theta^(-4i / head_dim)`.
   Linears may clamp their input and output to stored bounds ("clipped linears").
3. Pooling: each k x k block of patches (k = pooling_kernel_size) is averaged into one soft token, in
   row-major order of the pooled grid, then multiplied by sqrt(hidden_size); padding is dropped. With
   `standardize`, tokens become `(t - std_bias) * std_scale`. This part runs in float32.
4. Projection: RMSNorm without scale, then a linear map to the text hidden size.

Parameter names follow the checkpoint with the "model.encoder." prefix removed, so weights load unrenamed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from .layers import RMSNorm, apply_rope

CHECKPOINT_PREFIX = "model.encoder."

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class VisionConfig:
    """The Gemma 4 vision config fields the tower uses; absent fields take the reference defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping) -> VisionConfig:
        known = {f.name for f in fields(cls)} - {"rope_theta", "head_dim"}
        kw = {k: raw[k] for k in known if raw.get(k) is not None}
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision_config: only axial RoPE is supported, got {rope.get('rope_type')!r}")
        kw["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", cls.rope_theta)))
        if "head_dim" in raw:  # an explicit null means hidden_size / heads
            kw["head_dim"] = raw["head_dim"] or kw.get("hidden_size", cls.hidden_size) // kw.get(
                "num_attention_heads", cls.num_attention_heads)
        cfg = cls(**kw)
        if cfg.head_dim % 4:
            raise ValueError(f"vision_config: head_dim must be a multiple of 4 for 2-D RoPE, got {cfg.head_dim}")
        if cfg.hidden_activation not in _ACTIVATIONS:
            raise ValueError(f"vision_config: unsupported hidden_activation {cfg.hidden_activation!r}")
        return cfg


class ClippedLinear(nn.Module):
    """Bias-free linear under `.linear`; with clipping, input and output are clamped to stored bounds."""

    def __init__(self, d_in: int, d_out: int, clip: bool):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.clip = clip
        if clip:
            for name, value in (("input_min", -math.inf), ("input_max", math.inf),
                                ("output_min", -math.inf), ("output_max", math.inf)):
                self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clip:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, cfg.position_embedding_size, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        w = self.input_proj.weight
        h = self.input_proj((2 * (pixels - 0.5)).to(w.dtype))
        p = pos.clamp(min=0)
        table = self.position_embedding_table
        pos_emb = table[0][p[..., 0]] + table[1][p[..., 1]]
        return h + pos_emb.masked_fill(pad[..., None], 0.0)


def rope_2d(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple:
    """cos/sin for the x half and the y half of a head: two ([N, P, head_dim/2] cos, sin) pairs."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, device=pos.device, dtype=torch.float) / half)
    out = []
    for axis in (0, 1):
        freqs = pos[..., axis].float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        out.append((emb.cos().to(dtype), emb.sin().to(dtype)))
    return tuple(out)


def apply_rope_2d(x: torch.Tensor, rope: tuple) -> torch.Tensor:
    """x: [N, P, H, D]; the first D/2 channels rotate with x positions, the rest with y positions."""
    half = x.shape[-1] // 2
    (cx, sx), (cy, sy) = rope
    return torch.cat([apply_rope(x[..., :half], cx, sx), apply_rope(x[..., half:], cy, sy)], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, h, hk, hd, clip = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              cfg.use_clipped_linears)
        self.head_dim, self.gqa = hd, h != hk
        self.q_proj = ClippedLinear(d, h * hd, clip)
        self.k_proj = ClippedLinear(d, hk * hd, clip)
        self.v_proj = ClippedLinear(d, hk * hd, clip)
        self.o_proj = ClippedLinear(h * hd, d, clip)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(hd, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple, mask: torch.Tensor) -> torch.Tensor:
        N, P, _ = x.shape
        shape = (N, P, -1, self.head_dim)
        q = apply_rope_2d(self.q_norm(self.q_proj(x).view(shape)), rope)
        k = apply_rope_2d(self.k_norm(self.k_proj(x).view(shape)), rope)
        v = self.v_norm(self.v_proj(x).view(shape))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=self.gqa)
        return self.o_proj(out.transpose(1, 2).reshape(N, P, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, inner, clip = cfg.hidden_size, cfg.intermediate_size, cfg.use_clipped_linears
        self.gate_proj = ClippedLinear(d, inner, clip)
        self.up_proj = ClippedLinear(d, inner, clip)
        self.down_proj = ClippedLinear(inner, d, clip)
        self.act = _ACTIVATIONS[cfg.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, h: torch.Tensor, rope: tuple, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, h: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        rope = rope_2d(pos, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        mask = valid[:, None, None, :]  # every patch (padding too) attends to the valid patches of its image
        for layer in self.layers:
            h = layer(h, rope, mask)
        return h


def pooling_plan(position_ids: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Pooled cell of each patch ([N, P], k x k blocks in row-major order; None when k == 1) and which
    of the P / k^2 cells hold valid patches ([N, P / k^2] bool): those become soft tokens."""
    if position_ids.dim() != 3 or position_ids.shape[-1] != 2:
        raise ValueError(f"position_ids must be [N, P, 2], got {tuple(position_ids.shape)}")
    pad = (position_ids == -1).all(-1)
    if k == 1:
        return None, ~pad
    N, P, _ = position_ids.shape
    n_cells = P // (k * k)
    if n_cells * k * k != P:
        raise ValueError(f"{P} patches per image cannot be pooled by {k}x{k} blocks: P must be a multiple of {k * k}")
    p = position_ids.clamp(min=0)
    width = p[..., 0].amax(-1, keepdim=True) + 1
    cells = p[..., 0] // k + (width // k) * (p[..., 1] // k)
    if bool((cells[~pad] >= n_cells).any()):
        raise ValueError(f"patch positions fall outside the {n_cells} pooled cells an image of {P} patches has")
    cells = cells.masked_fill(pad, n_cells)  # padding goes to a spare cell that is dropped
    occupied = torch.zeros(N, n_cells + 1, dtype=torch.bool, device=cells.device).scatter_(1, cells, True)
    return cells, occupied[:, :n_cells]


class VisionModel(nn.Module):
    """Patches -> soft tokens [sum of tokens, hidden_size] (float32, before the projection)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoder(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))

    def pool(self, h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Average k x k blocks (in float32, rounded back to h's dtype as the reference does), keep the
        cells with valid patches, scale by sqrt(hidden_size) in float32."""
        k = self.cfg.pooling_kernel_size
        cells, keep = pooling_plan(position_ids, k)
        if cells is None:
            pooled = h
        else:
            N, _, D = h.shape
            sums = torch.zeros(N, keep.shape[1] + 1, D, dtype=torch.float32, device=h.device)
            sums.scatter_add_(1, cells[..., None].expand(-1, -1, D), h.float())
            pooled = (sums[:, :-1] / (k * k)).to(h.dtype)
        return pooled[keep].float() * self.cfg.hidden_size ** 0.5

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        pad = (position_ids == -1).all(-1)
        h = self.patch_embedder(pixel_values, position_ids, pad)
        h = self.encoder(h, position_ids, ~pad)
        tokens = self.pool(h, position_ids)
        if self.cfg.standardize:
            tokens = (tokens - self.std_bias.float()) * self.std_scale.float()
        return tokens.to(h.dtype)


class VisionProjection(nn.Module):
    """RMSNorm without scale, then a linear map into the text model's hidden size."""

    def __init__(self, d_vision: int, d_text: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(d_vision, eps, with_scale=False)
        self.embedding_projection = nn.Linear(d_vision, d_text, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class VisionTower(nn.Module):
    """The image encoder: `vision_tower.*` (Gemma 4 vision model) and `embed_vision.*` (the projection),
    named so that checkpoint keys load after stripping the prefix "model.encoder.".

    The projection's RMSNorm uses the *vision* config's rms_norm_eps, as the reference does;
    `text_rms_norm_eps`, when given, overrides it (leave it None to match the reference).
    """

    def __init__(self, vision_config: Mapping, text_hidden_size: int, text_rms_norm_eps: float | None = None):
        super().__init__()
        self.cfg = VisionConfig.from_dict(vision_config)
        eps = self.cfg.rms_norm_eps if text_rms_norm_eps is None else text_rms_norm_eps
        self.vision_tower = VisionModel(self.cfg)
        self.embed_vision = VisionProjection(self.cfg.hidden_size, text_hidden_size, eps)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, P, 3 * patch^2] in [0, 1] and position_ids [N, P, 2] ((-1, -1) = padding), as the
        Gemma 4 image processor returns them. Returns every image's soft tokens, concatenated in image
        order without padding: [sum of soft_token_counts, text_hidden_size], in the module's dtype."""
        want = 3 * self.cfg.patch_size ** 2
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != want:
            raise ValueError(f"pixel_values must be [N, P, {want}], got {tuple(pixel_values.shape)}")
        if position_ids.shape != (*pixel_values.shape[:2], 2):
            raise ValueError(f"position_ids must be [N, P, 2] = {(*pixel_values.shape[:2], 2)}, "
                             f"got {tuple(position_ids.shape)}")
        position_ids = position_ids.to(device=pixel_values.device, dtype=torch.long)
        return self.embed_vision(self.vision_tower(pixel_values, position_ids))

    @staticmethod
    def soft_token_counts(position_ids: torch.Tensor, pooling_kernel_size: int) -> list[int]:
        """Soft tokens each image yields (its valid patches / k^2 for a processor's output)."""
        return pooling_plan(position_ids, pooling_kernel_size)[1].sum(-1).tolist()


def _check_file(path: Path, names: list[str], expected: dict) -> None:
    for name in names:
        local = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else None
        if local not in expected:
            raise ValueError(f"{path}: tensor {name!r} is not part of the vision tower (unexpected key)")


def load_vision_tower(carried_tensors: Mapping[str, str | Path], raw_config: Mapping, dtype=None,
                      device=None) -> VisionTower:
    """Build the vision tower from checkpoint tensors ({name: safetensors file}) and the checkpoint's whole
    config.json dict. Floating tensors are cast to `dtype` (default: as stored). Raises ValueError naming
    the key (and file) of a missing, unexpected or misshapen tensor."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        from ..checkpoint import parse_dtype  # deferred: checkpoint imports the model package
        dtype = parse_dtype(dtype)
    if not raw_config.get("vision_config"):
        raise ValueError("config has no vision_config: this checkpoint has no vision tower")
    text = raw_config.get("text_config") or {}
    if "hidden_size" not in text:
        raise ValueError("config's text_config has no hidden_size")
    with torch.device("meta"):
        tower = VisionTower(raw_config["vision_config"], text["hidden_size"])
    expected = {n: t.shape for n, t in tower.state_dict().items()}
    missing = sorted(CHECKPOINT_PREFIX + n for n in expected if CHECKPOINT_PREFIX + n not in carried_tensors)
    if missing:
        raise ValueError(f"vision tower tensors missing from the checkpoint: {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    by_file: dict[Path, list[str]] = {}
    for name, path in carried_tensors.items():
        by_file.setdefault(Path(path), []).append(name)
    state = {}
    for path, names in by_file.items():
        _check_file(path, names, expected)
        if not path.is_file():
            raise ValueError(f"{path}: file not found (holds vision tower tensor {names[0]!r})")
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            stored = set(f.keys())
            for name in names:
                if name not in stored:
                    raise ValueError(f"{path}: tensor {name!r} is missing from this file")
                local = name[len(CHECKPOINT_PREFIX):]
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[local]):
                    raise ValueError(f"{path}: tensor {name!r} has shape {shape}, expected "
                                     f"{tuple(expected[local])} from the config")
                t = f.get_tensor(name)
                state[local] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    tower.load_state_dict(state, strict=True, assign=True)
    return tower.requires_grad_(False).eval()


__all__ = ["VisionConfig", "VisionTower", "load_vision_tower", "pooling_plan"]
