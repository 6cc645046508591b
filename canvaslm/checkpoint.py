"""Checkpoint IO in the Hugging Face layout: `config.json`, `generation_config.json` and safetensors
(one file, or shards listed in `model.safetensors.index.json`).

Loading builds the model on the meta device and assigns each tensor as it is read (converted to the
target dtype one tensor at a time), so a checkpoint never needs twice its size in memory. Tied weights:
the encoder shares the decoder's layers, norm and embeddings (all but its per-layer scalars and, with
attention_bias, its own q/k/v/o_proj biases), and the LM head is the embedding matrix;
the vision tower is not part of the text model: it is not loaded here, but the model remembers which file
holds each of its tensors (`model.carried_tensors`), from which `multimodal.Vision` loads the tower on the
first image (`model/vision.py`), and `save_model` copies them into what it writes, so a fine-tuned or
quantised export keeps the checkpoint's vision tower. Every problem is collected and
reported together: missing, unexpected, mis-shaped or wrongly typed tensors, missing or truncated files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, DiffusionParams, ModelConfig
from .model.diffusion_gemma import DiffusionGemma
from .model.layers import Rotary

log = logging.getLogger("canvaslm")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Keys a checkpoint may hold that the text model does not use: vision tower, tied duplicates.
_IGNORED = re.compile(r"^(model\.encoder\.(vision_tower|embed_vision)\.|lm_head\.weight$"
                      r"|model\.encoder\.language_model\.(embed_tokens|norm)\.|"
                      r"model\.encoder\.language_model\.layers\.\d+\.(?!layer_scalar$))")
# Of those, the ones a save must write back: the vision tower and its projection into the text model.
_CARRIED = re.compile(r"^model\.encoder\.(vision_tower|embed_vision)\.")
# Files of a checkpoint that only its vision side reads (the image processor's); saves copy them too.
CARRIED_FILES = ("processor_config.json", "preprocessor_config.json")
_OPTIONAL = re.compile(r"layer_scalar$")  # buffers that default to 1 when absent
# the encoder's own attention biases (attention_bias): canvaslm's exports before they were kept lack them,
# and those models ran the encoder with the decoder's biases, which they then take
_ENCODER_BIAS = re.compile(r"^model\.encoder\.language_model\.(layers\.\d+\.self_attn\.[qkvo]_proj\.bias)$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,  # vLLM's `float`
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, damaged, or does not match the model."""


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # a torch.dtype given as such


def parse_dtype(dtype) -> torch.dtype:
    """The weights' dtype from its name or a torch.dtype: a floating type weights compute in (float8 and int
    weights come from `quantization`, not from a cast that would destroy them)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype {dtype} cannot hold the weights; expected one of "
                             f"{', '.join(str(d) for d in WEIGHT_DTYPES)} or a name in {sorted(DTYPES)} (8-bit and "
                             "4-bit weights: quantization='fp8' / 'int4')")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86 AMX or AVX512-BF16, read from
    /proc/cpuinfo). Without them oneDNN emulates bf16, 2-6x slower than float32 (docs/benchmarks.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def stored_dtype(model_dir: str | Path) -> str | None:
    """The dtype a checkpoint's weights are stored in ("bfloat16", "float32", ...): config.json's `dtype`
    / `torch_dtype` (or its text_config's), else the first tensor's in the first safetensors file; None
    when neither says."""
    model_dir = Path(model_dir)
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: the loader names the file
        raw = {}
    for d in (raw, raw.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(d.get(key), str) and d[key] in DTYPES:
                return str(DTYPES[d[key]]).replace("torch.", "")
    try:
        fname = next(iter(_tensor_files(model_dir)))
        with safe_open(str(model_dir / fname), framework="pt") as f:
            name = next(iter(f.keys()), None)
            kind = f.get_slice(name).get_dtype() if name is not None else None
    except Exception:  # noqa: BLE001 - an unreadable checkpoint says nothing here; loading it will say why
        return None
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(kind)


def default_dtype(device, model_dir: str | Path | None = None) -> str:
    """The dtype a model runs in when none is asked for (`dtype=None` / `--dtype auto`): bfloat16 on CUDA;
    on a CPU, bfloat16 for a checkpoint stored in bfloat16 when the CPU has bf16 matrix instructions
    (half the memory and ~1.5x the speed, as vLLM's CPU backend runs), else float32 (a CPU without them
    emulates bf16, much slower; a float32 checkpoint keeps its precision)."""
    if str(device).startswith("cuda"):
        return "bfloat16"
    if model_dir is not None and stored_dtype(model_dir) == "bfloat16" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


_BOTH_WARNED: set[str] = set()  # directories _tensor_files has warned about


def _tensor_files(model_dir: Path) -> dict[str, list[str]]:
    """file name -> tensor names stored in it (None: all of the single file's). A directory holding both
    model.safetensors and an index is read as transformers reads it, from model.safetensors: save_pretrained
    leaves the other layout's files behind when it saves over a checkpoint, so either may be the stale one."""
    index, single = model_dir / INDEX_FILE, model_dir / SINGLE_FILE
    if single.exists():
        if index.exists() and str(model_dir) not in _BOTH_WARNED:  # once: stored_dtype reads this too
            _BOTH_WARNED.add(str(model_dir))
            log.warning("%s holds both %s and %s; loading %s, as transformers does (save_pretrained leaves an "
                        "earlier save's files behind: remove whichever is stale)", model_dir, SINGLE_FILE,
                        INDEX_FILE, SINGLE_FILE)
        return {SINGLE_FILE: None}
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names, got "
                                  f"{type(weight_map).__name__}")
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str):
                raise CheckpointError(f"{index}: weight_map[{name!r}] must be a file name, got {fname!r}")
            files.setdefault(fname, []).append(name)
        missing = sorted(f for f in files if not (model_dir / f).exists())
        if missing:
            raise CheckpointError(f"{index} lists shard files that are missing: {missing}")
        return files
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _open(path: Path, device: str):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e}); is it truncated or damaged?") \
            from None


