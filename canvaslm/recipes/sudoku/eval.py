"""Evaluate Sudoku solvers: exact-solve rate and cell accuracy vs denoising steps and difficulty.

Two methods on the same puzzles: the diffusion model (`solve.solve`, one canvas, N denoising steps,
givens pinned) and the autoregressive baseline (same shape and data, trained with the encoder's
next-token loss only, greedy decoding via `canvaslm.train.objective.greedy_ar_generate`). Exact solve:
the 81 output digits are a valid completion of the puzzle. Cell accuracy: the fraction of the puzzle's
blank cells whose output digit equals the (unique) solution's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from canvaslm.recipes.sudoku.data import (EOS_ID, PROMPT_LEN, TARGET_LEN, VOCAB_SIZE, Example, decode_solution,
                                          encode_prompt)
from canvaslm.recipes.sudoku.puzzles import is_valid_solution

DEFAULT_STEPS = (4, 8, 12, 16, 48)


@dataclass(frozen=True)
class EvalRow:
    method: str  # "diffusion" | "ar"
    steps: int | None  # denoising steps (None for AR)
    subset: str  # "easy" | "medium" | "hard" | "hard (held-out)"
    n: int
    solve_rate: float
    cell_accuracy: float
    mean_passes: float  # decoder passes per puzzle (AR: tokens generated)
    seconds: float


def score(examples: Sequence[Example], outputs: Sequence[str | None]) -> tuple[float, float]:
    """(exact-solve rate, blank-cell accuracy) of 81-char outputs (None = not a grid)."""
    solved, right, blanks = 0, 0, 0
    for ex, out in zip(examples, outputs):
        if out is not None and is_valid_solution(ex.puzzle, out):
            solved += 1
        for i, ch in enumerate(ex.puzzle):
            if ch == "0":
                blanks += 1
                right += out is not None and out[i] == ex.solution[i]
    n = max(1, len(examples))
    return solved / n, right / max(1, blanks)


def eval_sets(split, n: int | None = None) -> dict[str, list[Example]]:
    """The split's test puzzles by level, plus the held-out hard split; at most n of each."""
    sets = {}
    for level in ("easy", "medium", "hard"):
        exs = [e for e in split.test if e.level == level]
        if exs:
            sets[level] = exs[:n]
    sets["hard (held-out)"] = list(split.test_hard[:n])
    return sets


def depth_sets(examples: Sequence[Example], steps: int = 12) -> dict[str, list[Example]]:
    """Split puzzles by `singles_rounds`: those that parallel naked/hidden singles finish within `steps`
    rounds, those they finish in more, and those where they stall (they need pairs, chains or search)."""
    from canvaslm.recipes.sudoku.puzzles import singles_rounds

    out: dict[str, list[Example]] = {f"singles <= {steps} rounds": [], f"singles > {steps} rounds": [],
                                     "singles stall": []}
    for e in examples:
        rounds, grid = singles_rounds(e.puzzle)
        key = "singles stall" if 0 in grid else f"singles {'<=' if rounds <= steps else '>'} {steps} rounds"
        out[key].append(e)
    return {k: v for k, v in out.items() if v}


def eval_diffusion(llm, sets: dict[str, list[Example]], steps: Sequence[int] = DEFAULT_STEPS, seed: int = 0,
                   candidates: bool = False, log=None, **sampling) -> list[EvalRow]:
    from canvaslm.recipes.sudoku.solve import solve

    rows = []
    for s in steps:
        for name, exs in sets.items():
            t0 = time.time()
            res = solve(llm, [e.puzzle for e in exs], steps=s, seed=seed, candidates=candidates, **sampling)
            rate, acc = score(exs, [r.solution for r in res])
            passes = sum(r.decoder_passes for r in res) / max(1, len(res))
            rows.append(EvalRow("diffusion", s, name, len(exs), rate, acc, passes, time.time() - t0))
            if log:
                log(format_row(rows[-1]))
    return rows


