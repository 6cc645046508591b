"""Serving LoRA adapters on one base model: requests pick an adapter, and rows of different adapters
share every decoder and encoder step (vLLM's multi-LoRA, `--lora-modules NAME=DIR`).

Adapters are PEFT directories (`adapter_config.json` + `adapter_model.safetensors`, the format
`peft` writes and `canvaslm export --adapter` writes for our trainer's LoRA runs; or `adapter_model.bin`,
what `peft` writes with `safe_serialization=False`, read with `weights_only`): for each adapted
projection, `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r], scaled by
lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`). Module paths are `transformers`' names. There
the encoder runs the decoder's layers through modules of its own (`model.encoder.language_model.
layers.N...`, sharing the weights), so `peft` adapts the two modes separately: an adapter may hold
encoder-mode and decoder-mode weights for one projection, and each applies only in its mode, as in
`transformers` (tested side by side with `peft`). Our trainer adapts the shared projections, so its
adapters are written for both modes.

`install` wraps every projection that some adapter adapts in a `ServedLoRALinear`. It holds the
adapters stacked, [N + 1, R, in] and [N + 1, out, R] (entry 0 is all zeros: the base model; ranks are
zero-padded to the largest; the scale is folded into B), and adds x A_a^T B_a^T for each row's adapter
a with two batched matmuls. In the engine's steps (`MultiLoRA.by_slot`) the adapter of a row comes
from a per-KV-slot table on the device (`MultiLoRA.slot_adapter`, set by the engine when a request
takes a slot), gathered by the model's `encode` / `denoise` from the `slots` they are given, so a step
needs no host sync and a captured CUDA graph replays it as is. Any other forward runs the base model
unless `MultiLoRA.using` names adapters (an id for all rows, or one per row: scoring on the engine
thread, `LLM.generate`). A base row adds exact zeros, so its output is bit for bit the base model's.
Experts (MoE) take no served adapter: an adapter that targets them is refused by name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .hub import ADAPTER_WEIGHTS, is_repo_id, resolve_adapter

CONFIG_FILE = "adapter_config.json"
# adapter_model.safetensors, else adapter_model.bin (peft's save_pretrained(safe_serialization=False))
WEIGHTS_FILE, BIN_FILE = ADAPTER_WEIGHTS
# peft inits that also change the base weights (residual of an SVD, quantized): unless saved converted
# (save_pretrained(path_initial_model_for_weight_conversion=...), which writes init_lora_weights true), such an
# adapter is only right on that changed base, not on the model it is served on
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
LORA_FORMS = "{name: dir}, or a list of (name, dir) pairs, Adapter objects or 'NAME=DIR' strings"
PREFIX = "base_model.model."
DECODER_LAYERS = "model.decoder.layers."
ENCODER_LAYERS = "model.encoder.language_model.layers."  # transformers' encoder-mode modules of the same layers
MODES = ("encode", "decode")
SERVED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # projections of [B, T, d] rows


def target(path: str) -> tuple[str, str]:
    """A `transformers` module path -> (our module, the mode it applies in)."""
    if path.startswith(ENCODER_LAYERS):
        return DECODER_LAYERS + path[len(ENCODER_LAYERS):], "encode"
    return path, "decode"


def both_modes(weights: dict) -> dict:
    """{our module path: (A, B)} of adapters on the shared projections (our trainer's) -> the same under
    `transformers` paths for both modes (the self-conditioning MLP runs in the decoder only)."""
    out = {}
    for path, ab in weights.items():
        out[path] = ab
        if path.startswith(DECODER_LAYERS):
            out[ENCODER_LAYERS + path[len(DECODER_LAYERS):]] = ab
    return out


class AdapterError(ValueError):
    """An adapter directory cannot be read or does not fit the model; the message names file and key."""


@dataclass
class Adapter:
    name: str
    path: Path
    rank: int
    scale: float
    weights: dict  # module path -> (A [r, in], B [out, r]) float32

    @property
    def modules(self) -> list:
        return sorted(self.weights)


def weights_path(d: Path) -> Path | None:
    """An adapter directory's weights file: the safetensors one, else the .bin one, else None."""
    return next((d / f for f in (WEIGHTS_FILE, BIN_FILE) if (d / f).is_file()), None)


def _load_weights(w_path: Path) -> dict:
    """{key: tensor} of a safetensors file, or of a torch .bin one (`weights_only`: tensors, never code)."""
    try:
        if w_path.name == BIN_FILE:
            tensors = torch.load(w_path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(w_path))
    except Exception as e:  # noqa: BLE001 - safetensors and torch.load raise their own error types for damaged files
        raise AdapterError(f"{w_path}: cannot read ({e})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterError(f"{w_path}: expected a dict of tensors, got a {type(tensors).__name__}")
    return tensors


def _check_config(cfg_path: Path, cfg: dict) -> None:
    """Refuse, by key, the peft options the served LoRA does not compute."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not served; only LORA is")
    for key, ok in (("use_dora", False), ("bias", "none"), ("lora_bias", False)):
        if cfg.get(key, ok) not in (ok, None):
            raise AdapterError(f"{cfg_path}: {key}={cfg[key]!r} is not served (LoRA without it only)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{cfg_path}: init_lora_weights={init!r} also changes the base weights, so the adapter "
                           "is right only on that changed base; save it converted (peft's save_pretrained("
                           "path_initial_model_for_weight_conversion=...)) or merge it into a checkpoint instead")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{cfg_path}: modules_to_save {cfg['modules_to_save']} is not served (it replaces "
                           "whole modules); merge the adapter into a checkpoint instead")
    for key, what in (("alpha_pattern", "a lora_alpha per module"), ("rank_pattern", "a rank per module"),
                      ("alora_invocation_tokens", "activated LoRA, on only after its invocation tokens"),
                      ("target_parameters", "adapters on parameters, such as the MoE experts'")):
        if cfg.get(key):
            raise AdapterError(f"{cfg_path}: {key} ({what}) is not served (one rank and lora_alpha for all "
                               "modules only); merge the adapter into a checkpoint instead")


def read_adapter(path, name: str | None = None) -> Adapter:
    """A PEFT LoRA adapter directory (or a Hub repo id of one, through the HF cache) -> Adapter (AdapterError
    naming the file and key on bad input)."""
    d = Path(path)
    if not d.is_dir() and is_repo_id(str(path)):  # an adapter repo on the Hugging Face Hub (canvaslm.hub)
        try:
            d = resolve_adapter(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise AdapterError(str(e)) from None
    cfg_path, w_path = d / CONFIG_FILE, weights_path(d)
    if not cfg_path.is_file() or w_path is None:
        raise AdapterError(f"{d}: a LoRA adapter directory needs {CONFIG_FILE} and {WEIGHTS_FILE} (or {BIN_FILE})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    _check_config(cfg_path, cfg)
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    # Python's json reads NaN and Infinity: such a scale would make every adapted row NaN
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        raise AdapterError(f"{cfg_path}: lora_alpha must be a finite positive number, got {alpha!r}")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    parts: dict = {}
    for key, t in _load_weights(w_path).items():
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterError(f"{w_path}: key {key!r} is not a LoRA weight "
                               f"({PREFIX}<module>.lora_A.weight / lora_B.weight)")
        module, which = key[len(PREFIX):-len(".lora_A.weight")], key[-len("A.weight")]
        if t.dim() != 2 or module.removesuffix(".base_layer").endswith("experts"):
            raise AdapterError(f"{w_path}: {key} has shape {tuple(t.shape)}; expected 2-D (experts take no "
                               "served adapter)")
        t = t.float()
        if not torch.isfinite(t).all():  # NaN, or an overflow (a half-precision save of too large values)
            raise AdapterError(f"{w_path}: {key} holds non-finite values (NaN or infinity)")
        parts.setdefault(module, {})[which] = t
    weights = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{w_path}: {module} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(f"{w_path}: {module} has rank {a.shape[0]} x {b.shape[1]}, but {CONFIG_FILE} "
                               f"says r={r}")
        weights[module] = (a, b)
    if not weights:
        raise AdapterError(f"{w_path}: holds no LoRA weights")
    return Adapter(name or d.name, d, r, float(scale), weights)


def write_adapter(out_dir, weights: dict, rank: int, alpha: float, base_model: str | None = None,
                  shared: bool = True, dropout: float = 0.0) -> Path:
    """Write {module path: (A [r, in], B [out, r])} as a PEFT LoRA adapter directory, atomically. shared:
    the paths are our modules, adapted in both modes (`both_modes`); else `transformers` paths as given.
    dropout: the run's LoRA dropout (peft uses it when training goes on from the adapter)."""
    weights = both_modes(weights) if shared else weights
    import tempfile

    from safetensors.torch import save_file

    from .checkpoint import write_dir_atomically

    tensors = {}
    for module, (a, b) in sorted(weights.items()):
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.detach().float().cpu().clone()  # both modes: own copies
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.detach().float().cpu().clone()
    # the exact modules as one pattern (peft full-matches a string): leaf names alone would also catch
    # same-named projections elsewhere in transformers' model (the vision tower's)
    targets = "^(" + "|".join(re.escape(m) for m in sorted(weights)) + ")$"
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
              "bias": "none", "use_rslora": False, "use_dora": False, "lora_dropout": dropout,
              "base_model_name_or_path": base_model, "task_type": None}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, str(Path(tmp) / WEIGHTS_FILE))
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return write_dir_atomically(out_dir, {WEIGHTS_FILE: Path(tmp) / WEIGHTS_FILE,
                                              CONFIG_FILE: Path(tmp) / CONFIG_FILE})