def _set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor):
    mod_path, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_path)
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        mod._buffers[leaf] = tensor


_CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # loaded weights must be finite


def check_device(device) -> None:
    """A CheckpointError naming `device` unless it is one this torch build can use."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise CheckpointError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind not in ("cpu", "cuda"):  # mps, xpu, meta, ...: not a device this engine runs on
        raise CheckpointError(f"device {device!r}: canvaslm runs on cpu or cuda[:N] devices")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r}: this machine has no CUDA device (or torch was built without "
                              "CUDA); use --device cpu")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise CheckpointError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load_model(model_dir: str | Path, device="cpu", dtype="float32", progress: bool | None = None,
               quantization: str | None = None) -> DiffusionGemma:
    """Build DiffusionGemma from an HF checkpoint directory. quantization="fp8" or "int4" (W4A16, group
    128) quantises attention, MLP and expert weights while loading, one tensor at a time (peak memory:
    the quantised model plus one tensor); compressed-tensors FP8 checkpoints load as FP8 either way."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory")
    check_device(device)
    cfg = ModelConfig.from_dir(model_dir)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    files = _tensor_files(model_dir)
    from .quant_io import LoadHook  # quantised weights: swaps modules on meta, converts tensors as read

    hook = LoadHook.for_checkpoint(model, lambda: _all_names(model_dir, files), quantization)
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    expected = {k: v for k, v in expected.items() if not k.startswith("rotary.")}
    problems, seen, ignored, carried = [], set(), [], {}
    reported = set()  # expected tensors found but wrong: not also "missing"
    total = sum(p.numel() for p in expected.values())
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="param", unit_scale=True, desc="loading weights",
               disable=(total < 50_000_000) if progress is None else not progress)
    dev = str(device)
    for fname, names in files.items():
        path = model_dir / fname
        with _open(path, dev if dev.startswith("cuda") else "cpu") as f:
            try:
                names = names if names is not None else list(f.keys())
            except Exception as e:
                raise CheckpointError(f"{path}: cannot list tensors ({e})") from None
            file_keys = set(f.keys())
            for name in names:
                if name not in file_keys:
                    problems.append(f"{name}: listed in the index for {fname} but not stored there")
                    reported.add(name)
                    continue
                if name not in expected:
                    if _IGNORED.match(name):
                        ignored.append(name)
                        if _CARRIED.match(name):
                            carried[name] = path
                    else:
                        problems.append(f"{name}: unexpected tensor in {fname}")
                    continue
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    problems.append(f"{name}: cannot be read from {fname} ({e})")
                    reported.add(name)
                    continue
                if _codes(t) and not (hook is not None and hook.mode == "prequantized" and hook.keeps_dtype(name)):
                    problems.append(_unscaled(name, t, fname, hook))
                    reported.add(name)
                    continue
                for name, t in (hook.convert(name, t) if hook is not None else [(name, t)]):
                    want = expected[name]
                    if tuple(t.shape) != tuple(want.shape):
                        problems.append(f"{name}: shape {tuple(t.shape)} in {fname}, expected {tuple(want.shape)}")
                        reported.add(name)
                        continue
                    keep = hook is not None and hook.keeps_dtype(name)
                    if not t.is_floating_point() and not keep:  # packed int4 is uint8 by design
                        problems.append(f"{name}: dtype {t.dtype} in {fname}, expected a floating-point tensor")
                        reported.add(name)
                        continue
                    v = t.to(device=device) if keep else t.to(device=device, dtype=dtype)
                    if v.dtype in _CHECKED_FLOATS and not bool(torch.isfinite(v).all()):  # garbage out, silently
                        problems.append(f"{name}: values that are NaN or infinite in {fname}" if
                                        not bool(torch.isfinite(t).all()) else
                                        f"{name}: values in {fname} over the range of {v.dtype} (load it in a wider "
                                        "dtype, e.g. --dtype float32)")
                        reported.add(name)
                        continue
                    _set_tensor(model, name, v)
                    seen.add(name)
                    bar.update(t.numel())
    bar.close()
    missing = sorted(set(expected) - seen - reported)
    for name in [m for m in missing if _OPTIONAL.search(m)]:
        _set_tensor(model, name, torch.ones(expected[name].shape, device=device, dtype=dtype))
        missing.remove(name)
    shared = [m for m in missing if _ENCODER_BIAS.match(m)
              and f"model.decoder.{_ENCODER_BIAS.match(m).group(1)}" in seen]
    if shared:
        log.warning("%s: no encoder attention biases (%s, ...): the encoder takes the decoder's, which is what "
                    "the canvaslm exports that lack them ran with", model_dir, shared[0])
    for name in shared:
        dec = model.get_parameter(f"model.decoder.{_ENCODER_BIAS.match(name).group(1)}")
        _set_tensor(model, name, dec.detach().clone())
        missing.remove(name)
    problems += [f"{name}: missing from the checkpoint" for name in missing]
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise CheckpointError(f"{model_dir}: checkpoint does not match the model:\n  {shown}")
    if carried:
        log.info("%s: vision tower left on disk until an image needs it; saving copies its %d tensors",
                 model_dir, len(carried))
    model.carried_tensors = carried
    model.carried_files = {n: model_dir / n for n in CARRIED_FILES if (model_dir / n).is_file()}
    model.rotary = Rotary(cfg).to(device)
    return model.eval()


