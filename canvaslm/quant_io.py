"""Quantised weights and checkpoints: which tensors `load_model` quantises or takes as stored
(`LoadHook`), the config.json `quantization_config` it reads (compressed-tensors FP8, our int4 layout)
and the one `save_model` writes for a quantised model."""

from __future__ import annotations

import math
import re

import torch

from .quant import (BLOCK, FP8, QUANTIZATIONS, STRATEGIES, FP8Experts, FP8Linear, QuantError, _fp8_targets,
                    _swap, quantize_fp8)

INT4_METHOD = "canvaslm-int4"  # our own int4 layout (quant_int4): packed uint8 `X` + float32 `X_scale`


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise QuantError(f"config.json: {where} must be a mapping (JSON object), got {type(value).__name__} "
                         f"{value!r}")
    return value


def scheme_from_config(raw: dict) -> dict | None:
    """The weight scheme of a quantised config.json, None if unquantised: {'fmt': 'fp8', 'strategy': ...}
    (compressed-tensors FP8) or {'fmt': 'int4', 'group': G} (what `save_model` writes for int4 models)."""
    text = raw.get("text_config") or {}
    qc, where = raw.get("quantization_config"), "quantization_config"
    if not qc and isinstance(text, dict):
        qc, where = text.get("quantization_config"), "text_config.quantization_config"
    if not qc:
        return None
    qc = _mapping(qc, where)
    method = qc.get("quant_method")
    if method == INT4_METHOD:
        group = qc.get("group_size")
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise QuantError(f"config.json: {where}.group_size must be a positive integer, got {group!r}")
        for key, want in (("bits", 4), ("symmetric", True)):
            if qc.get(key, want) != want or isinstance(qc.get(key, want), bool) != isinstance(want, bool):
                raise QuantError(f"config.json: {where}.{key} {qc[key]!r} is not supported ({INT4_METHOD} stores "
                                 f"symmetric 4-bit weights: {key}={want!r})")
        return {"fmt": "int4", "group": group}
    if method != "compressed-tensors":
        raise QuantError(f"config.json: {where}.quant_method {method!r} is not supported "
                         f"(expected 'compressed-tensors' (FP8) or {INT4_METHOD!r})")
    fmt = qc.get("format")
    if fmt not in (None, "float-quantized", "naive-quantized"):
        raise QuantError(f"config.json: {where}.format {fmt!r} is not supported (FP8 weights: 'float-quantized')")
    # parts of a compressed-tensors scheme that change what the stored tensors mean: refused by name, not
    # met later as tensors the model has no place for
    for key, why in (("kv_cache_scheme", "stored KV-cache scales are not read; --kv-cache-dtype fp8 quantises "
                                         "the cache at run time"),
                     ("transform_config", "weight transforms (rotations) are not applied")):
        if qc.get(key):
            raise QuantError(f"config.json: {where}.{key} is not supported ({why}); got {qc[key]!r}")
    sparsity = qc.get("sparsity_config")
    if sparsity and not (isinstance(sparsity, dict) and sparsity.get("format", "dense") == "dense"):
        raise QuantError(f"config.json: {where}.sparsity_config is not supported (only dense weights); got "
                         f"{sparsity!r}")
    groups = _mapping(qc.get("config_groups") or {}, f"{where}.config_groups")
    if not groups:
        raise QuantError(f"config.json: {where}.config_groups is missing or empty; a compressed-tensors FP8 "
                         "checkpoint names its weights' scheme there (e.g. group_0: {targets: [Linear], weights: "
                         "{num_bits: 8, type: float, strategy: channel}})")
    strategies = set()
    for gname, group in groups.items():
        gwhere = f"{where}.config_groups.{gname}"
        group = _mapping(group, gwhere)
        acts = group.get("input_activations")
        if acts:
            acts = _mapping(acts, f"{gwhere}.input_activations")
            if acts.get("type", "float") != "float" or acts.get("num_bits", 8) != 8 or acts.get("dynamic") is not True:
                raise QuantError(f"config.json: {gwhere}.input_activations {acts!r} is not supported (only dynamic "
                                 "FP8 activations, computed per token at run time: static input scales are not read)")
        if group.get("output_activations"):
            raise QuantError(f"config.json: {gwhere}.output_activations is not supported; got "
                             f"{group['output_activations']!r}")
        if not group.get("weights"):  # else a group quantising only activations would read as FP8 weights
            raise QuantError(f"config.json: {gwhere}.weights is missing; only FP8 weights (with their stored "
                             "scales) are supported")
        w = _mapping(group["weights"], f"{gwhere}.weights")
        for key, want in (("symmetric", True), ("dynamic", False)):
            if w.get(key, want) is not want:
                raise QuantError(f"config.json: {gwhere}.weights.{key}={w[key]!r} is not supported (FP8 weights are "
                                 f"stored with their scales: {key}={want})")
        if w.get("type", "float") != "float" or w.get("num_bits", 8) != 8:
            raise QuantError(f"config.json: {where}.config_groups.{gname}.weights must be 8-bit "
                             f"float (FP8), got type={w.get('type')!r} num_bits={w.get('num_bits')!r}")
        block = w.get("block_structure") or [BLOCK, BLOCK]
        if w.get("strategy") == "block" and (not isinstance(block, list) or block != [BLOCK, BLOCK]):
            raise QuantError(f"config.json: block_structure {w.get('block_structure')} is not supported "
                             f"(expected [{BLOCK}, {BLOCK}])")
        strategy = w.get("strategy", "channel")
        if strategy not in STRATEGIES:
            raise QuantError(f"config.json: {where}.config_groups.{gname}.weights.strategy {strategy!r} is not "
                             f"supported (one of {STRATEGIES})")
        strategies.add(strategy)
    if len(strategies) != 1:
        raise QuantError(f"config.json: FP8 weight strategies {sorted(strategies)} are not supported "
                         f"(one of {STRATEGIES})")
    return {"fmt": "fp8", "strategy": strategies.pop()}


