"""Model and diffusion configuration, read from a checkpoint's `config.json` / `generation_config.json`.

`ModelConfig` holds everything the network needs, with the per-layer values (attention type, head size,
KV heads, RoPE) already derived the way the reference derives them. `DiffusionParams` holds the sampler
defaults. Both are frozen and validated; errors name the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("canvaslm")

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_MODEL_TYPES = ("diffusion_gemma",)
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
# text_config keys we read; anything else is reported once, never silently relied upon.
_KNOWN_TEXT_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "max_position_embeddings", "rms_norm_eps",
    "pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings", "rope_parameters",
    "attention_bias", "attention_dropout", "sliding_window", "layer_types", "final_logit_softcapping",
    "use_bidirectional_attention", "num_experts", "top_k_experts", "moe_intermediate_size",
    "per_layer_config", "global_head_dim", "num_global_key_value_heads", "model_type", "initializer_range",
    "dtype", "torch_dtype", "transformers_version", "architectures", "rope_theta", "rope_scaling",
    "rope_local_base_freq",
    "partial_rotary_factor", "enable_moe_block", "attention_k_eq_v", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "quantization_config", "_name_or_path",
}


TEXT_ACTIVATIONS = ("gelu_pytorch_tanh",)  # what the text MLPs run (GELU, tanh form)
# config.json's num_hidden_layers sizes per-layer lists as it is read: a bound far above any real model's
# depth makes a typo (1e30) a ConfigError, not an OverflowError or a list that fills memory
MAX_LAYERS = 4096


class ConfigError(ValueError):
    """A config file is missing a field, has an impossible value, or names an unsupported model."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str  # "default" | "proportional"
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0  # proportional only: the inverse frequencies are divided by it (position scaling)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]  # per layer
    num_kv_heads: tuple[int, ...]  # per layer
    sliding_window: int
    rope: dict  # layer type -> RopeSpec
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    canvas_length: int = 256
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    final_logit_softcapping: float | None = 30.0
    attention_bias: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_ids: tuple[int, ...] = (1,)
    has_vision: bool = False
    # images: the placeholder token the vision tower's soft tokens replace, the tokens around each image,
    # and whether an image's soft tokens see each other both ways in the encoder ("vision") or causally
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    bidirectional_vision: bool = False
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json as read

    def __post_init__(self):
        def need(cond, name, msg):
            if not cond:
                key = name if name == "canvas_length" else \
                    f"text_config.{'num_hidden_layers' if name == 'num_layers' else name}"
                raise ConfigError(f"config.json: {key} {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                     "num_experts", "top_k_experts", "moe_intermediate_size", "canvas_length",
                     "max_position_embeddings"):
            v = getattr(self, name)
            need(_is_int(v) and v > 0, name, f"must be a positive integer, got {v!r}")
        need(self.hidden_activation in TEXT_ACTIVATIONS, "hidden_activation",
             f"{self.hidden_activation!r} is not supported (the text model runs {TEXT_ACTIVATIONS[0]!r})")
        need(len(self.layer_types) == self.num_layers, "layer_types",
             f"has {len(self.layer_types)} entries but num_hidden_layers is {self.num_layers}")
        for i, t in enumerate(self.layer_types):
            need(t in (SLIDING, FULL), f"layer_types[{i}]", f"must be {SLIDING!r} or {FULL!r}, got {t!r}")
            need(self.head_dims[i] > 0 and self.head_dims[i] % 2 == 0, f"head_dim (layer {i})",
                 f"must be a positive even integer, got {self.head_dims[i]}")
            kv = self.num_kv_heads[i]
            need(kv > 0 and self.num_attention_heads % kv == 0, f"num_key_value_heads (layer {i})",
                 f"must divide num_attention_heads={self.num_attention_heads}, got {kv}")
        need(self.top_k_experts <= self.num_experts, "top_k_experts",
             f"({self.top_k_experts}) must not exceed num_experts ({self.num_experts})")
        need(self.sliding_window >= 2, "sliding_window", f"must be >= 2, got {self.sliding_window}")
        for t in set(self.layer_types):
            need(t in self.rope, "rope_parameters", f"has no entry for layer type {t!r}")
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            need(v is None or _is_int(v), name, f"must be an integer, got {v!r}")
            need(v is None or 0 <= v < self.vocab_size, name, f"({v}) is outside the vocabulary")
        for e in self.eos_token_ids:
            need(_is_int(e), "eos_token_id", f"must hold integers, got {e!r}")
            need(0 <= e < self.vocab_size, "eos_token_id", f"({e}) is outside the vocabulary")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def num_params(self) -> int:
        """Parameter count of the text model (shared encoder/decoder weights counted once)."""
        d, n = self.hidden_size, 0
        for i in range(self.num_layers):
            hd, kv, h = self.head_dims[i], self.num_kv_heads[i], self.num_attention_heads
            n += d * h * hd * 2 + d * kv * hd * (2 if self.is_sliding(i) else 1)
            n += 3 * d * self.intermediate_size
            n += self.num_experts * 3 * d * self.moe_intermediate_size + d * self.num_experts
        return n + self.vocab_size * d + 3 * d * self.intermediate_size

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                              f"(expected one of {list(SUPPORTED_MODEL_TYPES)})")
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing the nested 'text_config' object")
        unknown = sorted(set(text) - _KNOWN_TEXT_KEYS)
        if unknown:
            log.warning("%s: ignoring unknown text_config keys %s", source, unknown)

        def bad(key, value, want):
            raise ConfigError(f"{source}: {key} must be {want}, got {value!r}")

        def req(key):
            if key not in text or text[key] is None:
                raise ConfigError(f"{source}: text_config.{key} is required but missing")
            return text[key]

        def integer(key, value):
            if not _is_int(value) or value <= 0:
                bad(key, value, "a positive integer")
            return value

        def number(key, value):
            if not _is_number(value):
                bad(key, value, "a number")
            return float(value)

        def positive(key, value):
            if not _is_number(value) or not value > 0:
                bad(key, value, "a positive number")
            return float(value)

        def token_id(key, value):
            if value is not None and not _is_int(value):
                bad(key, value, "an integer token id")
            return value

        for where, d in (("tie_word_embeddings", cfg), ("text_config.tie_word_embeddings", text)):
            if d.get("tie_word_embeddings", True) is not True:
                raise ConfigError(f"{source}: {where} is {d['tie_word_embeddings']!r}; only tied word embeddings "
                                  "are supported (the LM head is the embedding matrix: a separate lm_head.weight "
                                  "would be ignored)")
        if text.get("rope_scaling") is not None:
            raise ConfigError(f"{source}: text_config.rope_scaling {text['rope_scaling']!r} is not supported (RoPE "
                              "is set per layer type by text_config.rope_parameters; remove rope_scaling)")
        if text.get("rope_parameters") is None:
            legacy = [k for k in ("rope_theta", "rope_local_base_freq", "partial_rotary_factor")
                      if text.get(k) is not None]
            if legacy:
                raise ConfigError(f"{source}: text_config.{legacy[0]} without text_config.rope_parameters is not "
                                  "supported (it would be ignored, as transformers ignores it for this model); "
                                  "give rope_parameters per layer type ({'sliding_attention': {'rope_type': "
                                  "'default', 'rope_theta': ...}, 'full_attention': {...}})")
        for key, want in (("enable_moe_block", True), ("attention_k_eq_v", True)):
            if key in text and text[key] is not want:
                raise ConfigError(f"{source}: text_config.{key}={text[key]!r} is not supported (DiffusionGemma "
                                  + ("always runs its MoE block" if key == "enable_moe_block" else
                                     "full-attention layers use the keys as values: they have no v_proj") + ")")
        if text.get("attention_bias") is not None and not isinstance(text["attention_bias"], bool):
            bad("text_config.attention_bias", text["attention_bias"], "true or false")
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{source}: text_config.use_bidirectional_attention='all' is not supported "
                              "(DiffusionGemma's encoder is causal)")
        n_layers = integer("text_config.num_hidden_layers", req("num_hidden_layers"))
        if n_layers > MAX_LAYERS:
            bad("text_config.num_hidden_layers", n_layers, f"at most {MAX_LAYERS}")
        layer_types = text.get("layer_types")
        if layer_types is None:
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]
        if not isinstance(layer_types, list):
            bad("text_config.layer_types", layer_types, f"a list of {SLIDING!r} / {FULL!r}")
        for i, t in enumerate(layer_types):
            if t not in (SLIDING, FULL):
                bad(f"text_config.layer_types[{i}]", t, f"{SLIDING!r} or {FULL!r}")
        layer_types = list(layer_types)
        if layer_types and layer_types[-1] != FULL:
            layer_types[-1] = FULL  # the reference forces the last layer to full attention
        hidden_size = integer("text_config.hidden_size", req("hidden_size"))
        n_heads = integer("text_config.num_attention_heads", req("num_attention_heads"))
        base_hd = text.get("head_dim")
        base_hd = hidden_size // n_heads if base_hd is None else integer("text_config.head_dim", base_hd)
        base_kv = integer("text_config.num_key_value_heads", req("num_key_value_heads"))
        head_dims, kv_heads = [base_hd] * n_layers, [base_kv] * n_layers
        per_layer = text.get("per_layer_config")
        if per_layer is None:
            g_hd = text.get("global_head_dim", 512)
            g_kv = text.get("num_global_key_value_heads")
            per_layer = {str(i): {"head_dim": g_hd, **({"num_key_value_heads": g_kv} if g_kv else {})}
                         for i, t in enumerate(layer_types) if t == FULL}
        if not isinstance(per_layer, dict):
            bad("text_config.per_layer_config", per_layer, "an object mapping layer index to overrides")
        for key, over in per_layer.items():
            where = f"text_config.per_layer_config[{key!r}]"
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: text_config.per_layer_config has key {key!r}, "
                                  "not a layer index") from None
            if not 0 <= i < n_layers:
                raise ConfigError(f"{source}: text_config.per_layer_config has layer {key} "
                                  f"but the model has {n_layers} layers")
            if not isinstance(over, dict):
                bad(where, over, "an object (head_dim, num_key_value_heads)")
            other = sorted(str(k) for k in set(over) - {"head_dim", "num_key_value_heads"})
            if other:
                raise ConfigError(f"{source}: {where}.{other[0]} is not supported: a layer may override only "
                                  "head_dim and num_key_value_heads (the rest is set for the whole model)")
            head_dims[i] = integer(f"{where}.head_dim", over.get("head_dim", head_dims[i]))
            kv_heads[i] = integer(f"{where}.num_key_value_heads", over.get("num_key_value_heads", kv_heads[i]))
        for t in sorted(set(layer_types)):  # one RoPE table and cache layout per layer type, as transformers
            layers = [i for i, lt in enumerate(layer_types) if lt == t]
            for name, vals in (("head_dim", head_dims), ("num_key_value_heads", kv_heads)):
                odd = next((i for i in layers if vals[i] != vals[layers[0]]), None)
                if odd is not None:
                    raise ConfigError(f"{source}: text_config.per_layer_config gives {t} layers different "
                                      f"{name} (layer {layers[0]}: {vals[layers[0]]}, layer {odd}: {vals[odd]}); "
                                      f"all layers of one type must share it")
        rope_raw = text.get("rope_parameters") or _DEFAULT_ROPE
        if not isinstance(rope_raw, dict):
            bad("text_config.rope_parameters", rope_raw, "an object mapping layer type to RoPE parameters")
        rope = {}
        for t in sorted(set(layer_types)):
            p = rope_raw.get(t)
            if p is None:
                raise ConfigError(f"{source}: text_config.rope_parameters has no entry for {t!r}")
            where = f"text_config.rope_parameters[{t!r}]"
            if not isinstance(p, dict):
                bad(where, p, "an object (rope_type, rope_theta, ...)")
            rtype = p.get("rope_type", "default")
            if rtype not in ("default", "proportional"):
                raise ConfigError(f"{source}: {where}.rope_type {rtype!r} is not supported (default, proportional)")
            theta = number(f"{where}.rope_theta", p.get("rope_theta", 10_000.0))
            if not 0 < theta < math.inf:
                bad(f"{where}.rope_theta", p.get("rope_theta"), "a finite number > 0")
            prf = number(f"{where}.partial_rotary_factor", p.get("partial_rotary_factor", 1.0))
            if not 0 < prf <= 1:
                bad(f"{where}.partial_rotary_factor", p.get("partial_rotary_factor"), "in (0, 1]")
            if rtype == "default" and prf != 1:
                bad(f"{where}.partial_rotary_factor", p.get("partial_rotary_factor"),
                    "1 with rope_type 'default' (only 'proportional' RoPE rotates part of each head)")
            factor = 1.0
            if rtype == "proportional":
                factor = number(f"{where}.factor", p.get("factor", 1.0))
                if not 0 < factor < math.inf:
                    bad(f"{where}.factor", p.get("factor"), "a finite number > 0")
            read = {"rope_type", "rope_theta", "partial_rotary_factor"}
            if rtype == "proportional":
                read.add("factor")
            unread = sorted(set(p) - read)
            if unread:  # what transformers' RoPE for this rope_type does not read either
                log.warning("%s: %s: ignoring %s (rope_type %r reads only %s)", source, where, unread, rtype,
                            sorted(read))
            rope[t] = RopeSpec(rtype, theta, prf, factor)
        eos = text.get("eos_token_id", 1)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        for e in eos:
            token_id("text_config.eos_token_id", e)
        canvas_length = cfg.get("canvas_length")
        softcap = text.get("final_logit_softcapping", 30.0)
        kw = dict(
            vocab_size=req("vocab_size"), hidden_size=hidden_size,
            intermediate_size=req("intermediate_size"), num_layers=n_layers,
            num_attention_heads=n_heads, layer_types=tuple(layer_types),
            head_dims=tuple(head_dims), num_kv_heads=tuple(kv_heads),
            sliding_window=integer("text_config.sliding_window", req("sliding_window")), rope=rope,
            num_experts=req("num_experts"), top_k_experts=req("top_k_experts"),
            moe_intermediate_size=req("moe_intermediate_size"),
            canvas_length=256 if canvas_length is None else canvas_length,  # checked in __post_init__
            rms_norm_eps=positive("text_config.rms_norm_eps", text.get("rms_norm_eps", 1e-6)),
            hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
            max_position_embeddings=text.get("max_position_embeddings", 131_072),
            final_logit_softcapping=None if softcap is None else number("text_config.final_logit_softcapping",
                                                                          softcap),
            attention_bias=bool(text.get("attention_bias")),
            pad_token_id=token_id("text_config.pad_token_id", text.get("pad_token_id", 0)),
            bos_token_id=token_id("text_config.bos_token_id", text.get("bos_token_id", 2)),
            eos_token_ids=eos, has_vision=cfg.get("vision_config") is not None,
            image_token_id=token_id("image_token_id", cfg.get("image_token_id", 258_880)),
            boi_token_id=token_id("boi_token_id", cfg.get("boi_token_id", 255_999)),
            eoi_token_id=token_id("eoi_token_id", cfg.get("eoi_token_id", 258_882)),
            bidirectional_vision=text.get("use_bidirectional_attention") == "vision", raw=cfg,
        )
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {str(e).removeprefix('config.json: ')}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: bad field type ({e})") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        return cls.from_dict(read_json(path), source=str(path))

    def to_hf_dict(self) -> dict:
        """A config.json that `transformers` reads back as the same model (text part)."""
        cfg = json.loads(json.dumps(self.raw)) if self.raw else {}
        per_layer = {str(i): {"head_dim": self.head_dims[i], "num_key_value_heads": self.num_kv_heads[i]}
                     for i in range(self.num_layers) if self.layer_types[i] == FULL}
        text = cfg.get("text_config", {})
        text.update({
            "model_type": "diffusion_gemma_text", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads[self.layer_types.index(SLIDING)]
            if SLIDING in self.layer_types else self.num_kv_heads[0],
            "head_dim": self.head_dims[self.layer_types.index(SLIDING)]
            if SLIDING in self.layer_types else self.head_dims[0],
            "layer_types": list(self.layer_types), "per_layer_config": per_layer,
            "sliding_window": self.sliding_window, "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts, "moe_intermediate_size": self.moe_intermediate_size,
            "rms_norm_eps": self.rms_norm_eps, "hidden_activation": self.hidden_activation,
            "max_position_embeddings": self.max_position_embeddings, "attention_bias": self.attention_bias,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "tie_word_embeddings": True,
            "rope_parameters": {t: {"rope_type": r.rope_type, "rope_theta": r.theta,
                                    **({"partial_rotary_factor": r.partial_rotary_factor}
                                       if r.rope_type == "proportional" else {}),
                                    **({"factor": r.factor} if r.factor != 1 else {})}
                                for t, r in self.rope.items()},
        })
        if self.final_logit_softcapping != 30.0:
            text["final_logit_softcapping"] = self.final_logit_softcapping
        cfg.update({"model_type": "diffusion_gemma", "text_config": text, "canvas_length": self.canvas_length,
                    "tie_word_embeddings": True, "architectures": ["DiffusionGemmaForBlockDiffusion"]})
        return cfg