def _codes(t: torch.Tensor) -> bool:
    """Quantised codes: FP8 (a one-byte float) or packed int4 (uint8)."""
    return t.dtype == torch.uint8 or (t.is_floating_point() and t.element_size() == 1)


def _unscaled(name: str, t: torch.Tensor, fname: str, hook) -> str:
    """Why a quantised tensor (FP8 codes, packed int4) that the model would take as plain weights is refused."""
    if hook is None or hook.mode != "prequantized":
        return (f"{name}: quantised ({t.dtype}) in {fname}, but config.json has no quantization_config that "
                "describes it")
    mod, _, leaf = name.rpartition(".")
    scale = f"{mod}.weight_scale" if leaf == "weight" else f"{name}_scale"
    return f"{name}: quantised ({t.dtype}) in {fname}, but its scale {scale} is missing from the checkpoint"


def _all_names(model_dir: Path, files: dict) -> list[str]:
    names = []
    for fname, listed in files.items():
        if listed is None:
            with _open(model_dir / fname, "cpu") as f:
                listed = list(f.keys())
        names += listed
    return names


def build_random_model(cfg: ModelConfig, device="cpu", dtype="float32", seed: int = 0, std: float = 0.02,
                       materialize: bool = True) -> DiffusionGemma:
    """A model with random weights (benchmarks, tests, training from scratch). With materialize=False it
    stays on the meta device, which costs no memory at any shape."""
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    if not materialize:
        return model
    model = model.to(dtype).to_empty(device=device)  # dtype first: a float32 copy would double the peak (26B)
    # drawn where the weights live: the host's one-thread generator takes minutes for the 26B shape, a GPU's
    # a moment (the values then differ from a CPU build's of the same seed; tests build on the CPU)
    on_gpu = torch.device(device).type == "cuda"
    g = torch.Generator(device=device if on_gpu else "cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(("scale", "per_expert_scale")):
                p.fill_(1.0)
            elif on_gpu:
                p.normal_(0.0, std, generator=g)
            else:
                p.copy_(torch.randn(p.shape, generator=g).mul_(std))  # in place: one float32 temporary
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)
        for name, p in model.named_parameters():  # attention_bias: the encoder starts from the decoder's
            m = _ENCODER_BIAS.match(name)
            if m:
                p.copy_(model.get_parameter(f"model.decoder.{m.group(1)}"))
    model.rotary = Rotary(cfg).to(device)
    return model.eval()


