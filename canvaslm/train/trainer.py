"""The trainer: YAML config -> model (checkpoint or from scratch, optional LoRA) -> AdamW steps of the
block-diffusion objective -> atomic, resumable checkpoints -> HF export and a loss plot.

Determinism is by construction: the examples of step s are a pure function of (seed, s) (data.py) and
each example's noise is drawn from a seed made of (seed, s, its position in the global batch), so a run
resumed from a checkpoint, a run with gradient accumulation, and a torchrun run with any number of
processes all see the same examples with the same noise. `batch_size` is the global number of examples
per optimizer step; each process runs `grad_accum` micro-batches of batch_size / (world * grad_accum).
Data parallelism all-reduces the gradients after backward (gloo on CPU, NCCL on GPU), which is what DDP
does; the objective calls the model's `encode`/`denoise` rather than `forward`, so DDP's forward hooks
would not fire.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import parse_dtype
from ..config import ConfigError, DiffusionParams
from ..quant import QUANTIZATIONS
from . import checkpointing as ckpt
from .data import (DataError, ExampleStream, ImageExample, calls_function, check_example, hf_source, load_sourced,
                   resolve_callable, split_holdout)
from .lora import LoRAConfig, apply_lora, has_lora
from .objective import block_diffusion_loss, canvases_of, example_noise_seed, make_batch, set_trainable
from .typecheck import check_fields, checked, safe_load_unique, yaml_problem
from .vision import TrainVision

log = logging.getLogger("canvaslm.train")
EVAL_SEED_SALT, TRANSFORM_SEED_SALT, STEP_SEED_SALT = 0x5EED, 0xA06, 0xD50
SEED_LIMIT = 2**40  # |seed| below it


@dataclass(frozen=True)
class TrainConfig:
    """One training run. `model`: a checkpoint dir, or {"init": {...}} to train from scratch, where init is
    {"shape": "tiny", "canvas_length": 8, <text-config overrides>} or {"config": <HF config dict>}, plus
    optional "seed" / "std". `data`: a source string or {"train", "eval", "eval_size", "kwargs", "transform"};
    transform: 'module:function' called as fn(prompt_ids, response_ids, rng: random.Random) -> (prompt_ids,
    response_ids) on every training example (augmentation), rng seeded from (seed, step, position); an example
    with images keeps them (its prompt ids hold each image expanded: the transform must keep those tokens)."""

    out_dir: str
    max_steps: int
    model: str | dict = ""
    data: str | dict = ""
    tokenizer: str | None = None  # dir with tokenizer.json (default: the model dir when it has one)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    batch_size: int = 8  # global examples per optimizer step
    grad_accum: int = 1
    clip: float | None = 1.0  # max grad norm; 0 or null = off
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    eval_every: int = 0  # 0 = only at the end (when there is eval data)
    eval_max_examples: int = 512
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    lora: dict | None = None  # LoRAConfig fields
    quantization: str | None = None  # "int4" | "fp8": frozen quantised base under LoRA adapters (QLoRA)
    save_merged: bool | None = None  # checkpoints hold the merged model; default: yes, except for QLoRA
    diffusion_weight: float = 1.0
    ar_weight: float = 1.0
    sc_prob: float = 0.5
    ar_only: bool = False  # the autoregressive baseline: encoder next-token loss only
    freeze_router: bool = True
    gradient_checkpointing: bool = False  # recompute each layer in the backward: activation memory ~1/layers
    max_length: int | None = None  # leave out examples longer than this (prompt + response in whole canvases)
    truncate_prompt: bool = False  # with max_length: cut a long example's prompt from the start (BOS kept) instead
    generation: dict | None = None  # DiffusionParams fields written to the exported generation_config.json
    export_dtype: str | None = None
    plot: bool = True
    progress: bool = True

    def __post_init__(self):
        def bad(name, msg, value=dataclasses.MISSING):
            value = getattr(self, name) if value is dataclasses.MISSING else value
            raise ConfigError(f"train config: {name} {msg}, got {value!r}")

        def finite(name, value, above_zero=False):  # .inf / .nan would train to NaN weights
            if not (math.isfinite(value) and (value > 0 if above_zero else value >= 0)):
                bad(name, f"must be a finite number {'>' if above_zero else '>='} 0", value)

        def seed(name, value):  # the example order seeds torch with seed * 1_000_003 + epoch: 64 bits
            if not -SEED_LIMIT < value < SEED_LIMIT:
                bad(name, f"must be an integer with absolute value below 2**40 = {SEED_LIMIT}", value)

        check_fields(self, "train config: ")  # each value of its annotated type (numeric strings -> float)
        if not self.out_dir:
            bad("out_dir", "is required")
        if self.max_steps < 1:
            bad("max_steps", "must be a positive integer")
        if not self.model:
            bad("model", "is required (a checkpoint dir or {init: {...}})")
        if isinstance(self.model, dict):
            if set(self.model) != {"init"}:
                bad("model", "as a mapping must be exactly {init: {...}}")
            init = checked("model.init", self.model["init"], "dict", "train config: ")
            for key, kind in (("seed", "int"), ("std", "float"), ("shape", "str"), ("canvas_length", "int"),
                              ("config", "dict")):
                if key in init:
                    checked(f"model.init.{key}", init[key], kind, "train config: ")
            if "seed" in init:
                seed("model.init.seed", init["seed"])
            if "shape" in init:
                from ..shapes import SHAPES

                if init["shape"] not in SHAPES:
                    bad("model.init.shape", f"must be one of {', '.join(SHAPES)}", init["shape"])
            if "std" in init:
                finite("model.init.std", float(init["std"]))
        if not self.data:
            bad("data", "is required (a .jsonl path, 'module:function', or {train: ..., eval: ...})")
        if isinstance(self.data, dict):
            unknown = set(self.data) - {"train", "eval", "eval_size", "kwargs", "transform"}
            if unknown or "train" not in self.data:
                bad("data", f"must have 'train' and only train/eval/eval_size/kwargs/transform "
                            f"(unknown: {sorted(map(str, unknown))})")
            for key, kind in (("train", "str | dict"), ("eval", "str | dict | None"), ("eval_size", "int"),
                              ("kwargs", "dict | None"), ("transform", "str | None")):
                if key in self.data:
                    checked(f"data.{key}", self.data[key], kind, "train config: ")
            for key in ("train", "eval", "transform"):
                if self.data.get(key) in ("", {}):
                    bad(f"data.{key}", "must not be empty (leave the key out, or null, for none)"
                        if key != "train" else "is required (a .jsonl path, 'module:function' or a dataset)",
                        self.data[key])
            if self.data.get("kwargs") and not any(calls_function(self.data.get(k)) for k in ("train", "eval")):
                bad("data.kwargs", "apply only to a 'module:function' source (data.train or data.eval), and "
                                   f"{self.data['train']!r} is read, not called", self.data["kwargs"])
            for key in ("train", "eval"):  # a dataset mapping's keys, checked now, not after the model is built
                if isinstance(self.data.get(key), dict):
                    try:
                        hf_source(self.data[key])
                    except DataError as e:
                        raise ConfigError(f"train config: data.{key}: {e}") from None
            if self.data.get("eval_size", 0) < 0:
                bad("data.eval_size", "must be an integer >= 0 (0: no held-out rows)", self.data["eval_size"])
            if self.data.get("eval_size") and self.data.get("eval") is not None:
                bad("data.eval_size", "does not combine with data.eval (the eval examples are data.eval's; "
                                      "eval_size holds out training rows instead)", self.data["eval_size"])
        for name in ("batch_size", "grad_accum", "keep_checkpoints", "eval_max_examples"):
            if getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.batch_size % self.grad_accum:
            bad("batch_size", f"must be divisible by grad_accum={self.grad_accum}")
        finite("lr", self.lr, above_zero=True)
        seed("seed", self.seed)
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not all(0 <= b < 1 for b in self.betas):
            bad("betas", "must be two numbers in [0, 1)")
        if self.clip is not None and not self.clip >= 0:
            bad("clip", "must be a number >= 0 (0 or null: no clipping)")
        if not 0 <= self.sc_prob <= 1:
            bad("sc_prob", "must be in [0, 1]")
        for name in ("weight_decay", "diffusion_weight", "ar_weight"):
            finite(name, getattr(self, name))
        if self.ar_only and self.ar_weight == 0:
            bad("ar_weight", "must be > 0 with ar_only (whose loss is the next-token loss alone)")
        if not self.ar_only and self.diffusion_weight == 0 and self.ar_weight == 0:
            bad("diffusion_weight", "and ar_weight are both 0: nothing to train (set either > 0)")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                bad(name, "must be an integer >= 0")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            bad("device", "must be auto | cpu | cuda | cuda:N")
        if self.dtype not in ("auto", "fp32", "float32", "bf16", "bfloat16"):
            bad("dtype", "must be auto | fp32 | bf16")
        if self.export_dtype is not None:
            try:
                parse_dtype(self.export_dtype)
            except ValueError as e:
                raise ConfigError(f"train config: export_dtype: {e}") from None
        if self.lora is not None:
            try:
                lora = LoRAConfig.from_dict(self.lora)
            except ValueError as e:
                raise ConfigError(f"train config: {e}") from None
        if self.generation is not None:
            object.__setattr__(self, "generation", _check_generation(self.generation))
        if self.max_length is not None and self.max_length < 2:
            bad("max_length", "must be an integer >= 2 (tokens of prompt + response) or null")
        if self.truncate_prompt and self.max_length is None:
            bad("truncate_prompt", "needs max_length (the length prompts are cut to fit)")
        if self.save_merged is False and self.lora is None:
            bad("save_merged", "can be false only with lora (a checkpoint then holds the adapters)")
        if self.quantization is not None:
            if self.quantization not in QUANTIZATIONS:
                bad("quantization", "must be int4 | fp8 (or absent)")
            if self.lora is None:
                bad("quantization", "needs lora: quantised base weights are frozen, only adapters train")
            if lora.include_experts:
                bad("quantization", "does not combine with lora.include_experts (quantised experts take no "
                                    "adapter); set include_experts: false")

    @classmethod
    def from_dict(cls, d: dict, source: str = "train config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - names))
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; expected some of {sorted(names)}")
        try:
            return cls(**d)
        except TypeError as e:  # a required key is missing
            raise ConfigError(f"{source}: {e}") from None
        except ConfigError as e:  # name the file the value came from
            msg = str(e)
            raise ConfigError(source + msg[len("train config"):] if msg.startswith("train config")
                              else f"{source}: {msg}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Relative paths in the file are relative to the working directory (run from the repo root)."""
        import yaml

        path = Path(path)
        try:
            d = safe_load_unique(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d, str(path))

    @property
    def data_spec(self) -> dict:
        return {"train": self.data} if isinstance(self.data, str) else dict(self.data)


