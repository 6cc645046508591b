"""Training checkpoints and export: build the model a config names, write `checkpoint-<step>/` atomically,
find the latest one, export a merged HF checkpoint, keep `metrics.jsonl`.

A checkpoint directory is a complete HF DiffusionGemma checkpoint (LoRA merged, so it loads anywhere) plus
`trainer_state.pt` (step, optimizer, scheduler, RNG, loss history, LoRA adapter tensors). The whole
directory is written to a temp dir and renamed into place by `save_model`; `latest` is then replaced
atomically, so a kill at any moment leaves the previous checkpoint intact and `--resume` finds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from ..checkpoint import (CheckpointError, build_random_model, check_output_dir, check_writable, load_model,
                          save_model, stored_dtype, write_dir_atomically)
from ..config import ConfigError, DiffusionParams, ModelConfig
from ..model.diffusion_gemma import DiffusionGemma
from ..model.layers import Rotary
from .lora import LoRAConfig, apply_lora, has_lora, lora_state_dict, merged_state_dict

log = logging.getLogger("canvaslm.train")
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
METRICS_FILE = "metrics.jsonl"
# what canvaslm.tokenizer reads (the chat template may be in either chat_template file), and the
# sentencepiece model HF's slow tokenizer reads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model")


def tokenizer_dir(config) -> Path | None:
    if config.tokenizer:
        d = Path(config.tokenizer)
        if not (d / "tokenizer.json").is_file():
            raise ConfigError(f"train config: tokenizer {d} has no tokenizer.json")
        return d
    if isinstance(config.model, str) and (model_dir(config) / "tokenizer.json").is_file():
        return model_dir(config)
    return None


def model_dir(config) -> Path:
    """The config's `model` as a checkpoint directory: a directory, or a Hugging Face repo id through the HF
    cache (canvaslm.hub)."""
    from ..hub import resolve_model

    try:
        return resolve_model(config.model, what="train config: model")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def build_model(config, checkpoint: Path | None = None):
    """(model in fp32 on CPU, DiffusionParams) from a checkpoint dir, the config's model (a dir or a repo
    id), or `init`; with `quantization`, the attention / MLP / expert weights are quantised (while loading)."""
    src = checkpoint or (model_dir(config) if isinstance(config.model, str) else None)
    if src is not None:
        if not Path(src).is_dir():
            raise ConfigError(f"train config: model {src} is not a checkpoint directory")
        params = DiffusionParams.from_dir(src)
        model = load_model(src, dtype="float32", quantization=config.quantization)
    else:
        init = dict(config.model["init"])
        seed, std = int(init.pop("seed", config.seed)), float(init.pop("std", 0.02))
        if "config" in init:
            _refuse_unknown(init, ("config",), "config, seed and std")
            cfg = ModelConfig.from_dict(init.pop("config"), source="train config model.init.config")
        elif "shape" in init:
            from ..config import _KNOWN_TEXT_KEYS
            from ..shapes import model_config

            shape, canvas_length = init.pop("shape"), init.pop("canvas_length", 256)
            _refuse_unknown(init, _KNOWN_TEXT_KEYS, "shape, canvas_length, seed, std or text-config fields")
            cfg = model_config(shape, canvas_length, **init)
        else:
            raise ConfigError("train config: model.init needs 'shape' or 'config'")
        model = build_random_model(cfg, dtype="float32", seed=seed, std=std)
        if config.quantization:
            from ..quant import quantize_model

            quantize_model(model, fmt=config.quantization)
        params = DiffusionParams(eos_token_ids=tuple(cfg.eos_token_ids), pad_token_id=cfg.pad_token_id)
    if config.generation:
        params = params.replace(**config.generation)
    return model, params


def _refuse_unknown(init: dict, known, expected: str):
    """A ConfigError naming the first key of model.init that is not `known` (with the closest known key)."""
    unknown = sorted(map(str, set(init) - set(known)))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        raise ConfigError(f"train config: model.init.{unknown[0]} is not a model.init key (expected {expected})"
                          + (f"; did you mean {close[0]}?" if close else "")
                          + (f" (unknown keys: {unknown})" if len(unknown) > 1 else ""))


def lora_cache(model):
    """Expert LoRA parametrizations are recomputed on every access; cache them for one forward/backward.
    Not under gradient checkpointing: a layer recomputed in the backward must compute what its forward
    did, and a cache the forward filled is gone by then."""
    if not getattr(model, "gradient_checkpointing", False) and \
            any(parametrize.is_parametrized(m) for m in model.modules()):
        return parametrize.cached()
    return contextlib.nullcontext()


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / LATEST_FILE
    if pointer.is_file():
        path = Path(out_dir) / pointer.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    found = [p for p in step_checkpoints(out_dir) if (p / STATE_FILE).is_file()]
    return found[-1] if found else None


_STEP_DIR = re.compile(r"checkpoint-(\d+)")


def step_checkpoints(out_dir: Path) -> list[Path]:
    """The run's checkpoint-<step> directories by step (checkpoint-10000000 after checkpoint-9999999); a user's
    checkpoint-best copy is none of them: rotation never deletes it, --resume never picks it."""
    steps = ((_STEP_DIR.fullmatch(p.name), p) for p in Path(out_dir).glob("checkpoint-*") if p.is_dir())
    return [p for _, p in sorted((int(m.group(1)), p) for m, p in steps if m)]


def check_fresh_out_dir(out_dir: Path):
    """ConfigError when a new run's out_dir holds an earlier run's checkpoints: the two would mix (rotation,
    `latest`, metrics.jsonl)."""
    found = sorted(p.name for p in Path(out_dir).glob("checkpoint-*")) + \
        [LATEST_FILE] * (Path(out_dir) / LATEST_FILE).exists()
    if found:
        raise ConfigError(f"out_dir {out_dir} holds an earlier run ({', '.join(found[:3])}"
                          f"{', ...' if len(found) > 3 else ''}): pass --resume to continue it, or train into "
                          "another (or an empty) out_dir")


def check_out_dir(out_dir: Path):
    """ConfigError naming out_dir when the run could not write its checkpoints there: out_dir is a file, or a
    missing out_dir could not be made (under a file or a read-only folder); found before any work, not when
    the first save fails."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train config: out_dir {out_dir} is a file, not a directory; name a directory for the "
                          "run's checkpoints")
    if not out_dir.exists():
        try:
            check_writable(out_dir)
        except CheckpointError as e:
            raise ConfigError(f"train config: out_dir {e}") from None