@dataclass(frozen=True)
class StepTrace:
    """What the sampler holds after denoising step `step`, over the blank cells of a set of puzzles."""

    step: int
    argmax_accuracy: float  # the draft (argmax canvas) equals the solution
    accepted: float  # the canvas holds a digit (accepted), not a noise token
    accepted_correct: float  # ... and that digit is the solution's
    finished: float  # fraction of puzzles that stopped denoising

    @property
    def precision(self) -> float:
        return self.accepted_correct / self.accepted if self.accepted else 0.0


def trace_diffusion(llm, exs: Sequence[Example], steps: int, seed: int = 0, candidates: bool = False,
                    **sampling) -> list[StepTrace]:
    """Step-by-step view of `solve` on `exs` (same seeds): how much of the draft is right and how many
    cells the sampler accepts, and how precisely, as the canvas is denoised."""
    import torch

    from canvaslm.recipes.sudoku.data import DIGIT_BASE_ID, N_CELLS
    from canvaslm.recipes.sudoku.solve import solve

    sol = torch.tensor([[DIGIT_BASE_ID + int(c) for c in e.solution] for e in exs])
    blank = torch.tensor([[c == "0" for c in e.puzzle] for e in exs])
    # first row of each of solve's batches -> its [argmax right, accepted, accepted right, finished rows]
    # after each step it ran
    by_batch: dict[int, list[tuple[int, int, int, int]]] = {}

    def on_draft(first, st):
        rows = slice(first, first + st.argmax.shape[0])
        am, cv, b = st.argmax[:, :N_CELLS].cpu(), st.canvas[:, :N_CELLS].cpu(), blank[rows]
        digit = (cv > DIGIT_BASE_ID) & (cv <= DIGIT_BASE_ID + 9)
        by_batch.setdefault(first, []).append((int(((am == sol[rows]) & b).sum()), int((digit & b).sum()),
                                               int(((cv == sol[rows]) & b).sum()), int(st.finished.sum())))

    solve(llm, [e.puzzle for e in exs], steps=steps, seed=seed, candidates=candidates, on_draft=on_draft,
          **sampling)
    n_steps = max((len(v) for v in by_batch.values()), default=0)
    # a batch whose rows all stopped early is not called again: its last counts hold for the later steps
    padded = [v + v[-1:] * (n_steps - len(v)) for v in by_batch.values()]
    totals = [[sum(field) for field in zip(*batches)] for batches in zip(*padded)]
    n_blank, n = max(1, int(blank.sum())), max(1, len(exs))
    return [StepTrace(k, c[0] / n_blank, c[1] / n_blank, c[2] / n_blank, c[3] / n)
            for k, c in enumerate(totals, 1)]


def format_trace(subset: str, trace: Sequence[StepTrace]) -> str:
    lines = [f"{subset}: step | draft right | accepted | accepted right (precision) | finished"]
    for t in trace:
        lines.append(f"  {t.step:3d} | {100 * t.argmax_accuracy:5.1f}% | {100 * t.accepted:5.1f}% | "
                     f"{100 * t.accepted_correct:5.1f}% ({100 * t.precision:5.1f}%) | {100 * t.finished:5.1f}%")
    return "\n".join(lines)


def model_problem(cfg) -> str | None:
    """Why a model (its ModelConfig) cannot be a Sudoku model of this recipe, or None."""
    if cfg.vocab_size != VOCAB_SIZE:
        return f"its vocabulary has {cfg.vocab_size} tokens, not the Sudoku recipe's {VOCAB_SIZE}"
    if cfg.max_position_embeddings < PROMPT_LEN + TARGET_LEN:
        return (f"its {cfg.max_position_embeddings} positions are fewer than a puzzle and its answer need "
                f"({PROMPT_LEN + TARGET_LEN})")
    return None