def _tiny_vision_config() -> dict:
    # transformers builds a vision tower from config.json even for text use; keep it minute.
    return {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "position_embedding_size": 64}


def save_model(model: DiffusionGemma, out_dir: str | Path, params: DiffusionParams | None = None,
               max_shard_bytes: int = 4 << 30, dtype=None, extra_files: dict[str, str | Path] | None = None,
               replace_any: bool = False):
    """Write an HF-format checkpoint atomically (to a temp dir, then renamed into place). An existing
    out_dir is replaced only when it is empty or a model / adapter directory (`check_replaceable`), or with
    `replace_any` (the trainer rewriting its own checkpoint-<step>). A model with
    FP8 or int4 modules is written as such, with the `quantization_config` that loads it back. Tensors
    the model carries without using (the vision tower of the checkpoint it was loaded from) are copied
    from their files, one shard's worth at a time, and then read from the new checkpoint; so are the
    image processor's files (CARRIED_FILES)."""
    out_dir = target_dir(out_dir)
    cfg_dict = model.cfg.to_hf_dict()
    cfg_dict.setdefault("vision_config", _tiny_vision_config())
    if cfg_dict.get("vision_config") is None:
        cfg_dict["vision_config"] = _tiny_vision_config()
    from .quant_io import quantization_config, stored_as_is

    for d in (cfg_dict, cfg_dict.get("text_config") or {}):  # describe this model, not the one it came from
        d.pop("quantization_config", None)
    carried = getattr(model, "carried_tensors", None) or {}
    qc = quantization_config(model, keeps_vision=bool(carried))
    if qc is not None:
        cfg_dict["quantization_config"] = qc
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    keep = stored_as_is(model)  # quantised tensors and their scales keep their own dtypes
    if dtype is not None:
        state = {k: v if k in keep else v.to(parse_dtype(dtype)) for k, v in state.items()}
    plain = [v for k, v in state.items() if k not in keep] or list(state.values())
    stored = str(plain[0].dtype).replace("torch.", "")
    cfg_dict["dtype"] = stored
    for d in (cfg_dict, cfg_dict.get("text_config") or {}):  # v4's torch_dtype too, where the source had it
        for key in ("dtype", "torch_dtype"):
            if key in d:
                d[key] = stored
    tmp = _make_tmp(out_dir)
    try:
        with _CarriedReader(carried, dtype) as reader:
            sizes = {k: v.numel() * v.element_size() for k, v in state.items()} | reader.sizes()
            shards, cur, size = [], [], 0
            for k in sorted(sizes):
                if cur and size + sizes[k] > max_shard_bytes:
                    shards.append(cur)
                    cur, size = [], 0
                cur.append(k)
                size += sizes[k]
            shards.append(cur)
            names = [SINGLE_FILE] if len(shards) == 1 else \
                [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            for fname, keys in zip(names, shards):
                tensors = {k: state[k].contiguous().cpu() if k in state else reader.read(k) for k in keys}
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                del tensors
        if len(shards) > 1:
            weight_map = {k: fname for fname, keys in zip(names, shards) for k in keys}
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())},
                                                      "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        gen = (params or DiffusionParams()).to_hf_dict()
        gen.setdefault("eos_token_id", list(model.cfg.eos_token_ids))
        gen.setdefault("pad_token_id", model.cfg.pad_token_id)
        gen.setdefault("bos_token_id", model.cfg.bos_token_id)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        carried_files = getattr(model, "carried_files", None) or {}
        for name, src in {**carried_files, **(extra_files or {})}.items():
            if name in carried_files and src == carried_files[name] and not Path(src).is_file():
                raise CheckpointError(f"{src}: a file this model carries from its checkpoint but no longer exists; "
                                      "reload the model to save it")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # additional_chat_templates/NAME.jinja
            shutil.copyfile(src, tmp / name)
        _publish(tmp, out_dir, stat.S_IMODE((tmp / "config.json").stat().st_mode), replace_any)
    except (OSError, SafetensorError) as e:  # disk full, read-only, a file gone: named, nothing replaced
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failed(out_dir, e)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the old files may be gone (a save over the source, rotated training checkpoints): read the new ones,
    # in place, so a LoRA run's merged copy and the model it was made from stay pointed at the same files
    for fname, keys in zip(names, shards):
        carried.update({k: out_dir / fname for k in keys if k in carried})
    carried_files.update({n: out_dir / n for n in carried_files})
    return out_dir