# The one naming rule for the temps a run's atomic writes make in out_dir: `.NAME.tmp.` + tempfile's 8 random
# characters next to the NAME it becomes (the `tmp.` marker keeps a person's `.checkpoint-100.backup_1` out).
# Directories: checkpoint.save_model's temp dir, its `.NAME.old.` set-aside and its
# `.NAME.probe.` write check, for checkpoint-<step>/ and final/. Files: _atomic_write_text's `latest` and
# `metrics.jsonl`, `trainer_state`, plot_history's `.loss.png.tmp.png`. A kill leaves them behind; `clean_partial`
# removes exactly these, never a user's file. A new writer of out_dir names its temp this way and adds its NAME to
# RUN_DIRS or RUN_FILES.
RUN_DIRS = (r"checkpoint-\d+", "final")  # regexes
RUN_FILES = ("trainer_state", "latest", r"metrics\.jsonl", r"loss\.png")
RUN_OUTPUTS = RUN_DIRS + RUN_FILES
# tempfile's names: 8 characters of [a-z0-9_]; all digits is left out (a date, a number: a person's backup,
# `.final.20241203`; tempfile draws one once in 35,000 names, and such a temp is only left behind)
_RANDOM = r"(?![0-9]{8}$)[a-z0-9_]{8}"
_RUN_TEMP_DIR = re.compile(r"\.(?P<name>%s)\.(?P<old>old\.|probe\.|tmp\.)%s" % ("|".join(RUN_DIRS), _RANDOM))
_RUN_TEMP_FILE = re.compile(r"\.(?:%s)\.tmp\.%s|\.loss\.png\.tmp\.png" % ("|".join(RUN_FILES), _RANDOM))