def eval_ar(model, sets: dict[str, list[Example]], batch_size: int = 128, log=None) -> list[EvalRow]:
    from canvaslm.train.objective import greedy_ar_generate

    rows = []
    for name, exs in sets.items():
        t0, outs, n_tok = time.time(), [], 0
        for lo in range(0, len(exs), batch_size):
            chunk = exs[lo:lo + batch_size]
            gen = greedy_ar_generate(model, [encode_prompt(e.puzzle) for e in chunk], TARGET_LEN, (EOS_ID,))
            outs += [decode_solution(g) for g in gen]
            n_tok += sum(len(g) for g in gen)
        rate, acc = score(exs, outs)
        rows.append(EvalRow("ar", None, name, len(exs), rate, acc, n_tok / max(1, len(exs)), time.time() - t0))
        if log:
            log(format_row(rows[-1]))
    return rows


def kv_cache_drift(model, dtypes: Sequence, n: int = 32) -> dict:
    """{dtype: (mean KL from the fp32 cache's distribution, argmax agreement)} of one decoder step from a
    fixed noise canvas over `n` easy and `n` medium puzzles encoded into a KV cache stored in each dtype,
    against an fp32 cache: what `--kv-cache-dtype` costs on a trained model."""
    import torch

    from canvaslm.kv_cache import KVCache
    from canvaslm.recipes.sudoku.puzzles import generate_puzzles

    cfg = model.cfg
    prompts = torch.tensor([encode_prompt(p) for p, _ in generate_puzzles(n, "easy", seed=123)
                            + generate_puzzles(n, "medium", seed=124)])
    B, P = prompts.shape
    canvas = torch.randint(0, cfg.vocab_size, (B, cfg.canvas_length), generator=torch.Generator().manual_seed(0))
    logp = {}
    for dtype in (torch.float32, *dtypes):
        cache = KVCache(cfg, B, P + cfg.canvas_length, dtype=dtype, compute_dtype=torch.float32)
        with torch.no_grad():
            model.encode(prompts, torch.arange(P).expand(B, P), torch.arange(B), cache, fresh=True)
            logp[dtype] = model.denoise(canvas.to(prompts.device), torch.arange(B), cache).float().log_softmax(-1)
    ref = logp[torch.float32]
    return {d: ((ref.exp() * (ref - logp[d])).sum(-1).mean().item(), (logp[d].argmax(-1) == ref.argmax(-1))
                .float().mean().item()) for d in dtypes}


def format_row(r: EvalRow) -> str:
    steps = "greedy" if r.steps is None else f"{r.steps} steps"
    return (f"{r.method:9s} {steps:9s} {r.subset:16s} n={r.n:4d} solved={100 * r.solve_rate:5.1f}% "
            f"cells={100 * r.cell_accuracy:5.1f}% passes={r.mean_passes:5.1f} ({r.seconds:.0f}s)")


def format_table(rows: Sequence[EvalRow]) -> str:
    """Markdown: one line per (method, steps), one 'solved% / cells%' column per subset."""
    subsets = list(dict.fromkeys(r.subset for r in rows))
    keys = list(dict.fromkeys((r.method, r.steps) for r in rows))
    by = {(r.method, r.steps, r.subset): r for r in rows}
    head = "| method | steps | " + " | ".join(f"{s} solved / cells" for s in subsets) + " |"
    lines = [head, "|" + "---|" * (2 + len(subsets))]
    for method, steps in keys:
        cells = []
        for s in subsets:
            r = by.get((method, steps, s))
            cells.append("" if r is None else f"{100 * r.solve_rate:.1f}% / {100 * r.cell_accuracy:.1f}%")
        label = "diffusion (DiffusionGemma)" if method == "diffusion" else "autoregressive baseline"
        lines.append(f"| {label} | {'greedy, 82 tokens' if steps is None else steps} | " + " | ".join(cells) + " |")
    n = {s: max(r.n for r in rows if r.subset == s) for s in subsets}
    lines.append("")
    lines.append("puzzles per column: " + ", ".join(f"{s}: {n[s]}" for s in subsets))
    return "\n".join(lines)