def check_quantization(scheme: dict | None, quantization: str | None):
    """Refuse a `quantization` (load_model's, `canvaslm memory`'s) that is unknown or conflicts with the
    checkpoint's own `scheme` (`scheme_from_config`)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise QuantError(f"quantization {quantization!r} is not supported; expected one of "
                         f"{QUANTIZATIONS} or None")
    if scheme is not None and quantization not in (None, scheme["fmt"]):
        raise QuantError(f"quantization {quantization!r} needs a bf16/fp32 checkpoint; this one is already "
                         f"{scheme['fmt'].upper()}")


# compressed-tensors `ignore` entries for a checkpoint's unquantised vision tower
VISION_IGNORE = ["re:.*vision_tower.*", "re:.*embed_vision.*"]


def quantization_config(model, keeps_vision: bool = False) -> dict | None:
    """The config.json `quantization_config` describing `model`'s quantised modules (None if it has none),
    and so what `load_model` reads back as stored (FP8 experts are per channel whatever the linears'
    strategy: the loader takes their scales as such). `keeps_vision`: the checkpoint also holds the (plain)
    vision tower, which the FP8 config's `ignore` then names so that readers of the config leave it as is."""
    from .quant_int4 import Int4Experts, Int4Linear

    mods = list(model.modules())
    int4 = [m for m in mods if isinstance(m, (Int4Linear, Int4Experts))]
    fp8 = [m for m in mods if isinstance(m, (FP8Linear, FP8Experts))]
    if int4 and fp8:
        raise QuantError("a model mixing FP8 and int4 modules cannot be saved")
    if int4:
        groups = {m.group for m in int4}
        if len(groups) != 1:
            raise QuantError(f"int4 modules with different group sizes {sorted(groups)} cannot be saved")
        return {"quant_method": INT4_METHOD, "group_size": groups.pop(), "bits": 4, "symmetric": True}
    if fp8:
        strategies = {m.strategy for m in fp8 if isinstance(m, FP8Linear)} or {"channel"}
        if len(strategies) != 1:
            raise QuantError(f"FP8 linears with different strategies {sorted(strategies)} cannot be saved")
        strategy = strategies.pop()
        weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
                   **({"block_structure": [BLOCK, BLOCK]} if strategy == "block" else {})}
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
                "ignore": ["lm_head", *(VISION_IGNORE if keeps_vision else [])]}
    return None