# generation: the DiffusionParams that the exported generation_config.json holds
GENERATION_KEYS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                   "confidence_threshold", "eos_token_ids", "pad_token_id")


def _check_generation(generation: dict) -> dict:
    """generation's values checked (DiffusionParams' types and ranges) and converted."""
    unknown = sorted(map(str, set(generation) - set(GENERATION_KEYS)))
    if unknown:
        raise ConfigError(f"train config: generation: unknown keys {unknown}; expected some of {list(GENERATION_KEYS)}")
    types = {f.name: f.type for f in dataclasses.fields(DiffusionParams)}
    values = {k: checked(f"generation.{k}", v, types[k], "train config: ") for k, v in generation.items()}
    try:
        DiffusionParams().replace(**values)
    except ConfigError as e:
        raise ConfigError(f"train config: generation: {e}") from None
    return values


def kept_for_backward(model, fn):
    """(fn(), bytes of the tensors autograd keeps from fn's forward for the backward, `model`'s parameters
    left out): the activation memory a training step holds at its peak, whatever the device."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1 over `warmup` steps, then cosine from 1 to min_ratio at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device_type: str) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        d = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return d

    def all_reduce_mean(self, tensors: list[torch.Tensor]):
        """Average tensors across processes in place, one flat buffer per call."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].view_as(t).to(t.dtype))
            i += t.numel()

    def device(self, requested: str, cuda: bool) -> torch.device:
        """This process's torch device for a requested "auto" | "cpu" | "cuda" | "cuda:N". Under torchrun
        each process takes (and makes current, as NCCL needs) the GPU of its local rank."""
        if not cuda:
            return torch.device("cpu" if requested == "auto" else requested)
        dev = torch.device(requested if requested not in ("auto", "cuda") and self.world == 1
                           else f"cuda:{self.local_rank}")
        torch.cuda.set_device(dev)
        return dev

    def all_reduce_gradients(self, params, extra: list[torch.Tensor] = ()):
        """Average the gradients of `params` (and `extra` tensors) across processes. A parameter that got
        no gradient here (an expert none of this process's tokens picked) gets zeros first: every process
        must reduce the same list, or the flat buffers misalign and average unrelated numbers."""
        params = [p for p in params if p.requires_grad]
        if self.world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.all_reduce_mean([p.grad for p in params if p.grad is not None] + list(extra))

    def barrier(self):
        if self.world > 1:
            dist.barrier()


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = c = config
        self._setup_device()
        self.out_dir = Path(c.out_dir)
        self.step, self.history = 0, []
        world, accum = self.dist.world, c.grad_accum
        if c.batch_size % (world * accum):
            raise ConfigError(f"train config: batch_size={c.batch_size} must be divisible by processes "
                              f"({world}) x grad_accum ({accum})")
        self.micro = c.batch_size // (world * accum)
        ckpt.check_out_dir(self.out_dir)
        latest = ckpt.latest_checkpoint(self.out_dir) if resume else None
        if resume and latest is None:
            log.warning("--resume: no checkpoint in %s; starting from step 0", self.out_dir)
        if not resume:
            ckpt.check_fresh_out_dir(self.out_dir)
        state = torch.load(latest / ckpt.STATE_FILE, map_location="cpu", weights_only=False) if latest else None
        if state is not None:
            ckpt.check_resume_config(state.get("config"), c, latest)
        if c.lora is not None and not c.freeze_router:  # after the resume check, whose message names a change
            raise ConfigError("train config: freeze_router: false does not combine with lora (apply_lora freezes "
                              "all but the adapters: the router stays frozen); set freeze_router: true, or leave "
                              "out lora to train the router too")
        transform = c.data_spec.get("transform")  # imported before the model and data load, named by its key
        self.transform = resolve_callable(transform, "train config: data.transform") if transform else None
        self.tokenizer_dir = ckpt.tokenizer_dir(c)
        self._setup_model(latest, state)
        self._load_data()
        self._setup_optimizer()
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            self.step, self.history = state["step"], list(state["history"])
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                # the saved lr is the old schedule's: max_steps, warmup_steps and min_lr_ratio may have changed
                group["lr"] = base * lr_factor(self.step, c.warmup_steps, c.max_steps, c.min_lr_ratio)
            log.info("resumed from %s at step %d", latest, self.step)
        elif self.dist.world > 1:
            for p in self.model.parameters():  # every process starts from rank 0's weights
                dist.broadcast(p.data, 0)
        if self.dist.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.out_dir)
            ckpt.write_metrics(self.out_dir, self.history)

    def _setup_device(self):
        c = self.config
        cuda = c.device.startswith("cuda") or (c.device == "auto" and torch.cuda.is_available())
        if c.device.startswith("cuda"):
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if not n or int(c.device.partition(":")[2] or 0) >= n:
                raise ConfigError(f"train config: device {c.device!r}, but " + (
                    f"this machine has {n} CUDA device(s)" if n else
                    f"CUDA is not available (torch {torch.__version__}{'' if torch.version.cuda else ', CPU build'})")
                    + "; use device: cpu or auto")
        self.dist = DistContext.from_env("cuda" if cuda else "cpu")
        self.device = self.dist.device(c.device, cuda)
        bf16 = c.dtype in ("bf16", "bfloat16") or (c.dtype == "auto" and cuda)
        self.autocast_dtype = torch.bfloat16 if bf16 else None  # master weights stay fp32

    def _setup_model(self, latest: Path | None, state: dict | None):
        """Full fine-tuning resumes from the checkpoint's weights; LoRA rebuilds the base and loads adapters."""
        c = self.config
        self.model, self.params = ckpt.build_model(c, latest if (state and not state["lora"]) else None)
        self.model.to(self.device)
        if c.lora is not None:
            # the adapters' init follows the run's seed, not whatever the process drew before (so two runs
            # of one config in a process, and every torchrun process, start from the same adapters)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(c.seed)
                apply_lora(self.model, LoRAConfig.from_dict(c.lora))
            if state and state["lora"]:
                ckpt.load_adapters(self.model, state["lora"], latest)
        else:
            set_trainable(self.model, freeze_router=c.freeze_router)
        self.model.train()
        self.model.gradient_checkpointing = bool(c.gradient_checkpointing)
        cfg = self.model.cfg
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.eos_ids = tuple(cfg.eos_token_ids)

    def _load_data(self):
        c, vocab = self.config, self.model.cfg.vocab_size
        tok = None
        if self.tokenizer_dir is not None:
            from ..tokenizer import Tokenizer
            tok = Tokenizer.from_dir(self.tokenizer_dir)
        spec = c.data_spec
        # images: loaded, preprocessed and encoded by the frozen tower here, once (vision.py)
        self.vision = TrainVision(self.model, ckpt.model_dir(c) if isinstance(c.model, str) else None) \
            if TrainVision.usable(self.model.cfg) else None
        load = lambda src: load_sourced(src, tok, spec.get("kwargs"), vocab, self.vision)  # noqa: E731
        train = self._fitting(load(spec["train"]), "data.train")
        if spec.get("eval"):
            held = self._fitting(load(spec["eval"]), "data.eval")
        else:  # whole rows: a conversation's turns are all trained on or all held out
            train, held = split_holdout(train, int(spec.get("eval_size", 0)), c.seed)
        if self.vision is not None:
            self.vision.release()
        self.train_where = [where for where, _ in train]  # each example's row (FILE:LINE), for messages
        self.train_examples, self.eval_examples = [ex for _, ex in train], [ex for _, ex in held]
        self.stream = ExampleStream(len(self.train_examples), c.seed)
        if c.eval_every and not self.eval_examples and self.dist.rank == 0:
            log.warning("train config: eval_every is %d, but there is no eval data (set data.eval, or data.eval_size "
                        "to hold out training rows): no held-out loss is computed", c.eval_every)

    def _length(self, example) -> int:
        """The example's training sequence: prompt + response in whole canvases (EOS included)."""
        C = self.model.cfg.canvas_length
        return len(example[0]) + C * canvases_of(example[1], C, self.eos_ids)

    def _fitting(self, examples: list, what: str) -> list:
        """The (where, example) pairs whose training sequence fits `max_length`, with a warning that counts the
        others (with `truncate_prompt`, a long example's prompt is cut from the start to fit, where it can be);
        a sequence past the model's positions is an error naming its row."""
        c, cfg = self.config, self.model.cfg
        lengths = [self._length(ex) for _, ex in examples]
        limit = cfg.max_position_embeddings
        if c.max_length is not None and c.max_length > limit:
            raise ConfigError(f"train config: max_length {c.max_length} is past the model's max_position_embeddings "
                              f"{limit}")
        if c.max_length is None:
            too_long = [i for i, n in enumerate(lengths) if n > limit]
            if too_long:
                i = too_long[0]
                raise DataError(f"{examples[i][0]}: the example is {lengths[i]} tokens long (prompt + response in "
                                f"canvases of {cfg.canvas_length}), past the model's max_position_embeddings {limit} "
                                f"(too long: {len(too_long)} of the {len(examples)} examples of {what}); set "
                                "max_length to leave them out")
            return examples
        if c.truncate_prompt:  # cut long prompts from the start; what cannot be cut stays too long (left out)
            examples, cut = list(examples), 0
            for i, n in enumerate(lengths):
                short = self._cut_prompt(examples[i][1], n - c.max_length) if n > c.max_length else None
                if short is not None:
                    examples[i], lengths[i], cut = (examples[i][0], short), c.max_length, cut + 1
            if cut and self.dist.rank == 0:
                log.warning("%s: cut the start of %d prompts to fit max_length %d", what, cut, c.max_length)
        kept = [ex for ex, n in zip(examples, lengths) if n <= c.max_length]
        if not kept:
            raise DataError(f"{what}: all {len(examples)} examples are longer than max_length {c.max_length} "
                            f"(the shortest is {min(lengths)} tokens in canvases of {cfg.canvas_length})")
        if len(kept) < len(examples) and self.dist.rank == 0:
            log.warning("%s: left out %d of %d examples longer than max_length %d (the longest: %d tokens)", what,
                        len(examples) - len(kept), len(examples), c.max_length, max(lengths))
        return kept

    def _cut_prompt(self, example, over: int):
        """The example with `over` tokens cut from its prompt's start, keeping a leading BOS; None when that
        leaves no prompt (not even the kept BOS: the response alone is too long) or the example shows images
        (a cut could split one, and the image tokens are most of such a prompt)."""
        if isinstance(example, ImageExample):
            return None
        prompt, response = example
        bos = self.model.cfg.bos_token_id
        head = 1 if prompt and prompt[0] == bos else 0
        if len(prompt) - over < 1:  # what is left: at least one token (the BOS alone, when there is one)
            return None
        return list(prompt[:head]) + list(prompt[head + over:]), response

    def _setup_optimizer(self):
        c = self.config
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("train config: no trainable parameters (check lora.targets / freeze_router)")
        self.trainable = [p for _, p in trainable]
        groups = [{"params": [p for n, p in trainable if p.ndim >= 2], "weight_decay": c.weight_decay},
                  {"params": [p for n, p in trainable if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=c.lr, betas=c.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, c.warmup_steps, c.max_steps, c.min_lr_ratio))

    # --- one optimizer step ----------------------------------------------------------------------
    def _micro_batches(self, step: int):
        """This process's micro-batches of `step`: (examples, global positions) each."""
        c, d, m = self.config, self.dist, self.micro
        for a in range(c.grad_accum):
            pos = [a * d.world * m + d.rank * m + i for i in range(m)]
            idx = self.stream.indices(step * c.batch_size + pos[0], m)
            examples = [self.train_examples[i] for i in idx]
            if self.transform is not None:
                examples = [self._transformed(self.train_examples[i], self.train_where[i],
                                              random.Random(example_noise_seed(c.seed ^ TRANSFORM_SEED_SALT, step, j)))
                            for i, j in zip(idx, pos)]
            yield examples, pos

    def _transformed(self, example, where: str, rng):
        """The transform's output for an example, checked as a loaded example is (ids, vocabulary, length)."""
        c, cfg = self.config, self.model.cfg
        at = f"data.transform {c.data_spec['transform']!r} on {where}"
        # copies: a transform that edits its lists in place (rng.shuffle) must not change the loaded example
        out = check_example(self.transform(list(example[0]), list(example[1]), rng), at, cfg.vocab_size)
        n, limit = self._length(out), c.max_length or cfg.max_position_embeddings
        if n > limit:
            raise DataError(f"{at}: its example is {n} tokens long (prompt + response in canvases of "
                            f"{cfg.canvas_length}), past {'max_length' if c.max_length else 'max_position_embeddings'} "
                            f"{limit}")
        if isinstance(example, ImageExample):
            img = cfg.image_token_id
            if out[0].count(img) != example[0].count(img):
                raise DataError(f"{at}: its prompt holds {out[0].count(img)} image tokens (id {img}) where the "
                                f"example's holds {example[0].count(img)}; a transform must keep the image tokens")
            return example.replace(*out)
        return out

    def _loss(self, examples, seeds):
        c = self.config
        images = self.vision.inputs(examples) if any(isinstance(e, ImageExample) for e in examples) else None
        batch = make_batch(examples, self.model.cfg.canvas_length, self.pad_id, self.eos_ids, self.device, seeds,
                           images)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None), \
                ckpt.lora_cache(self.model):
            return block_diffusion_loss(self.model, batch, None, c.sc_prob, c.diffusion_weight, c.ar_weight,
                                        ar_only=c.ar_only)

    @torch.enable_grad()
    def compute_gradients(self, step: int) -> dict:
        """Forward/backward over this step's batch; gradients averaged over processes. Returns stats."""
        c = self.config
        # torch's global generator (LoRA dropout draws from it) is seeded from (seed, step, rank): two runs of
        # one config, and a run resumed at any step, draw the same
        torch.manual_seed(example_noise_seed(c.seed ^ STEP_SEED_SALT, step, self.dist.rank))
        sums = torch.zeros(4, device=self.device)  # loss, diffusion, ar, tokens
        for examples, pos in self._micro_batches(step):
            out = self._loss(examples, [example_noise_seed(c.seed, step, j) for j in pos])
            (out.loss / c.grad_accum).backward()
            sums += torch.stack([out.loss.detach(), out.diffusion_loss.detach(), out.ar_loss.detach(),
                                 torch.tensor(float(out.num_tokens), device=self.device)])
        self.dist.all_reduce_gradients(self.trainable, [sums])
        sums[:3] /= c.grad_accum
        return {"loss": float(sums[0]), "diffusion_loss": float(sums[1]), "ar_loss": float(sums[2]),
                "tokens": float(sums[3]) * self.dist.world}

    def train_step(self) -> dict:
        c, t0 = self.config, time.perf_counter()
        stats = self.compute_gradients(self.step)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, c.clip or float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": self.step, **{k: stats[k] for k in ("loss", "diffusion_loss", "ar_loss")},
               "lr": lr, "grad_norm": float(norm), "tokens_per_s": stats["tokens"] / dt}
        self.history.append(rec)
        return rec

    # --- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Held-out loss with fixed noise (comparable across evaluations), in eval mode (no LoRA dropout);
        split over processes."""
        if not self.eval_examples:
            return None
        c, d = self.config, self.dist
        ex = self.eval_examples[:c.eval_max_examples]
        sums = torch.zeros(4, device=self.device)  # loss, diffusion, ar (each x examples), examples
        training = self.model.training
        self.model.eval()
        try:
            for start in range(d.rank * self.micro, len(ex), self.micro * d.world):
                chunk = ex[start:start + self.micro]
                seeds = [example_noise_seed(c.seed ^ EVAL_SEED_SALT, 0, start + i) for i in range(len(chunk))]
                out = self._loss(chunk, seeds)
                n = len(chunk)
                sums += torch.tensor([float(out.loss) * n, float(out.diffusion_loss) * n, float(out.ar_loss) * n,
                                      n], device=self.device)
        finally:
            self.model.train(training)
        self.dist.all_reduce_mean([sums])
        n = max(float(sums[3]), 1.0)
        return {"eval_loss": float(sums[0]) / n, "eval_diffusion_loss": float(sums[1]) / n,
                "eval_ar_loss": float(sums[2]) / n}

    # --- the loop --------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> list[dict]:
        """Run until max_steps (or `stop_at`, which ends like a kill: no final save or export)."""
        from tqdm.auto import tqdm

        c, rank0 = self.config, self.dist.rank == 0
        end = c.max_steps if stop_at is None else min(stop_at, c.max_steps)
        bar = tqdm(total=c.max_steps, initial=self.step, desc="train", disable=not (rank0 and c.progress))
        while self.step < end:
            rec = self.train_step()
            if c.eval_every and self.step % c.eval_every == 0 or self.step == c.max_steps:
                ev = self.evaluate()
                if ev:
                    rec.update(ev)
            if rank0:
                ckpt.append_metric(self.out_dir, rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            **({"eval": f"{rec['eval_loss']:.4f}"} if "eval_loss" in rec else {}))
            if c.save_every and self.step % c.save_every == 0 and self.step < c.max_steps:
                self.save()
        bar.close()
        if self.step >= c.max_steps and stop_at is None:
            self.save()
            self.export(self.out_dir / "final")
        return self.history

    def save(self) -> Path | None:
        """Write checkpoint-<step> atomically (rank 0) and point `latest` at it."""
        path = None
        if self.dist.rank == 0:
            path = ckpt.save_checkpoint(self)
            if self.config.plot:
                from .plot import plot_history
                plot_history(self.history, self.out_dir / "loss.png")
        self.dist.barrier()
        return path

    def export(self, out_dir: str | Path, dtype=None) -> Path | None:
        """HF DiffusionGemma checkpoint (LoRA merged) + tokenizer files: loads in canvaslm and transformers."""
        out = None
        if self.dist.rank == 0:
            out = ckpt.export_model(self.model, out_dir, self.params, self.tokenizer_dir,
                                    dtype or self.config.export_dtype)
        self.dist.barrier()
        return Path(out_dir) if out is not None else None

    @property
    def is_lora(self) -> bool:
        return has_lora(self.model)


__all__ = ["TrainConfig", "Trainer", "lr_factor", "kept_for_backward"]