class MultiLoRA:
    """The served adapters of one model: names -> ids (0: the base), the adapted projections (each holding
    every adapter's weights stacked, one entry each), and the per-slot adapter table (of entries).
    Adapters can be loaded and unloaded while serving (on the engine thread, between steps): an unloaded
    adapter's entry is freed once no admitted request uses it, and a later load reuses the entry. Ids
    are never reused, so what keys the prefix cache (the id) never names two adapters."""

    def __init__(self, model, num_slots: int, max_loras: int | None = None, max_rank: int | None = None):
        """max_loras: adapters held at once (loaded, or unloaded but still in use); max_rank: the largest
        rank a load may bring (both None: no limit). Every projection's stacks grow with them."""
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        w = model.embed_weight
        self.device, self.dtype = w.device, w.dtype
        self.ids: dict[str, int] = {}
        self.entry: dict[int, int] = {0: 0}  # id -> its stack entry
        self.next_id = 1
        self.paths: dict[str, Path | None] = {}
        self.capacity, self.rank = 1, 1  # stack entries (entry 0: zeros, the base) and the padded rank
        self.layers: dict[str, ServedLoRALinear] = {}
        self.free: list[int] = []  # stack entries of unloaded adapters, ready for reuse
        self.active: dict[int, int] = {}  # id -> admitted requests using it (the engine's runner counts)
        self.retired: set[int] = set()  # unloaded while in use: freed when the last such request ends
        self.slot_adapter = torch.zeros(num_slots + 1, dtype=torch.long, device=w.device)  # + a padding slot
        self.rows: torch.Tensor | None = None  # [B] adapter of each row of the current forward
        self.mode = "decode"  # of the current forward: which of a projection's two stacks it reads
        # the rows' adapters, whatever their slots: the base (0) unless `using` says otherwise; None inside
        # `by_slot` (the engine's steps), where each row's slot decides
        self.fixed: int | torch.Tensor | None = 0

    # --- loading ---------------------------------------------------------------------------------
    def _check(self, adapter: Adapter, held: int | None = None) -> None:
        """Everything `load` needs, checked before anything changes (`held`: adapters held before it)."""
        if adapter.name in self.ids:
            raise AdapterError(f"a LoRA adapter named {adapter.name!r} is already loaded")
        held = len(self.ids) + len(self.retired) if held is None else held
        if self.max_loras is not None and held >= self.max_loras:
            raise AdapterError(f"{held} LoRA adapters are held, the limit (max_loras={self.max_loras}); unload one "
                               "first")
        if self.max_rank is not None and adapter.rank > self.max_rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {adapter.rank}, over max_lora_rank={self.max_rank}")
        modules = dict(self.model.named_modules())
        where = (adapter.path is not None and weights_path(adapter.path)) or f"adapter {adapter.name!r}"
        for raw, (a, b) in adapter.weights.items():
            path = target(raw)[0]
            mod = self.layers.get(path) or modules.get(path)
            if mod is None or not hasattr(mod, "in_features") or not hasattr(mod, "out_features"):
                raise AdapterError(f"{where}: {path} is not a linear projection of this model")
            if path.rpartition(".")[2] not in SERVED:  # e.g. the router: it sees flat tokens, not rows
                raise AdapterError(f"{where}: {path} takes no served adapter (only {', '.join(SERVED)} do); "
                                   "merge the adapter into a checkpoint instead")
            if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features:
                raise AdapterError(f"{where}: {path} is [{b.shape[0]} x {a.shape[1]}] but the model's projection "
                                   f"is [{mod.out_features} x {mod.in_features}]")
            # what the stacks will hold (`load`: the scale folded into B, in the model's dtype) must stay finite:
            # float16 overflows past 65504
            dtype = str(self.dtype).removeprefix("torch.")
            for part, t in (("lora_A", a), ("lora_B x lora_alpha / r", b * adapter.scale)):
                if not torch.isfinite(t.to(self.dtype)).all():
                    raise AdapterError(f"{where}: {raw}'s {part} is not finite in {dtype} (NaN, or values over its "
                                       "range)")

    def load(self, adapter: Adapter) -> int:
        """Serve `adapter`; -> its id. AdapterError (nothing changed) if it does not fit the model."""
        self._check(adapter)
        if self.free:
            new = self.free.pop(0)
        else:
            new, self.capacity = self.capacity, self.capacity + 1
        i, self.next_id = self.next_id, self.next_id + 1
        self.entry[i] = new
        self.rank = max(self.rank, adapter.rank)
        for layer in self.layers.values():
            layer.resize(self.capacity, self.rank)
            layer.clear(new)
        modules = dict(self.model.named_modules())
        for raw, (a, b) in adapter.weights.items():
            path, mode = target(raw)
            if path not in self.layers:
                parent, _, leaf = path.rpartition(".")
                layer = ServedLoRALinear(modules[path], self, self.capacity, self.rank, self.dtype, self.device)
                setattr(modules[parent], leaf, layer)
                self.layers[path] = layer
            self.layers[path].set(mode, new, a, b * adapter.scale)
        self.ids[adapter.name], self.paths[adapter.name] = i, adapter.path
        return i

    def unload(self, name: str) -> int:
        """Stop serving adapter `name` (new requests cannot name it); -> its id. Its weights stay until no
        admitted request uses them."""
        if name not in self.ids:
            raise AdapterError(f"no LoRA adapter named {name!r} is loaded")
        i = self.ids.pop(name)
        self.paths.pop(name, None)
        if self.active.get(i):
            self.retired.add(i)
        else:
            self._free(i)
        return i

    def _free(self, i: int) -> None:
        e = self.entry.pop(i)
        for layer in self.layers.values():
            layer.clear(e)
        self.retired.discard(i)
        self.free.append(e)

    def started(self, i: int) -> None:
        """A request using adapter i was admitted (the runner calls this); unloaded ids are refused."""
        if i and i not in self.ids.values():
            raise AdapterError(f"LoRA adapter id {i} is not loaded")
        self.active[i] = self.active.get(i, 0) + 1

    def finished(self, i: int) -> None:
        self.active[i] -= 1
        if not self.active[i] and i in self.retired:
            self._free(i)

    # --- which adapter each row uses ------------------------------------------------------------------
    def ensure_slots(self, num_slots: int) -> None:
        """Room for slots 0..num_slots (the last one pads); an engine with more slots grows the table."""
        if self.slot_adapter.numel() < num_slots + 1:
            grown = self.slot_adapter.new_zeros(num_slots + 1)
            grown[:self.slot_adapter.numel()] = self.slot_adapter
            self.slot_adapter = grown

    def select(self, slots: torch.Tensor, mode: str) -> None:
        """Set the mode and the rows' adapters for the next forward (from their KV slots: a device-side
        gather)."""
        self.mode = mode
        if isinstance(self.fixed, torch.Tensor):
            if self.fixed.numel() == slots.numel():
                self.rows = self.fixed.to(slots.device)
            elif slots.numel() < self.fixed.numel():  # some of the rows (LLM.generate's finished rows left):
                self.rows = self.fixed.to(slots.device).index_select(0, slots)  # their places among all of them
            else:
                raise AdapterError(f"{self.fixed.numel()} row adapters were given for a forward of {slots.numel()} rows")
        elif self.fixed is not None:
            self.rows = torch.full((slots.numel(),), self.fixed, dtype=torch.long, device=slots.device)
        else:
            self.rows = self.slot_adapter.index_select(0, slots)

    @contextlib.contextmanager
    def by_slot(self):
        """Forwards inside take each row's adapter from its KV slot (the engine's steps)."""
        old, self.fixed = self.fixed, None
        try:
            yield
        finally:
            self.fixed = old

    @contextlib.contextmanager
    def using(self, adapter):
        """Every forward inside runs its rows with `adapter` (an id for all rows, or one id per row): for
        work that uses caches of its own (scoring on the engine thread, `LLM.generate`), whose slot
        numbers mean nothing to the table."""
        ids = torch.as_tensor(adapter, dtype=torch.long)
        loaded = {0, *self.ids.values()}
        if any(int(i) not in loaded for i in ids.flatten()):
            raise AdapterError(f"LoRA adapter id {adapter} is not served")
        entries = [self.entry[int(i)] for i in ids.flatten()]
        old, self.fixed = self.fixed, (entries[0] if ids.dim() == 0 else torch.tensor(entries))
        try:
            yield
        finally:
            self.fixed = old

    def assign(self, slot: int, adapter: int) -> None:
        """Rows of KV slot `slot` use adapter id `adapter` (an admitted request's: its entry is held)."""
        self.slot_adapter[slot] = self.entry[adapter]