def stored_as_is(model) -> set[str]:
    """State-dict names of quantised tensors and their scales: saved without any dtype cast."""
    out = set()
    for name, m in model.named_modules():
        if hasattr(m, "dequantized"):
            out |= {f"{name}.{k}" for k, t in m.state_dict().items() if not k.endswith("bias")}
    return out


def _listed(names: list[str]) -> str:
    """The first of `names`, and how many more (a few of them shown)."""
    listed = ", ".join(names[1:4]) + (", ..." if len(names) > 4 else "")
    return names[0] + (f" (and {len(names) - 1} more: {listed})" if len(names) > 1 else "")


# tensors of the vision tower (not part of the text model: `model/vision.py` loads them as stored)
_VISION = re.compile(r"^model\.encoder\.(vision_tower|embed_vision)\.")


def _stored_modules(model, names: list[str], scheme: dict) -> set[str]:
    """The modules of `model` a pre-quantised checkpoint with these tensor `names` stores quantised (those
    with scales); quantised modules canvaslm cannot run are refused by name here, before any tensor is read.
    A quantised vision tower leaves the text model servable: `model.quantized_vision` says why images are
    not (multimodal.Vision refuses every image with it), so a text-only workload still loads."""
    stored = {n[:-len(".weight_scale")] for n in names if n.endswith(".weight_scale")}
    stored |= {n.rpartition(".")[0] for n in names if n.endswith((".gate_up_proj_scale", ".down_proj_scale"))}
    vision = sorted(n for n in stored if _VISION.match(n))
    model.quantized_vision = (
        f"{_listed([f'{n}.weight_scale' for n in vision])}: the vision tower is stored quantised, but it loads "
        f"only in its float dtype, so this checkpoint takes text only. Quantise with it left out (llm-compressor: "
        f"ignore=['lm_head', {', '.join(repr(v) for v in VISION_IGNORE)}]) or load the bf16 checkpoint with "
        f"--quantization {scheme['fmt']} (the vision tower stays in its float dtype)") if vision else None
    linears, experts = _fp8_targets(model)
    modules = dict(model.named_modules())
    foreign = sorted(n for n in stored if n in modules and n not in set(linears) | set(experts))
    if foreign:
        raise QuantError(f"{_listed(foreign)}: stored quantised ({foreign[0]}.weight_scale is in the "
                         f"checkpoint), but canvaslm quantises only attention, MLP and expert weights: the "
                         f"MoE router stays in the model dtype. Quantise with it left out (llm-compressor: "
                         f"ignore=['lm_head', 're:.*router.*']) or load the bf16 checkpoint with "
                         f"--quantization {scheme['fmt']}")
    return stored