def is_run_temp(name: str, is_dir: bool | None = None) -> bool:
    """Whether an out_dir entry's name is a temp of the run's own writes (the rule above); `is_dir` (the
    entry's kind, when known) must match the writer's: a file named like a checkpoint's temp dir is a user's."""
    return ((is_dir is not False and _RUN_TEMP_DIR.fullmatch(name) is not None)
            or (is_dir is not True and _RUN_TEMP_FILE.fullmatch(name) is not None))


def _atomic_write_text(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _merged_copy(model):
    """The model itself, or for LoRA a plain DiffusionGemma holding the merged weights (and sharing the
    model's carried vision tensors and files, so that a save repoints both)."""
    if not has_lora(model):
        return model
    with torch.device("meta"):
        plain = DiffusionGemma(model.cfg)
    plain.load_state_dict(merged_state_dict(model), assign=True)
    plain.rotary = Rotary(model.cfg)
    for attr in ("carried_tensors", "carried_files"):  # the same dicts: a model with none has nothing to repoint
        setattr(plain, attr, getattr(model, attr, {}))
    return plain


def tokenizer_files(tok_dir: Path | None) -> dict:
    """The tokenizer and chat-template files of `tok_dir` (name in the checkpoint -> path), named templates
    (additional_chat_templates/NAME.jinja) included."""
    if tok_dir is None:
        return {}
    files = {name: tok_dir / name for name in TOKENIZER_FILES if (tok_dir / name).is_file()}
    named = tok_dir / "additional_chat_templates"
    files.update({f"{named.name}/{f.name}": f for f in sorted(named.glob("*.jinja")) if f.is_file()})
    return files


def local_dir(value):
    """A config's model / tokenizer as a checkpoint records it: a local directory as its absolute, resolved path
    (a relative `../model` would mean another directory, or none, to an export or resume run elsewhere), a repo
    id or {init: ...} as given."""
    return str(Path(value).resolve()) if isinstance(value, str) and Path(value).is_dir() else value


def local_data(value):
    """A config's `data` as a checkpoint records it: each local file or directory it reads (train, eval, a
    dataset mapping's `dataset`) as its absolute, resolved path, as local_dir records the model's; a callable,
    a repo id or a missing path as given."""
    def one(spec):
        if isinstance(spec, str):
            return str(Path(spec).resolve()) if Path(spec).exists() else spec
        if isinstance(spec, dict) and isinstance(spec.get("dataset"), str):
            return {**spec, "dataset": one(spec["dataset"])}
        return spec

    if isinstance(value, dict):
        return {k: one(v) if k in ("train", "eval") else v for k, v in value.items()}
    return one(value)


def saved_config(config) -> dict:
    """The config a checkpoint's trainer state holds: the run's, with local model, tokenizer and data paths
    absolute."""
    return {**vars(config), **{k: local_dir(getattr(config, k)) for k in ("model", "tokenizer")},
            "data": local_data(config.data)}


def save_checkpoint(trainer) -> Path:
    """checkpoint-<step>/: trainer_state.pt (optimizer, scheduler, RNG, history, LoRA adapters, config),
    tokenizer files and the merged model in HF format; with `save_merged: false` (the QLoRA default) no
    model: resuming rebuilds the base and loads the adapters, and `export_checkpoint` merges them."""
    out_dir, step = trainer.out_dir, trainer.step
    state = {"step": step, "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
             "rng": torch.get_rng_state(), "history": trainer.history,
             "lora": lora_state_dict(trainer.model) if has_lora(trainer.model) else None,
             "config": saved_config(trainer.config)}
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".trainer_state.tmp.", dir=out_dir)
    os.close(fd)
    try:
        torch.save(state, tmp)
        name = f"checkpoint-{step:07d}"
        extra = {STATE_FILE: tmp, **tokenizer_files(trainer.tokenizer_dir)}
        merged = trainer.config.save_merged
        if merged if merged is not None else not trainer.config.quantization:
            save_model(_merged_copy(trainer.model), out_dir / name, trainer.params, extra_files=extra,
                       replace_any=True)
        else:
            write_dir_atomically(out_dir / name, extra, replace_any=True)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _atomic_write_text(out_dir / LATEST_FILE, name + "\n")
    old = [p for p in step_checkpoints(out_dir) if p.name != name]
    for p in old[:max(0, len(old) - (trainer.config.keep_checkpoints - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    write_metrics(out_dir, trainer.history)
    return out_dir / name


def export_model(model, out_dir, params: DiffusionParams, tok_dir: Path | None, dtype=None) -> Path:
    """Merged HF checkpoint + tokenizer files (no trainer state)."""
    merged = _merged_copy(model)
    return save_model(merged, out_dir, params, dtype=dtype, extra_files=tokenizer_files(tok_dir))


def export_checkpoint(src: str | Path, out_dir: str | Path, dtype=None) -> Path:
    """Export a training checkpoint (or any checkpoint dir) without its trainer state. A checkpoint that
    holds only LoRA adapters (QLoRA) is merged: its base is rebuilt from the run's config. out_dir may not
    hold src, and replaces only an empty or model directory (`checkpoint.check_output_dir`)."""
    src = _checked_source(src, out_dir)
    if not (src / "config.json").is_file():
        model, params = _adapted_from_state(src)
        return export_model(model, out_dir, params, src, dtype)
    model = load_model(src, dtype="float32")
    dtype = dtype or stored_dtype(src)  # as trained (a bf16 checkpoint stays bf16, not twice its size in fp32)
    return save_model(model, out_dir, DiffusionParams.from_dir(src), dtype=dtype, extra_files=tokenizer_files(src))


def _checkpoint_dir(src: Path) -> Path:
    """A checkpoint dir itself, or a training out_dir's latest checkpoint."""
    if (src / LATEST_FILE).is_file() or not ((src / "config.json").is_file() or (src / STATE_FILE).is_file()):
        latest = latest_checkpoint(src)
        if latest is None:
            raise ConfigError(f"{src}: neither a checkpoint nor a training out_dir with checkpoints")
        return latest
    return src


def _checked_source(src, out_dir) -> Path:
    """The checkpoint dir of `src` (_checkpoint_dir), once out_dir is known to be a safe place for its copy."""
    ckpt = _checkpoint_dir(Path(src))
    check_output_dir(out_dir, src, ckpt)
    return ckpt


def export_adapter(src: str | Path, out_dir: str | Path) -> Path:
    """A LoRA run's adapters (from a checkpoint's trainer_state.pt) as a PEFT adapter directory, which
    `canvaslm serve BASE --lora-modules NAME=OUT` serves beside the base model."""
    from ..lora_serving import write_adapter

    src = _checked_source(src, out_dir)
    state = torch.load(src / STATE_FILE, map_location="cpu", weights_only=False) if (src / STATE_FILE).is_file() \
        else {}
    if not state.get("lora"):
        raise ConfigError(f"{src}: holds no LoRA adapters ({STATE_FILE} of a run with `lora:`)")
    cfg = LoRAConfig.from_dict(state["config"]["lora"])
    experts = sorted(k for k in state["lora"] if ".parametrizations." in k)
    if experts:
        raise ConfigError(f"{src}: the adapters include experts ({experts[0]}, ...), which a served adapter cannot "
                          "hold; export the merged model instead")
    weights = {}
    for key, t in state["lora"].items():
        module, _, leaf = key.rpartition(".")
        weights.setdefault(module, [None, None])["AB".index(leaf[-1])] = t
    base = state["config"].get("model")
    return write_adapter(out_dir, {m: tuple(ab) for m, ab in weights.items()}, cfg.rank, cfg.alpha,
                         str(base) if isinstance(base, (str, Path)) else None, dropout=cfg.dropout)


def _adapted_from_state(src: Path):
    """(base + adapters, DiffusionParams) of an adapters-only checkpoint, from its trainer_state.pt."""
    from .trainer import TrainConfig

    state = torch.load(src / STATE_FILE, map_location="cpu", weights_only=False)
    if not state.get("lora"):
        raise ConfigError(f"{src}: holds neither a model (config.json) nor LoRA adapters")
    config = TrainConfig.from_dict(state["config"], f"{src / STATE_FILE} config")
    base = config.model
    if isinstance(base, str) and not Path(base).is_absolute() and Path(base).is_dir():
        log.warning("%s: its run names the base model by the relative path %s (a checkpoint written before "
                    "model paths were saved absolute); taking it from the working directory, %s, which must be "
                    "where the run trained", src, base, Path.cwd())
    model, params = build_model(config)
    apply_lora(model, LoRAConfig.from_dict(config.lora))
    load_adapters(model, state["lora"], src)
    return model, params


# config keys a resumed run must share with the run that wrote its checkpoint: the model, the examples and batches
# (data, their tokenizer and lengths, seed), what trains (lora, quantization, freeze_router) and the optimizer
# settings its saved state would override (lr, betas, weight_decay); the others (max_steps, intervals, ...) may change
RESUME_FIXED = ("model", "tokenizer", "data", "max_length", "truncate_prompt", "lora", "quantization", "freeze_router",
                "batch_size", "grad_accum", "seed", "lr", "betas", "weight_decay")


def check_resume_config(saved: dict | None, config, checkpoint: Path):
    """ConfigError naming the checkpoint and the RESUME_FIXED keys where `config` differs from the config the
    checkpoint's run was trained with (its trainer state's)."""
    if not saved:
        return
    saved = _router_frozen(saved)

    def norm(key, value):
        if key in ("model", "tokenizer"):
            return local_dir(value)
        if key == "lora" and value is not None:
            return LoRAConfig.from_dict(value)
        if key == "data":  # a relative path run from another working directory is another file
            value = local_data(value)
            spec = {"train": value} if isinstance(value, str) else dict(value)
            return {k: v for k, v in spec.items() if v is not None and v != 0 and v != {}}
        return tuple(value) if key == "betas" else value

    now = vars(config)
    diff = [k for k in RESUME_FIXED if k in saved and norm(k, saved[k]) != norm(k, now[k])]
    if diff:
        shown = "; ".join(f"{k}: {saved[k]!r} -> {(local_data(now[k]) if k == 'data' else now[k])!r}" for k in diff)
        raise ConfigError(f"{checkpoint}: --resume with a config that changes {', '.join(diff)} ({shown}): the "
                          "checkpoint belongs to a different run; restore those keys, or train into a new out_dir")


def _router_frozen(saved: dict) -> dict:
    """A saved config as it trained: a LoRA run's router was frozen whatever its freeze_router said (a run from
    before the Trainer refused `freeze_router: false` with lora), so such a run resumes with freeze_router: true."""
    return {**saved, "freeze_router": True} if saved.get("lora") is not None else saved


def load_adapters(model, adapters: dict, src: Path):
    """Put saved LoRA adapters (trainer_state.pt's "lora") into a model that `apply_lora` adapted."""
    res = model.load_state_dict(adapters, strict=False)
    if res.unexpected_keys or any("lora_" in k for k in res.missing_keys):
        raise ConfigError(f"{src}: the saved adapters do not match the lora config")


def clean_partial(out_dir: Path):
    """Undo what a kill mid-save left behind: a checkpoint or final/ that a kill between save_model's two renames
    left only as its `.NAME.old.` set-aside is renamed back (the previous save, as a failed rename restores it),
    then every temp of the run's atomic writes (`is_run_temp`: checkpoint and final/ temp dirs, state, `latest`,
    metrics and plot temp files) is removed, and nothing else."""
    out_dir = Path(out_dir)
    entries = list(out_dir.iterdir())
    olds = {}  # NAME -> its set-aside copies
    for p in entries:
        m = _RUN_TEMP_DIR.fullmatch(p.name)
        if m and m["old"] == "old." and p.is_dir() and not p.is_symlink():
            olds.setdefault(m["name"], []).append(p)
    for name, copies in olds.items():
        if not os.path.lexists(out_dir / name):  # the only copy of NAME: back in place (the newest, if several)
            back = max(copies, key=lambda p: p.stat().st_mtime)
            os.replace(back, out_dir / name)
            entries.remove(back)
    for p in entries:
        is_dir = p.is_dir() and not p.is_symlink()
        if is_run_temp(p.name, is_dir):
            if is_dir:
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def write_metrics(out_dir: Path, history: list[dict]):
    if Path(out_dir).is_dir():
        _atomic_write_text(Path(out_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))


def append_metric(out_dir: Path, rec: dict):
    with open(Path(out_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(rec) + "\n")


__all__ = ["build_model", "save_checkpoint", "latest_checkpoint", "export_model", "export_checkpoint", "load_adapters",
           "tokenizer_dir", "lora_cache", "STATE_FILE"]
