"""Train the Sudoku model (or its autoregressive baseline) from scratch with the shared objective.

A recipe (`recipe.yaml`) names the model shape, the data split and the optimisation; `train_recipe`
builds a random DiffusionGemma, draws batches of (prompt, target) token lists from the cached split
with validity-preserving augmentations (digit relabelling, row/column/band/stack permutations,
transposition), and minimises `canvaslm.train.objective.block_diffusion_loss` (the AR baseline: the
same call with `ar_only=True`) with AdamW, linear warmup and cosine decay. It writes an HF-format
checkpoint every `save_every` steps plus a resumable trainer state, and the final model with its
tokenizer; a killed run picks up where its last state left off.

Under `torchrun --nproc_per_node N` the run is data parallel (gloo on CPU, NCCL on GPU): every process
draws the same batch and noise, takes its 1/N of the rows, and the gradients are averaged, so N
processes follow the single-process run (up to float rounding) N times faster on N cores. Rank 0 writes
every file.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from canvaslm.checkpoint import build_random_model, save_model
from canvaslm.config import ConfigError
from canvaslm.recipes.sudoku.data import (CELL_BASE_ID, DIGIT_BASE_ID, EOS_ID, N_CELLS, PAD_ID, PROMPT_LEN, TARGET_LEN, Example,
                                          encode_grids, encode_prompt, encode_target, load_split, make_split,
                                          save_split)
from canvaslm.recipes.sudoku.model_config import ModelShape, default_params, model_config, write_tokenizer
from canvaslm.train.typecheck import check_fields, safe_load_unique, yaml_problem

RECIPE_PATH = Path(__file__).with_name("recipe.yaml")
OBJECTIVES = ("diffusion", "ar")
SAMPLERS = ("python", "tensor")
EMBEDDING_INITS = ("random", "structured")


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "diffusion"  # "diffusion" (block diffusion + encoder AR) | "ar" (encoder next-token only)
    seed: int = 0
    n_train: int = 45_000
    n_test: int = 600
    n_test_hard: int = 1000
    data_dir: str = "runs/sudoku/data"
    batch_size: int = 32
    max_steps: int = 1500
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0  # max grad norm; 0 or null = off
    diffusion_weight: float = 1.0
    ar_weight: float = 1.0
    sc_prob: float = 0.5
    digit_noise: float = 0.0  # also turn a fraction ~U(0, digit_noise) of kept answer cells into random digits
    sc_passes: int = 1  # > 1: each step chains 1..sc_passes no-grad self-conditioning passes (drawn per step)
    augment: bool = True
    init_std: float = 0.02
    embedding_init: str = "random"  # "structured": cell tokens start as row + column + box + digit vectors
    log_every: int = 10
    save_every: int = 100
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (1 is fastest on a busy CPU)
    device: str = "cpu"  # fp32 weights and optimiser (TF32 products on CUDA); no model was trained on CUDA yet
    sampler: str = "python"  # "python": augment + make_batch per example (the shipped run); "tensor": TensorSampler
    max_seconds: float = 0.0  # > 0: stop after this much training time in one invocation (saving the model)

    def __post_init__(self):
        check_fields(self, "train.")  # each value of its annotated type (numeric strings -> float)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.embedding_init not in EMBEDDING_INITS:
            raise ValueError(f"train.embedding_init must be one of {EMBEDDING_INITS}, got {self.embedding_init!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"train.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not self.max_seconds >= 0:
            raise ValueError(f"train.max_seconds must be >= 0 (0: no time limit), got {self.max_seconds!r}")
        for name in ("batch_size", "max_steps", "log_every", "save_every", "sc_passes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"train.{name} must be a positive integer, got {v!r}")
        if self.n_train <= 0:
            raise ValueError(f"train.n_train must be > 0, got {self.n_train}")
        if self.threads < 0:
            raise ValueError(f"train.threads must be >= 0 (0: torch's default), got {self.threads}")
        if not 0.0 <= self.digit_noise <= 1.0:
            raise ValueError(f"train.digit_noise must be in [0, 1], got {self.digit_noise!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if not 0 <= self.sc_prob <= 1:
            raise ValueError(f"train.sc_prob must be in [0, 1], got {self.sc_prob}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"train.grad_clip must be a number >= 0 (0 or null: no clipping), got {self.grad_clip!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"train.device must be cpu | cuda | cuda:N, got {self.device!r}")

    def split_dir(self) -> Path:
        return Path(self.data_dir) / f"n{self.n_train}_t{self.n_test}_h{self.n_test_hard}_s{self.seed}"


@dataclass(frozen=True)
class Recipe:
    model: ModelShape = field(default_factory=ModelShape)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: dict = field(default_factory=dict)  # TrainConfig overrides for the AR baseline run

    @classmethod
    def from_yaml(cls, path: str | os.PathLike = RECIPE_PATH) -> "Recipe":
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                raw = safe_load_unique(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with model, train, baseline")
        unknown = sorted(map(str, set(raw) - {"model", "train", "baseline"}))
        if unknown:
            raise ValueError(f"{path}: unknown top-level keys {unknown}; expected model, train, baseline")
        parts = {k: raw.get(k) or {} for k in ("model", "train", "baseline")}
        for key, part in parts.items():
            if not isinstance(part, dict):
                raise ConfigError(f"{path}: {key} must be a mapping, got {part!r}")
        train, base = parts["train"], parts["baseline"]
        bad = sorted(map(str, set(train) - set(TrainConfig.__dataclass_fields__)))
        if bad:
            raise ValueError(f"{path}: unknown train keys {bad}")
        bad = sorted(map(str, set(base) - set(TrainConfig.__dataclass_fields__)))
        if bad:
            raise ValueError(f"{path}: unknown baseline keys {bad}")
        try:
            recipe = cls(ModelShape.from_dict(parts["model"]), TrainConfig(**train), dict(base))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        try:
            recipe.for_baseline()  # its values are checked now, not when the baseline run starts
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path}: baseline: {e}") from None
        return recipe

    def for_baseline(self) -> "Recipe":
        """The AR baseline: same model shape and data, encoder-only next-token loss."""
        return replace(self, train=replace(self.train, **{"objective": "ar", **self.baseline}))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_or_make_split(cfg: TrainConfig, log: Callable = print, dist=None):
    """The recipe's split, generated once (minutes) and cached as JSONL under `cfg.split_dir()`.
    Data parallel (`dist`, a DistContext): rank 0 makes it while the others wait, then they read it."""
    d = cfg.split_dir()
    if dist is not None and dist.world > 1:
        if dist.rank == 0:
            load_or_make_split(cfg, log)
        dist.barrier()
    if (d / "test_hard.jsonl").exists():
        return load_split(d, validate=False)
    log(f"generating {cfg.n_train} + {cfg.n_test} + {cfg.n_test_hard} puzzles into {d} ...")
    split = make_split(cfg.n_train, cfg.n_test, cfg.seed, n_test_hard=cfg.n_test_hard)
    save_split(d, split)
    return split


def _grid_permutation(rng: random.Random) -> list[int]:
    """A random validity-preserving cell permutation: bands, rows in bands, stacks, cols in stacks, transpose."""
    def perm3x3():
        bands = rng.sample(range(3), 3)
        return [b * 3 + r for b in bands for r in rng.sample(range(3), 3)]
    rows, cols, transpose = perm3x3(), perm3x3(), rng.random() < 0.5
    return [(cols[c] * 9 + rows[r]) if transpose else (rows[r] * 9 + cols[c]) for r in range(9) for c in range(9)]


def augment(ex: Example, rng: random.Random) -> Example:
    """The same puzzle under a random digit relabelling and grid symmetry (still one unique solution)."""
    digits = [0] + rng.sample(range(1, 10), 9)
    cells = _grid_permutation(rng)
    p = "".join(str(digits[int(ex.puzzle[j])]) for j in cells)
    s = "".join(str(digits[int(ex.solution[j])]) for j in cells)
    return Example(p, s, ex.level)


def to_pairs(examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    return [(encode_prompt(e.puzzle), encode_target(e.solution)) for e in examples]


class TensorSampler:
    """Training batches drawn, augmented and tokenised with tensor ops: the distribution of
    `augment` + `make_batch` (uniform example, digit relabelling, band/row/stack/column permutations,
    transposition with probability 1/2) at a few milliseconds per thousand puzzles, where the
    per-example Python path costs ~0.25 ms a puzzle, more than a GPU step takes. It draws from its own
    CPU generator, so its batches are not the Python path's."""

    def __init__(self, examples: list[Example], canvas_length: int, seed: int):
        if not examples:
            raise ValueError("TensorSampler: no training examples")
        self.puzzles = torch.tensor([[int(c) for c in e.puzzle] for e in examples], dtype=torch.long)
        self.solutions = torch.tensor([[int(c) for c in e.solution] for e in examples], dtype=torch.long)
        self.canvas_length = canvas_length
        self.gen = torch.Generator().manual_seed(seed)

    def _perm3x3(self, B: int) -> torch.Tensor:
        """[B, 9]: per row, a permutation of 0..8 that keeps the three groups of three together."""
        outer = torch.rand(B, 3, generator=self.gen).argsort(1)
        inner = torch.rand(B, 3, 3, generator=self.gen).argsort(2)
        return (outer[:, :, None] * 3 + inner).reshape(B, 9)

    def draw(self, B: int, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(puzzles, solutions), each [B, 81] long digits (0 = blank in puzzles)."""
        idx = torch.randint(len(self.puzzles), (B,), generator=self.gen)
        p, s = self.puzzles[idx], self.solutions[idx]
        if not augment:
            return p, s
        relabel = torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.rand(B, 9, generator=self.gen).argsort(1) + 1],
                            1)
        rows, cols = self._perm3x3(B), self._perm3x3(B)
        straight = rows[:, :, None] * 9 + cols[:, None, :]  # output cell (r, c) <- source cell
        transposed = cols[:, None, :] * 9 + rows[:, :, None]
        flip = torch.rand(B, generator=self.gen) < 0.5
        cells = torch.where(flip[:, None, None], transposed, straight).reshape(B, N_CELLS)
        return relabel.gather(1, p.gather(1, cells)), relabel.gather(1, s.gather(1, cells))

    def batch(self, B: int, augment: bool = True):
        """A TrainBatch equal to `make_batch(to_pairs(examples), canvas_length, PAD_ID, EOS_ID)` for the
        drawn examples."""
        from canvaslm.train.objective import TrainBatch

        tokens = encode_grids(*self.draw(B, augment))
        fill = self.canvas_length - TARGET_LEN  # one canvas holds the answer; the rest is EOS
        tokens = torch.cat([tokens, torch.full((B, fill), EOS_ID, dtype=torch.long)], 1)
        L = tokens.shape[1]
        return TrainBatch(tokens, torch.arange(L).expand(B, L).clone(), torch.full((B,), PROMPT_LEN, dtype=torch.long),
                          torch.ones(B, dtype=torch.long), self.canvas_length)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def structured_embedding(shape: tuple[int, int], std: float, seed: int) -> torch.Tensor:
    """A starting embedding in which cell tokens share their structure: the token for digit d in cell
    (row r, column c, box b) is (R[r] + C[c] + B[b] + D[d]) / 2 and the answer digit d is D[d], for random
    unit-variance vectors R, C, B, D, all scaled by `std`; other tokens stay random. So from step one a
    cell's query can match its row, column and box peers by content, and an answer digit matches the
    digit of a given, instead of learning 810 unrelated vectors first. Weights are trained as usual."""
    g = torch.Generator().manual_seed(seed + 7919)
    vocab, hidden = shape
    w = torch.randn(vocab, hidden, generator=g)
    rows, cols, boxes, digits = (torch.randn(n, hidden, generator=g) for n in (9, 9, 9, 10))
    for cell in range(N_CELLS):
        r, c = divmod(cell, 9)
        base = rows[r] + cols[c] + boxes[3 * (r // 3) + c // 3]
        ids = CELL_BASE_ID + 10 * cell + torch.arange(10)
        w[ids] = (base + digits) / 2
    w[DIGIT_BASE_ID:DIGIT_BASE_ID + 10] = digits
    return w.mul_(std)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _save(model, out: Path, name: str):
    params = default_params()
    d = save_model(model, out / name, params)
    write_tokenizer(d)
    return d


def train_recipe(recipe: Recipe, out_dir: str | os.PathLike, log: Callable = print,
                 split=None, resume: bool = True) -> Path:
    """Train per `recipe` into `out_dir`; returns the final model dir (`out_dir/model`).

    out_dir holds `checkpoint/` (latest HF checkpoint), `trainer_state.pt` (for resume), `log.jsonl`
    (one line per logged step) and, at the end, `model/`. `split` overrides the cached data (tests).
    """
    from canvaslm.train.objective import block_diffusion_loss, draw_noise, make_batch, set_trainable
    from canvaslm.train.trainer import DistContext

    cfg, out = recipe.train, Path(out_dir)
    cuda = str(cfg.device).startswith("cuda")
    if cuda:  # named, not torch's AttributeError from set_device on a CPU build
        from canvaslm.checkpoint import check_device

        check_device(cfg.device)
    dist = DistContext.from_env("cuda" if cuda else "cpu")
    if cfg.batch_size % dist.world:
        raise ValueError(f"train.batch_size {cfg.batch_size} is not divisible by the {dist.world} processes")
    rank0, device = dist.rank == 0, dist.device(cfg.device, cuda)
    if not rank0:
        log = _quiet
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split = split if split is not None else load_or_make_split(cfg, log, dist)
    train = split.train
    model = build_random_model(model_config(recipe.model), device=device, seed=cfg.seed, std=cfg.init_std)
    if cfg.embedding_init == "structured":
        with torch.no_grad():
            model.embed_weight.copy_(structured_embedding(model.embed_weight.shape, cfg.init_std, cfg.seed))
    model.train()
    set_trainable(model, freeze_router=False)  # from scratch: the router must learn too
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    rng, gen, step = random.Random(f"sudoku-train:{cfg.seed}"), torch.Generator().manual_seed(cfg.seed), 0
    sampler = TensorSampler(train, recipe.model.canvas_length, cfg.seed) if cfg.sampler == "tensor" else None
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 weights and optimiser, faster products
    state_path = out / "trainer_state.pt"
    if resume and state_path.exists():
        _check_same_recipe(out / "recipe.json", recipe)
        st = torch.load(state_path, weights_only=False, map_location=device)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        rng.setstate(st["rng"])
        gen.set_state(st["gen"])
        if sampler is not None and st.get("data_gen") is not None:
            sampler.gen.set_state(st["data_gen"])
        step = st["step"]
        log(f"resumed from {state_path} at step {step}")
    dist.barrier()  # nobody writes a new state before every process has read the old one
    if rank0:
        _trim_log(out / "log.jsonl", step)
        (out / "recipe.json").write_text(json.dumps({"model": asdict(recipe.model), "train": asdict(cfg)},
                                                    indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.objective} model: {n_params / 1e6:.2f} M parameters, {len(train)} training puzzles, "
        f"batch {cfg.batch_size}, {cfg.max_steps} steps" + (f", {dist.world} processes" if dist.world > 1 else ""))
    V, rows = model.cfg.vocab_size, _rows(cfg.batch_size, dist)
    t0, seen = time.time(), 0
    with open(out / "log.jsonl" if rank0 else os.devnull, "a", encoding="utf-8") as logf:
        while step < cfg.max_steps:
            if sampler is not None:
                batch = sampler.batch(cfg.batch_size, cfg.augment)
            else:
                exs = [train[rng.randrange(len(train))] for _ in range(cfg.batch_size)]
                if cfg.augment:
                    exs = [augment(e, rng) for e in exs]
                batch = make_batch(to_pairs(exs), recipe.model.canvas_length, PAD_ID, EOS_ID)
            noise = None  # drawn here, as the objective would draw it, so it can be altered and split
            if cfg.objective != "ar":
                noise = draw_noise(batch, gen, V, cfg.sc_prob, device)
                if cfg.digit_noise:
                    noise = add_digit_noise(noise, gen, cfg.digit_noise)
            n_sc = 1 + int(torch.randint(cfg.sc_passes, (1,), generator=gen)) if cfg.sc_passes > 1 else 1
            if dist.world > 1:  # every process draws the whole batch and its noise, then keeps its rows
                batch = _take_rows(batch, rows)
                noise = _take_rows(noise, rows) if noise is not None else None
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            out_loss = block_diffusion_loss(model, batch, gen, sc_prob=cfg.sc_prob,
                                            diffusion_weight=cfg.diffusion_weight, ar_weight=cfg.ar_weight,
                                            ar_only=cfg.objective == "ar", noise=noise, sc_passes=n_sc)
            opt.zero_grad(set_to_none=True)
            out_loss.loss.backward()
            out_of_time = float(bool(cfg.max_seconds) and time.time() - t0 >= cfg.max_seconds)
            losses = torch.stack([out_loss.loss.detach(), out_loss.diffusion_loss.detach().reshape(()),
                                  out_loss.ar_loss.detach().reshape(()),
                                  torch.tensor(out_of_time, device=out_loss.loss.device)]).float()
            dist.all_reduce_gradients(model.parameters(), [losses])  # ranks agree on the time limit too
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))  # 0: off
            opt.step()
            step, seen = step + 1, seen + cfg.batch_size
            stop = bool(cfg.max_seconds) and bool(losses[3] > 0)
            if rank0 and (step % cfg.log_every == 0 or step == cfg.max_steps or stop):
                loss, diff, ar = losses[:3].tolist()
                rec = {"step": step, "loss": round(loss, 4), "diffusion": round(diff, 4), "ar": round(ar, 4),
                       "grad_norm": round(float(gnorm), 3), "lr": round(lr_at(step - 1, cfg), 6),
                       "ex_per_s": round(seen / (time.time() - t0), 1), "elapsed_s": round(time.time() - t0)}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(" ".join(f"{k}={v}" for k, v in rec.items()))
            if rank0 and (step % cfg.save_every == 0 or step == cfg.max_steps or stop):
                _save(model, out, "checkpoint")
                tmp = state_path.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
                            "gen": gen.get_state(), "step": step,
                            "data_gen": sampler.gen.get_state() if sampler is not None else None}, tmp)
                os.replace(tmp, state_path)
            if stop:
                log(f"stopping at step {step} of {cfg.max_steps}: train.max_seconds ({cfg.max_seconds:g} s) is spent")
                break
    model.eval()
    final = _save(model, out, "model") if rank0 else out / "model"
    dist.barrier()
    return final


RESUMABLE_CHANGES = ("max_steps", "max_seconds", "threads", "device", "log_every", "save_every")


def _check_same_recipe(path: Path, recipe: Recipe) -> None:
    """A ValueError when the run in `path`'s directory was trained by another recipe: resuming it would mix
    two runs' weights, optimiser and data. Only train.RESUMABLE_CHANGES may differ (more steps, more time,
    another machine)."""
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the run's recipe to resume it ({e}); pass --no-resume to start "
                         "over") from None
    now = {"model": asdict(recipe.model), "train": asdict(recipe.train)}
    diff = [f"{part}.{k}" for part in ("model", "train") for k in sorted(set(now[part]) | set(saved.get(part, {})))
            if not (part == "train" and k in RESUMABLE_CHANGES)
            and json.dumps(now[part].get(k)) != json.dumps(saved.get(part, {}).get(k))]
    if diff:
        raise ValueError(f"{path.parent}: its trainer state was written by another recipe ({', '.join(diff)} "
                         "differ); resume with the same recipe, or pass --no-resume (or another --out) to start over")


def _trim_log(path: Path, step: int):
    """Keep the log lines of steps <= `step` (the state being resumed; 0 = a fresh run): a run killed
    between a log line and the next state save would otherwise log those steps twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def add_digit_noise(noise, gen: torch.Generator, max_rate: float):
    """Besides the objective's uniform-vocabulary corruption (which, with 832 tokens, is ~99 % prompt-cell
    tokens the answer never holds: in effect a mask), turn a fraction r ~ U(0, max_rate) of each example's
    kept answer cells into uniformly random digits. The model then sees wrong digits on the canvas, as
    it does at inference after the sampler accepts a wrong cell, and learns to revise them."""
    B, C = noise.replace.shape
    n = min(C, N_CELLS)
    rate = torch.rand(B, generator=gen) * max_rate  # [B]
    hit = torch.rand(B, n, generator=gen) < rate[:, None]
    digits = DIGIT_BASE_ID + 1 + torch.randint(0, 9, (B, n), generator=gen)
    dev = noise.replace.device
    hit, digits = hit.to(dev), digits.to(dev)
    flip = torch.zeros_like(noise.replace)
    flip[:, :n] = hit & ~noise.replace[:, :n]
    tokens = noise.random_tokens.clone()
    tokens[:, :n] = torch.where(flip[:, :n], digits, tokens[:, :n])
    return replace(noise, replace=noise.replace | flip, random_tokens=tokens)


def _rows(batch_size: int, dist) -> slice:
    """This process's rows of every batch: a contiguous 1/world share."""
    per = batch_size // dist.world
    return slice(dist.rank * per, (dist.rank + 1) * per)


def _take_rows(obj, rows: slice):
    """A TrainBatch or NoiseDraw with only `rows` of each of its per-example tensors."""
    from dataclasses import fields

    return replace(obj, **{f.name: getattr(obj, f.name)[rows] for f in fields(obj)
                           if isinstance(getattr(obj, f.name), torch.Tensor)})


def _quiet(*_args, **_kwargs):
    pass