class ServedLoRALinear(nn.Module):
    """A projection plus the stacked adapters of each mode: a [N, R, in], b [N, out, R] (scale folded into
    b; entry 0 and free entries are zeros)."""

    def __init__(self, base: nn.Module, lora: MultiLoRA, capacity: int, rank: int, dtype, device):
        super().__init__()
        self.base, self.lora = base, lora
        self.in_features, self.out_features = base.in_features, base.out_features
        for mode in MODES:
            self.register_buffer(f"{mode}_a", torch.zeros(capacity, rank, self.in_features, dtype=dtype,
                                                          device=device), persistent=False)
            self.register_buffer(f"{mode}_b", torch.zeros(capacity, self.out_features, rank, dtype=dtype,
                                                          device=device), persistent=False)

    @property
    def weight(self):
        return self.base.weight

    def stacks(self, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{mode}_a"), getattr(self, f"{mode}_b")

    def resize(self, capacity: int, rank: int) -> None:
        for mode in MODES:
            old_a, old_b = self.stacks(mode)
            n, r = old_a.shape[0], old_a.shape[1]
            if (n, r) == (capacity, rank):
                continue
            a = old_a.new_zeros(capacity, rank, self.in_features)
            b = old_b.new_zeros(capacity, self.out_features, rank)
            a[:n, :r], b[:n, :, :r] = old_a, old_b
            setattr(self, f"{mode}_a", a)
            setattr(self, f"{mode}_b", b)

    def clear(self, i: int) -> None:
        for mode in MODES:
            for t in self.stacks(mode):
                t[i] = 0

    def set(self, mode: str, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        stack_a, stack_b = self.stacks(mode)
        stack_a[i] = 0
        stack_b[i] = 0
        stack_a[i, :a.shape[0]] = a.to(stack_a.dtype)
        stack_b[i, :, :b.shape[1]] = b.to(stack_b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.lora.rows
        if rows is None or x.dim() != 3 or rows.numel() != x.shape[0]:
            raise RuntimeError("ServedLoRALinear: no adapter rows were selected for this forward "
                               "(DiffusionGemma.encode / denoise select them from the slots)")
        stack_a, stack_b = self.stacks(self.lora.mode)
        a = stack_a.index_select(0, rows)  # [B, R, in]
        b = stack_b.index_select(0, rows)  # [B, out, R]
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


def install(model, adapters: list, num_slots: int, max_loras: int | None = None,
            max_rank: int | None = None) -> MultiLoRA:
    """Serve LoRA adapters on the model (none yet is fine: `MultiLoRA.load` adds them later); -> its
    MultiLoRA, also `model.lora_serving`. Nothing changes if an adapter does not fit."""
    names = [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AdapterError(f"LoRA adapter names must be distinct; repeated: {dupes}")
    if getattr(model, "lora_serving", None) is not None:
        raise AdapterError("this model already serves LoRA adapters")
    lora = MultiLoRA(model, num_slots, max_loras, max_rank)
    for k, a in enumerate(adapters):
        lora._check(a, held=k)
    for a in adapters:
        lora.load(a)
    model.lora_serving = lora
    return lora


def with_adapter(model, adapter, fn):
    """fn(model) with its rows on `adapter` (an id, or one per row; 0: the base model). A model without
    served adapters runs as is."""
    served = getattr(model, "lora_serving", None)
    if served is None:
        if bool(torch.as_tensor(adapter).any()):
            raise AdapterError(f"LoRA adapter id {adapter} is not served")
        return fn(model)
    with served.using(adapter):
        return fn(model)


def adapters_from(specs) -> list:
    """LORA_FORMS (strings as `lora_entry` reads them) -> [Adapter] (read from disk where needed); AdapterError
    naming an item of another shape."""
    if isinstance(specs, (str, os.PathLike)):  # iterating it would read each character as an item
        raise AdapterError(f"{str(specs)!r} names no adapter: give {LORA_FORMS}")
    if not isinstance(specs, dict) and not hasattr(specs, "__iter__"):
        raise AdapterError(f"{specs!r} names no adapter: give {LORA_FORMS}")
    items = specs.items() if isinstance(specs, dict) else specs
    return [_adapter_from(m) for m in items]


def _adapter_from(item) -> Adapter:
    if isinstance(item, Adapter):
        return item
    if isinstance(item, str) and ("=" in item or item.lstrip().startswith("{")):
        name, path = lora_entry(item)
        return read_adapter(path, name)
    if (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and item[0]
            and isinstance(item[1], (str, os.PathLike)) and str(item[1])):
        return read_adapter(item[1], item[0])
    raise AdapterError(f"{item!r} is not a LoRA adapter: give {LORA_FORMS}")


def lora_entry(s: str) -> tuple[str, str]:
    """One `--lora-modules` entry in either of vLLM's forms, NAME=DIR or a JSON object {"name", "path",
    "base_model_name"} -> (name, dir); AdapterError naming the entry. base_model_name is optional and changes
    nothing: an adapter's parent (/v1/models) is always the one base model served."""
    if s.lstrip().startswith("{"):
        return _json_entry(s)
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
        raise AdapterError(f"LoRA module entries are NAME=DIR or a JSON object with name and path, got {s!r}")
    return name, path


def _json_entry(s: str) -> tuple[str, str]:
    try:
        d = json.loads(s)
    except ValueError as e:
        raise AdapterError(f"LoRA module entry {s!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise AdapterError(f"LoRA module entry {s!r}: expected a JSON object with name and path")
    extra = sorted(set(d) - {"name", "path", "base_model_name"})
    if extra:
        raise AdapterError(f"LoRA module entry {s!r}: unknown key(s) {extra} (name, path, base_model_name)")
    for key in ("name", "path"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise AdapterError(f"LoRA module entry {s!r}: {key} must be a non-empty string, got {d.get(key)!r}")
    if not isinstance(d.get("base_model_name", ""), (str, type(None))):
        raise AdapterError(f"LoRA module entry {s!r}: base_model_name must be a string, "
                           f"got {d['base_model_name']!r}")
    return d["name"], d["path"]


def parse_lora_modules(specs) -> list:
    """`--lora-modules ENTRY ...` (`lora_entry`) -> [(name, dir)]; ValueError naming the bad entry."""
    try:
        return [lora_entry(s) for s in specs or ()]
    except AdapterError as e:
        raise AdapterError(f"--lora-modules: {e}") from None


__all__ = ["Adapter", "AdapterError", "MultiLoRA", "ServedLoRALinear", "install", "read_adapter", "write_adapter",
           "parse_lora_modules", "lora_entry", "with_adapter", "adapters_from", "both_modes", "target"]
