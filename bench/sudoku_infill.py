"""Sudoku infilling: pinning vs left-to-right generation with the suffix in the prompt (issue 5).

    python bench/sudoku_infill.py --n 100 --steps 4,12

Task: the answer canvas of a held-out puzzle is 81 cells + EOS. Cells [0, a) (prefix) and [b, 81)
(suffix) are given from the solution; the model writes the middle cells [a, b). The gap is known (one
token per cell). Methods, all on the same puzzles:

- pin: prompt = encode_prompt(puzzle); on the answer canvas the prefix, the suffix and the EOS are
  pinned and the middle is denoised around them (diffusion, N steps).
- l2r: the prefix and suffix go into the prompt and the model generates the b - a middle cells after
  it, with one of two prompt layouts:
    append: [BOS] puzzle [SEP] suffix [SEP] prefix  (the suffix and its [SEP] are left out when the
            suffix is empty, which leaves the training layout [BOS] puzzle [SEP] prefix)
    givens: [BOS] puzzle' [SEP] prefix, where puzzle' is the puzzle with the suffix cells filled in
            from the solution (the suffix as extra givens: the only layout these models were trained on)
  decoded by the diffusion sampler (N steps, one canvas after the prompt), or greedily token by token
  by the encoder (the diffusion checkpoint's encoder is trained with a next-token loss too), or by the
  autoregressive baseline checkpoint (`--ar-model`).
- none: reference without any context: prompt = encode_prompt(puzzle), only the EOS pinned.

Every diffusion row masks the middle cells to the digits 1-9 and draws per-puzzle seeds (seed + i);
greedy rows are unmasked (a non-digit output cell counts as wrong). Scores: accuracy over all middle
cells, over the middle cells that are blank in the puzzle, and the exact rate of whole completions
(prefix + middle + suffix == the solution; the solution is unique). Passes: decoder passes per puzzle
(diffusion) or encoder passes after the prefill (greedy: one per generated token).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from canvaslm.llm import BUNDLED_MODEL, LLM, SamplingParams
from canvaslm.recipes.sudoku.data import (DIGIT_BASE_ID, EOS_ID, N_CELLS, SEP_ID, VOCAB_SIZE, encode_prompt,
                                          load_split, make_split)
from canvaslm.sampling.constraints import PinnedConstraint
from canvaslm.train.objective import greedy_ar_generate

DATA_DIR = Path("runs/sudoku/data/n45000_t600_h1000_s0")  # the recipe's split (seed 0), cached by training
NOT_DIGITS = tuple(t for t in range(VOCAB_SIZE) if not DIGIT_BASE_ID + 1 <= t <= DIGIT_BASE_ID + 9)


@dataclass(frozen=True)
class Row:
    method: str
    layout: str
    span: tuple
    steps: int | None
    passes: float
    cell_acc: float
    blank_acc: float
    exact: float
    seconds: float


def test_puzzles(n: int, data_dir: Path) -> list:
    """The first n puzzles of the recipe's test split (levels round-robin), never seen in training."""
    if (data_dir / "test.jsonl").exists():
        test = load_split(data_dir, validate=False).test
    else:  # test puzzles are drawn first from their own stream: the same for any n_train
        test = make_split(n_train=0, n_test=n, seed=0, n_test_hard=0).test
    if len(test) < n:
        raise SystemExit(f"error: the test split has {len(test)} puzzles, fewer than --n {n}")
    return test[:n]


def digits(grid: str) -> list:
    return [DIGIT_BASE_ID + int(c) for c in grid]


def l2r_prompt(ex, a: int, b: int, layout: str) -> list:
    prefix, suffix = digits(ex.solution[:a]), digits(ex.solution[b:])
    if layout == "append":
        return encode_prompt(ex.puzzle) + (suffix + [SEP_ID] if suffix else []) + prefix
    if layout == "givens":
        return encode_prompt(ex.puzzle[:b] + ex.solution[b:]) + prefix
    raise ValueError(f"unknown layout {layout!r}; expected 'append' or 'givens'")


def score(examples, middles, a: int, b: int) -> tuple:
    """(middle-cell accuracy, middle blank-cell accuracy, exact rate); middles: token-id lists."""
    right = blanks = blank_right = exact = 0
    for ex, mid in zip(examples, middles):
        want = digits(ex.solution[a:b])
        hits = [i < len(mid) and mid[i] == w for i, w in enumerate(want)]
        right += sum(hits)
        exact += all(hits)
        for i, hit in enumerate(hits):
            if ex.puzzle[a + i] == "0":
                blanks += 1
                blank_right += hit
    n = len(examples)
    return right / (n * (b - a)), blank_right / max(1, blanks), exact / n