# bytes per element of each safetensors dtype name
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class _CarriedReader:
    """Reads carried tensors ({name: safetensors file}) for save_model: sizes from the headers, tensors
    one at a time (cast to `dtype` if floating), each file opened once."""

    def __init__(self, carried: dict[str, Path], dtype):
        self.carried, self.dtype = carried, parse_dtype(dtype) if dtype is not None else None
        self.files: dict[Path, object] = {}

    def __enter__(self):
        keys: dict[Path, set] = {}
        try:
            for name, path in self.carried.items():
                if path not in self.files:
                    if not Path(path).is_file():
                        raise CheckpointError(f"{path}: holds tensors this model carries from its checkpoint "
                                              f"({name}, the vision tower) but no longer exists; reload the model "
                                              "to save it")
                    self.files[path] = _open(Path(path), "cpu").__enter__()
                    keys[path] = set(self.files[path].keys())
                if name not in keys[path]:
                    raise CheckpointError(f"{path}: no longer holds {name}, which this model carries from its "
                                          "checkpoint; reload the model to save it")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for f in self.files.values():
            f.__exit__(*exc)
        return False

    def sizes(self) -> dict[str, int]:
        out = {}
        for name, path in self.carried.items():
            sl = self.files[path].get_slice(name)
            numel = 1
            for n in sl.get_shape():
                numel *= n
            st = sl.get_dtype()
            floating = st.startswith(("F", "BF"))
            per = self.dtype.itemsize if floating and self.dtype is not None else _ST_BYTES.get(st, 4)
            out[name] = numel * per
        return out

    def read(self, name: str) -> torch.Tensor:
        t = self.files[self.carried[name]].get_tensor(name)
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t


def write_dir_atomically(out_dir: str | Path, files: dict[str, str | Path], replace_any: bool = False) -> Path:
    """A directory holding copies of `files` ({name: source path}), written like save_model's: built in a
    temp dir, then renamed into place, replacing a previous one as save_model does."""
    out_dir = target_dir(out_dir)
    tmp = _make_tmp(out_dir)
    try:
        for name, src in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # additional_chat_templates/NAME.jinja
            shutil.copyfile(src, tmp / name)
        probe = tmp / ".mode"
        probe.write_text("")  # a plain write's mode: the umask's
        mode = stat.S_IMODE(probe.stat().st_mode)
        probe.unlink()
        _publish(tmp, out_dir, mode, replace_any)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failed(out_dir, e)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_failed(out_dir: Path, e: BaseException) -> str:
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        reason = f"{e.strerror or e}{where}"
    else:
        reason = str(e)
    state = "was left as it was" if out_dir.exists() else "was not created"
    return f"{out_dir}: cannot write the checkpoint: {reason}; {out_dir} {state}"