class LoadHook:
    """Prepares a meta-device model for quantised weights and converts each tensor as the loader reads it.

    mode 'quantize': bf16/fp32 tensors of the targets (attention, MLP, experts) are quantised on the fly
    to `fmt` ('fp8', or 'int4': `quant_int4`, group-wise W4A16), the scales appearing as extra tensors;
    mode 'prequantized': FP8 (or, fmt='int4', packed int4) tensors and their scales are taken as stored.
    File names of a compressed-tensors checkpoint (`X.weight_scale`, 3-D `X_scale`) map onto the module
    buffers; an int4 checkpoint uses the same names (`save_model` writes them)."""

    def __init__(self, model, mode: str, strategy: str = "channel", fp8_names: set | None = None,
                 fmt: str = "fp8", group: int = 128):
        from .quant_int4 import Int4Experts, Int4Linear

        self.mode, self.strategy, self.fmt = mode, strategy, fmt
        linears, experts = _fp8_targets(model)
        if fp8_names is not None:  # pre-quantised: exactly the modules the checkpoint stores quantised
            linears = [n for n in linears if n in fp8_names]
            experts = [n for n in experts if n in fp8_names]
        cfg = model.cfg
        linear_cls, experts_cls = (Int4Linear, Int4Experts) if fmt == "int4" else (FP8Linear, FP8Experts)
        with torch.device("meta"):
            for n in linears:
                lin = model.get_submodule(n)
                args = (lin.in_features, lin.out_features, lin.bias is not None)
                _swap(model, n, linear_cls(*args, group if fmt == "int4" else strategy))
            for n in experts:
                args = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
                _swap(model, n, experts_cls(*args, group) if fmt == "int4" else experts_cls(*args))
        self.linears, self.experts = set(linears), set(experts)
        self.scale_shapes = {f"{n}.weight_scale": tuple(model.get_submodule(n).weight_scale.shape) for n in linears}

    @classmethod
    def for_checkpoint(cls, model, list_names, quantization: str | None):
        """None when the checkpoint is unquantised and no quantisation was asked for. list_names() gives
        every tensor name of the checkpoint (read only for pre-quantised checkpoints), or None where they
        are unknown (`canvaslm memory` on a repo id's config.json alone): every target then counts as
        stored quantised, except FP8 experts beside block or per-tensor linears, which a checkpoint that
        loads keeps in the model dtype (`convert` refuses experts with such scales)."""
        scheme = scheme_from_config(model.cfg.raw)
        check_quantization(scheme, quantization)
        if scheme is None:
            return None if quantization is None else cls(model, "quantize", fmt=quantization)
        names = list_names()
        linears, experts = _fp8_targets(model)
        if names is None:
            stored = set(linears)
            if scheme["fmt"] == "int4" or scheme["strategy"] == "channel":
                stored |= set(experts)
        else:
            stored = _stored_modules(model, names, scheme)
        if scheme["fmt"] == "int4":
            return cls(model, "prequantized", fp8_names=stored, fmt="int4", group=scheme["group"])
        return cls(model, "prequantized", scheme["strategy"], stored)

    def keeps_dtype(self, name: str) -> bool:
        """Quantised tensors (FP8, packed int4) and their float32 scales: never cast to the model dtype."""
        mod, _, leaf = name.rpartition(".")
        return (mod in self.linears and leaf in ("weight", "weight_scale")) or \
            (mod in self.experts and leaf in ("gate_up_proj", "down_proj", "gate_up_proj_scale", "down_proj_scale"))

    def convert(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        mod, _, leaf = name.rpartition(".")
        if self.mode == "prequantized":
            if mod in self.linears and leaf == "weight_scale":
                want = self.scale_shapes[name]
                if self.fmt == "fp8" and tuple(t.shape) != want and t.numel() == math.prod(want):
                    t = t.reshape(want)  # compressed-tensors writes a per-tensor scale as (1,), ours is (1, 1)
                return [(name, t.float())]
            if self.fmt == "int4":
                if self.keeps_dtype(name) and not name.endswith("_scale") and t.dtype != torch.uint8:
                    raise QuantError(f"{name}: dtype {t.dtype}, expected uint8 (packed int4) in an int4 checkpoint")
                return [(name, t.float() if name.endswith("_scale") else t)]
            if mod in self.experts and leaf.endswith("_scale"):
                if t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[-1] != 1):
                    raise QuantError(f"{name}: shape {tuple(t.shape)}; FP8 experts need per-channel scales "
                                     "([E, out] or [E, out, 1]), whatever the linears' strategy")
                return [(name, t.float().reshape(t.shape[0], -1))]  # [E, out] (stored [E, out] or [E, out, 1])
            if self.keeps_dtype(name) and t.dtype != FP8:
                raise QuantError(f"{name}: dtype {t.dtype}, expected float8_e4m3fn in an FP8 checkpoint")
            return [(name, t)]
        if self.fmt == "int4":
            from .quant_int4 import quantize_int4

            if (mod in self.linears and leaf == "weight") or \
                    (mod in self.experts and leaf in ("gate_up_proj", "down_proj")):
                q, s = quantize_int4(t)
                return [(name, q), (f"{mod}.weight_scale" if leaf == "weight" else f"{name}_scale", s)]
            return [(name, t)]
        if mod in self.linears and leaf == "weight":
            q, s = quantize_fp8(t, self.strategy)
            return [(name, q), (f"{mod}.weight_scale", s)]
        if mod in self.experts and leaf in ("gate_up_proj", "down_proj"):
            q, s = quantize_fp8(t, "channel")
            return [(name, q), (f"{name}_scale", s.squeeze(-1))]
        return [(name, t)]