def run_diffusion(llm, examples, a: int, b: int, steps: int, method: str, layout: str, seed: int) -> Row:
    t0 = time.time()
    prompts, params = [], []
    for i, ex in enumerate(examples):
        if method == "pin":
            pins = {N_CELLS: [EOS_ID]}
            if a > 0:
                pins[0] = digits(ex.solution[:a])
            if b < N_CELLS:
                pins[b] = digits(ex.solution[b:]) + [EOS_ID]
            # the middle may only take 1-9; [b, 81) and the EOS are pinned, so banning up to 81 is safe
            c = PinnedConstraint(pins, ban_ids=NOT_DIGITS, ban_until=N_CELLS)
            prompt, budget = encode_prompt(ex.puzzle), N_CELLS + 1
        elif method == "none":
            c = PinnedConstraint({N_CELLS: [EOS_ID]}, ban_ids=NOT_DIGITS, ban_until=N_CELLS)
            prompt, budget = encode_prompt(ex.puzzle), N_CELLS + 1
        else:
            c = PinnedConstraint({}, ban_ids=NOT_DIGITS, ban_until=b - a)
            prompt, budget = l2r_prompt(ex, a, b, layout), b - a
        prompts.append(prompt)
        params.append(SamplingParams(max_new_tokens=budget, max_denoising_steps=steps, seed=seed + i, constraint=c))
    outs = llm.generate(prompts, params)
    if method == "l2r":
        middles = [o.token_ids for o in outs]
    else:
        middles = [o.token_ids[a:b] for o in outs]
    if method == "pin":  # the pins must come back exactly
        for ex, o in zip(examples, outs):
            if o.token_ids[:a] != digits(ex.solution[:a]) or o.token_ids[b:] != digits(ex.solution[b:]) + [EOS_ID]:
                raise AssertionError(f"pinned prefix/suffix of span {a}-{b} not kept exactly")
    passes = sum(o.decoder_passes for o in outs) / len(outs)
    return Row(method, layout, (a, b), steps, passes, *score(examples, middles, a, b), time.time() - t0)


def run_greedy(model, examples, a: int, b: int, layout: str, name: str) -> Row:
    t0 = time.time()
    gen = greedy_ar_generate(model, [l2r_prompt(ex, a, b, layout) for ex in examples], b - a, (EOS_ID,))
    passes = sum(len(g) for g in gen) / len(gen)
    return Row(name, layout, (a, b), None, passes, *score(examples, gen, a, b), time.time() - t0)


def fmt(r: Row) -> str:
    steps = "greedy" if r.steps is None else str(r.steps)
    return (f"| {r.span[0]}-{r.span[1]} | {r.method} | {r.layout} | {steps} | {r.passes:.1f} | "
            f"{100 * r.cell_acc:.1f}% | {100 * r.blank_acc:.1f}% | {100 * r.exact:.0f}% |")


def spans(text: str) -> list:
    out = []
    for part in text.split(","):
        a, b = (int(x) for x in part.split(":"))
        if not 0 <= a < b <= N_CELLS:
            raise argparse.ArgumentTypeError(f"--spans: {part!r} must be a:b with 0 <= a < b <= {N_CELLS}")
        out.append((a, b))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="held-out test puzzles")
    ap.add_argument("--steps", default="4,12", help="denoising steps, comma-separated")
    ap.add_argument("--model", default=str(BUNDLED_MODEL), help="diffusion checkpoint (default: the bundled model)")
    ap.add_argument("--ar-model", default="runs/sudoku/ar/model", help="AR baseline checkpoint ('' to skip)")
    ap.add_argument("--spans", type=spans, default=spans("27:54,0:40,40:81,36:45"), help="middle cells a:b,...")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="cached recipe split (made if missing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]

    examples = test_puzzles(args.n, args.data)
    llm = LLM(args.model, device="cpu")
    ar = None
    if args.ar_model:
        try:
            from canvaslm.checkpoint import load_model
            ar = load_model(args.ar_model, device="cpu")
        except Exception as e:  # optional baseline: report and go on
            print(f"note: AR baseline {args.ar_model} not loaded ({e}); skipping it", file=sys.stderr)
    t0 = time.time()
    rows = []

    def add(row: Row) -> None:
        if row.span[1] == N_CELLS and row.layout == "append":  # no suffix: append and givens coincide
            row = replace(row, layout="append = givens (no suffix)")
        rows.append(row)
        print(fmt(row) + f" {row.seconds:.1f}s", file=sys.stderr, flush=True)

    for a, b in args.spans:
        layouts = ("append", "givens") if b < N_CELLS else ("append",)
        for s in steps:
            add(run_diffusion(llm, examples, a, b, s, "pin", "pinned canvas", args.seed))
            for layout in layouts:
                add(run_diffusion(llm, examples, a, b, s, "l2r", layout, args.seed))
            add(run_diffusion(llm, examples, a, b, s, "none", "no context", args.seed))
        for layout in layouts:
            add(run_greedy(llm.model, examples, a, b, layout, "l2r greedy (same ckpt)"))
            if ar is not None:
                add(run_greedy(ar, examples, a, b, layout, "l2r greedy (AR baseline)"))
    source = args.data if (args.data / "test.jsonl").exists() else "make_split seed 0"
    print(f"n={len(examples)} held-out test puzzles ({source}), model {args.model}, "
          f"AR baseline {args.ar_model if ar is not None else 'none'}, {args.threads} thread(s), "
          f"{time.time() - t0:.0f} s")
    print("| cells a-b | method | layout | steps | passes | middle cells | middle blanks | exact |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(fmt(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