def target_dir(out_dir: str | Path) -> Path:
    """Where a save to out_dir writes: an absolute path with `.` and `..` collapsed (the temp dir goes in its
    parent: `.`'s parent is `.` itself), and through a symlink to a directory, that directory (a rename onto the
    link would fail after all the work; the link stays and points at the new checkpoint)."""
    out = Path(os.path.abspath(out_dir))
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def _make_tmp(out_dir: Path) -> Path:
    """The temp directory a save is built in, next to out_dir (so that the final rename stays on one
    file system); a CheckpointError naming out_dir when it cannot be made there."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    except OSError as e:
        raise CheckpointError(_write_failed(out_dir, e)) from e


# what only a training run's directory holds: its state, checkpoints, `latest` pointer and metrics
RUN_ENTRIES = ("trainer_state.pt", "latest", "metrics.jsonl", "log.jsonl", "checkpoint")
# what a checkpoint or adapter directory is made of (save_model / write_dir_atomically write these, and the
# tokenizer and image-processor files they copy): a replace may drop them; anything else is the user's
OWNED_ENTRIES = re.compile(
    r"^(config\.json|generation_config\.json|model\.safetensors|model\.safetensors\.index\.json"
    r"|model-\d+-of-\d+\.safetensors|adapter_config\.json|adapter_model\.safetensors|tokenizer\.json"
    r"|tokenizer_config\.json|special_tokens_map\.json|chat_template\.jinja|chat_template\.json|tokenizer\.model"
    r"|added_tokens\.json|additional_chat_templates|processor_config\.json|preprocessor_config\.json)$")


def check_replaceable(out_dir: str | Path):
    """Refuse to replace an existing out_dir unless it is empty, or a model / adapter directory (config.json or
    adapter_config.json) that holds nothing of a training run (RUN_ENTRIES, checkpoint-* directories) and
    nothing else a checkpoint does not own (OWNED_ENTRIES): a replace never deletes a user's .git, README.md
    or notes."""
    out_dir = target_dir(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; refusing to replace it")
    names = {p.name for p in out_dir.iterdir()}
    run = sorted(n for n in names if n in RUN_ENTRIES or n.startswith("checkpoint-"))
    if run:
        raise CheckpointError(f"{out_dir}: holds a training run ({', '.join(run[:3])}); refusing to replace it: "
                              "write to a new directory")
    if names and not names & {"config.json", "adapter_config.json"}:
        raise CheckpointError(f"{out_dir}: exists and is not a model or adapter directory (no config.json or "
                              f"adapter_config.json, but {sorted(names)[:3]}); refusing to replace it: write to a "
                              "new directory")
    foreign = sorted(n for n in names if not OWNED_ENTRIES.match(n))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointError(f"{out_dir}: holds files that are not part of a checkpoint ({shown}); refusing to "
                              "replace it, which would delete them: write to a new directory (or move them out)")


def check_writable(out_dir: str | Path):
    """A CheckpointError naming out_dir when a save could not create it (its parent, or the nearest existing
    ancestor, is read-only, not a directory, or not ours to write): found before the work, not after."""
    out_dir = target_dir(out_dir)
    anc = out_dir.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise CheckpointError(f"{out_dir}: cannot be created: {anc} is not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe.", dir=anc)).rmdir()
    except OSError as e:
        raise CheckpointError(f"{out_dir}: cannot write there ({anc}: {e.strerror or e})") from None


def check_output_dir(out_dir: str | Path, *sources: str | Path):
    """For commands that write a copy of a checkpoint (export, quantize): out_dir may not be a source or a
    directory holding one, and may replace only what `check_replaceable` allows."""
    out, cwd = Path(out_dir).resolve(), Path.cwd().resolve()
    if out == cwd or out in cwd.parents:  # `quantize SRC .`
        raise CheckpointError(f"{out_dir}: is the working directory{'' if out == cwd else ' or holds it'}; a save "
                              "replaces DST as a whole: give a new directory")
    for src in sources:
        src_r = Path(src).resolve()
        if out == src_r or out in src_r.parents:
            raise CheckpointError((f"{out_dir}: is the source {src}" if out == src_r else
                                   f"{out_dir}: holds the source {src}") + "; DST must be a new directory")
    check_replaceable(out_dir)
    check_writable(out_dir)


def _publish(tmp: Path, out_dir: Path, mode: int, replace_any: bool = False):
    """Give tmp's files `mode` and its directories (tmp, additional_chat_templates/) that mode plus search
    where it grants reading (safetensors >= 0.8 creates its files 0600 and mkdtemp its directory 0700; a
    folder with a file's mode could not be entered), then rename tmp to out_dir; an existing out_dir must
    pass `check_replaceable` (unless replace_any) and is moved aside, then removed."""
    dir_mode = mode | (mode & 0o444) >> 2
    for f in list(tmp.rglob("*")):  # listed before any chmod, which could close a folder to us
        os.chmod(f, dir_mode if f.is_dir() else mode)
    tmp.chmod(dir_mode)
    if out_dir.exists():
        if not replace_any:
            check_replaceable(out_dir)
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))  # never a user's dir
        try:
            os.replace(out_dir, old)
        except BaseException:
            old.rmdir()  # still the empty set-aside: nothing of it is left behind
            raise
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)  # the previous checkpoint back in place
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


__all__ = ["load_model", "save_model", "build_random_model", "CheckpointError", "ConfigError", "parse_dtype",
           "check_output_dir", "check_replaceable", "check_writable"]