@dataclass(frozen=True)
class DiffusionParams:
    """Sampler defaults of a checkpoint (generation_config.json), HF defaults where absent."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] | None = None  # None: use the model config's
    pad_token_id: int | None = None
    # Per-request cuts of each position's distribution (sampling.truncation); off by default. Not read
    # from generation_config.json: the reference sampler has no such cuts.
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0  # 1: no cut
    min_p: float = 0.0  # 0: no cut
    # Per-request penalties on repeats (sampling.penalties); off by default, not read from
    # generation_config.json either.
    frequency_penalty: float = 0.0  # [-2, 2], 0: off
    presence_penalty: float = 0.0  # [-2, 2], 0: off
    repetition_penalty: float = 1.0  # > 0, 1: off
    # A latency budget (seconds; None: none), counted from the request's first denoising step (prompt
    # encoding is not counted, as llama.cpp's t_max_predict_ms): once it is spent, the canvas in progress
    # is committed as its current argmax draft after the step under way, and it is the request's last
    # (a constraint spanning several canvases may then be left unfinished: the server refuses that).
    # Not read from generation_config.json.
    max_time: float | None = None
    # generation_config.json's `max_length` when it gives no max_new_tokens of its own (or transformers'
    # default 256, which transformers then overrides with it): a total, prompt + output, so a request that
    # names no max_new_tokens gets max_length - its prompt's length in place of max_new_tokens
    # (`for_prompt`, which LLM's requests go through); one that names it drops max_length (`replace`).
    # None: max_new_tokens is the budget.
    max_length: int | None = None

    def __post_init__(self):
        def bad(name, msg):
            raise ConfigError(f"generation parameter {name} {msg}, got {getattr(self, name)!r}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            bad("max_new_tokens", "must be a positive integer")
        if not _is_int(self.max_denoising_steps) or self.max_denoising_steps <= 0:
            bad("max_denoising_steps", "must be a positive integer")
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold", "top_p", "min_p"):
            if not _is_number(getattr(self, name)):
                bad(name, "must be a number")
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be finite")
        if not self.entropy_bound > 0:
            bad("entropy_bound", "must be > 0")
        if not (0 <= self.t_min < self.t_max):
            bad("t_max", f"must be greater than t_min ({self.t_min}) and t_min >= 0")
        if not _is_int(self.stability_threshold) or self.stability_threshold < 0:
            bad("stability_threshold", "must be an integer >= 0")
        if not self.confidence_threshold > 0:
            bad("confidence_threshold", "must be > 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0: no cut)")
        for name, bits in (("max_denoising_steps", 31), ("stability_threshold", 63), ("top_k", 63)):
            if getattr(self, name) >= 2**bits:  # the sampler holds it in a tensor (int32 / int64)
                bad(name, f"must be below 2**{bits}")
        from .sampling.schedules import MIN_TEMPERATURE, coldest_temperature
        cold = coldest_temperature(self.t_min, self.t_max, self.max_denoising_steps)
        if cold < MIN_TEMPERATURE:  # t_min itself is never reached: t_max is what sets the coldest step
            bad("t_max", f"gives the last of max_denoising_steps={self.max_denoising_steps} steps (t_min {self.t_min}) "
                         f"a temperature of {cold:.3g}, below {MIN_TEMPERATURE}: the logits divided by it overflow "
                         "float32")
        if not 0 <= self.top_p <= 1:
            bad("top_p", "must be in [0, 1] (1: no cut; 0 keeps only the most likely token)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0: no cut)")
        if self.eos_token_ids is not None and not all(_is_int(e) and e >= 0 for e in self.eos_token_ids):
            bad("eos_token_ids", "must be token ids (integers >= 0)")
        if self.pad_token_id is not None and not (_is_int(self.pad_token_id) and self.pad_token_id >= 0):
            bad("pad_token_id", "must be a token id (an integer >= 0)")
        if self.max_time is not None and (isinstance(self.max_time, bool) or not isinstance(self.max_time, (int, float))
                                          or not 0 < self.max_time < math.inf):
            bad("max_time", "must be a number of seconds > 0 (None: no limit)")
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length <= 0):
            bad("max_length", "must be a positive integer (prompt + output tokens; None: use max_new_tokens)")
        from .sampling.penalties import PenaltyError, Penalties
        try:
            Penalties(self.frequency_penalty, self.presence_penalty, self.repetition_penalty)
        except PenaltyError as e:
            raise ConfigError(f"generation parameter {e}") from None

    @property
    def stability_depth(self) -> int:
        """The argmax history the stop check needs: stability_threshold, at most max_denoising_steps. A canvas's
        check sees at most max_denoising_steps - 1 earlier argmaxes, so a larger threshold is never met, as
        with this depth; a history as deep as the threshold would only cost memory (copied every step)."""
        return min(self.stability_threshold, self.max_denoising_steps)

    @classmethod
    def from_dict(cls, d: dict, source: str = "generation_config.json") -> "DiffusionParams":
        kw: dict[str, Any] = {}
        for k in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                  "confidence_threshold", "pad_token_id"):
            if d.get(k) is not None:
                kw[k] = d[k]
        # transformers: max_length (a total) decides unless max_new_tokens is set to other than its default 256
        if d.get("max_length") is not None and kw.get("max_new_tokens", 256) == 256:
            kw.pop("max_new_tokens", None)
            kw["max_length"] = d["max_length"]
        sc = d.get("sampler_config")
        if sc is not None and not isinstance(sc, dict):
            raise ConfigError(f"{source}: sampler_config must be an object, got {sc!r}")
        if sc is not None and sc.get("entropy_bound") is not None:
            kw["entropy_bound"] = sc["entropy_bound"]
        eos = d.get("eos_token_id")
        if eos is not None:
            kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "DiffusionParams":
        path = Path(model_dir) / "generation_config.json"
        return cls.from_dict(read_json(path), str(path)) if path.exists() else cls()

    def replace(self, **kw) -> "DiffusionParams":
        """A copy with the non-None values of kw; a max_new_tokens given drops max_length."""
        kw = {k: v for k, v in kw.items() if v is not None}
        if "max_new_tokens" in kw:
            kw.setdefault("max_length", None)
        return dataclasses.replace(self, **kw)

    def for_prompt(self, prompt_len: int) -> "DiffusionParams":
        """These parameters for a prompt of `prompt_len` tokens: max_length (prompt + output) made into
        max_new_tokens = max_length - prompt_len, as transformers does; a ConfigError naming max_length when
        the prompt leaves no room. Without max_length: self."""
        if self.max_length is None:
            return self
        room = self.max_length - prompt_len
        if room <= 0:
            raise ConfigError(f"generation config max_length={self.max_length} (prompt + output) leaves no room "
                              f"for output after a prompt of {prompt_len} tokens; set max_new_tokens")
        return dataclasses.replace(self, max_new_tokens=room, max_length=None)

    def to_hf_dict(self) -> dict:
        budget = {"max_length": self.max_length} if self.max_length is not None else \
            {"max_new_tokens": self.max_new_tokens}
        d = {**budget, "max_denoising_steps": self.max_denoising_steps,
             "sampler_config": {"entropy_bound": self.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
             "t_min": self.t_min, "t_max": self.t_max, "stability_threshold": self.stability_threshold,
             "confidence_threshold": self.confidence_threshold}
        if self.eos_token_ids is not None:
            d["eos_token_id"] = list(self.eos_token_ids)
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        return d


def checked_eos_ids(defaults: DiffusionParams, cfg: ModelConfig) -> tuple:
    """The EOS ids a model's requests stop at (the generation config's, else config.json's); a ConfigError
    when the generation config names ids outside the model's vocabulary."""
    named = {"eos_token_id": defaults.eos_token_ids or (), "pad_token_id": () if defaults.pad_token_id is None
             else (defaults.pad_token_id,)}
    for name, ids in named.items():
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ConfigError(f"generation config: {name} {bad} is outside the model's vocabulary "
                              f"[0, {cfg.vocab_size})")
    return tuple(defaults.eos_token_ids or cfg.eos_token_ids)


def read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a directory, no permission
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data
