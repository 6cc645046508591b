"""`canvaslm sudoku solve | eval | train`: the Sudoku recipe from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from canvaslm.cli import add_load_args
from canvaslm.recipes.sudoku.train import RECIPE_PATH


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be comma-separated integers, got {text!r}") from None
    if not steps or any(s <= 0 for s in steps):
        raise argparse.ArgumentTypeError(f"--steps must list positive integers, got {text!r}")
    return list(dict.fromkeys(steps))  # 4,4 would run twice for one row of the table


def _threads(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: torch's default), got {text!r}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def _set_threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _llm(args):
    from canvaslm.llm import LLM
    from canvaslm.recipes.sudoku.eval import model_problem

    llm = LLM(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
              sampler_impl=getattr(args, "sampler_impl", "auto"))
    problem = model_problem(llm.model.cfg)
    if problem:
        raise ValueError(f"--model {args.model}: {problem}")  # cli.main: "error: ...", exit status 2
    return llm


def _solve(args) -> int:
    from canvaslm.recipes.sudoku.puzzles import count_solutions
    from canvaslm.recipes.sudoku.solve import normalize_puzzle, solve

    _set_threads(args)
    puzzles = []
    for i, p in enumerate(args.puzzles):
        try:
            puzzles.append(normalize_puzzle(p))
            if not count_solutions(puzzles[-1], limit=1):
                raise ValueError("it has no solution: no way to fill its blanks keeps each digit once per row, "
                                 "column and box")
        except ValueError as e:
            print(f"error: puzzle {i + 1} ({p[:20]!r}{'...' if len(p) > 20 else ''}): {e}", file=sys.stderr)
            return 2
    results = solve(_llm(args), puzzles, steps=args.steps, seed=args.seed, candidates=args.candidates)
    failed = 0
    for i, r in enumerate(results):
        print(r.solution if r.solution is not None else "?" * 81)
        if not r.solved:
            failed += 1
            print(f"warning: puzzle {i + 1}: the output (line {i + 1}) is not a valid solution of it", file=sys.stderr)
    return 1 if failed else 0


def _eval(args) -> int:
    from canvaslm.recipes.sudoku.eval import eval_ar, eval_diffusion, eval_sets, format_table, model_problem
    from canvaslm.recipes.sudoku.train import Recipe, load_or_make_split

    _set_threads(args)
    if args.ar_only and not args.ar_model:
        print("error: --ar-only needs --ar-model", file=sys.stderr)
        return 2
    if args.trace and args.ar_model:
        print("error: --trace follows the diffusion model's steps; it cannot be combined with --ar-model / "
              "--ar-only", file=sys.stderr)
        return 2
    ar = None
    if args.ar_model:  # loaded and checked first: a wrong model fails before any puzzle is read or run
        from canvaslm.checkpoint import load_model

        ar = load_model(args.ar_model, device=args.device or "cpu", dtype=args.dtype or "float32",
                        quantization=args.quantization)
        problem = model_problem(ar.cfg)
        if problem:
            print(f"error: --ar-model {args.ar_model}: {problem}", file=sys.stderr)
            return 2
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None
    recipe = Recipe.from_yaml(args.config)
    sets = eval_sets(load_or_make_split(recipe.train, print), args.n)
    if args.hard_only:
        sets = {"hard (held-out)": sets["hard (held-out)"]}
    if args.by_depth:
        from canvaslm.recipes.sudoku.eval import depth_sets

        sets = depth_sets(sets["hard (held-out)"], max(args.steps))
    if args.trace:
        from canvaslm.recipes.sudoku.eval import format_trace, trace_diffusion

        llm = _llm(args)
        for s in args.steps:
            for name, exs in sets.items():
                print(f"[{s} steps] " + format_trace(name, trace_diffusion(llm, exs, s, seed=args.seed,
                                                                           candidates=args.candidates)))
        return 0
    rows = []
    if not args.ar_only:
        rows += eval_diffusion(_llm(args), sets, args.steps, seed=args.seed, candidates=args.candidates, log=log)
    if ar is not None:
        rows += eval_ar(ar, sets, log=log)
    print(format_table(rows))
    return 0


def _train(args) -> int:
    from dataclasses import replace

    from canvaslm.recipes.sudoku.train import Recipe, train_recipe

    recipe = Recipe.from_yaml(args.config)
    if args.baseline:
        recipe = recipe.for_baseline()
    overrides = {k: v for k, v in (("threads", args.threads), ("device", args.device), ("max_steps", args.max_steps),
                                   ("max_seconds", args.max_seconds)) if v is not None}  # --max-seconds 0: no limit
    recipe = replace(recipe, train=replace(recipe.train, **overrides))
    out = args.out or f"runs/sudoku/{recipe.train.objective}"
    final = train_recipe(recipe, out, resume=not args.no_resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"model written to {final}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sudoku", help="solve, evaluate or train the Sudoku model")
    sub = p.add_subparsers(dest="sudoku_command", required=True)

    def common(q):
        q.add_argument("--model", default=None, help="model dir (default: the bundled Sudoku model)")
        add_load_args(q)
        q.add_argument("--seed", type=int, default=0, help="sampling seed (puzzle i uses seed + i)")
        q.add_argument("--candidates", action="store_true",
                       help="also forbid digits already given in a cell's row/column/box (off by default)")
        q.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's; 1 on a busy CPU)")

    s = sub.add_parser("solve", help="solve puzzles; prints one line of 81 digits per puzzle")
    common(s)
    s.add_argument("--steps", type=_positive, default=None, help="denoising steps (default: the model's, 12)")
    s.add_argument("puzzles", nargs="+", metavar="PUZZLE", help="81 characters, '1'-'9' givens, '0' or '.' blanks")
    s.set_defaults(func=_solve)

    e = sub.add_parser("eval", help="solve rate and cell accuracy vs denoising steps and difficulty")
    common(e)
    e.add_argument("--n", type=_positive, default=200, help="puzzles per difficulty subset (default 200)")
    e.add_argument("--steps", type=_steps_list, default=[4, 8, 12, 16, 48], help="e.g. 4,8,12,16,48")
    e.add_argument("--ar-model", default=None, help="AR baseline model dir (e.g. runs/sudoku/ar/model)")
    e.add_argument("--ar-only", action="store_true", help="skip the diffusion model (needs --ar-model)")
    e.add_argument("--hard-only", action="store_true", help="only the held-out hard split")
    e.add_argument("--by-depth", action="store_true",
                   help="only the held-out hard split, in columns by how many rounds of naked/hidden singles "
                        "finish a puzzle (within the largest --steps, more, or never)")
    e.add_argument("--config", default=str(RECIPE_PATH), help="recipe naming the data split")
    e.add_argument("-v", "--verbose", action="store_true", help="print each row as it is measured")
    e.add_argument("--trace", action="store_true",
                   help="instead of the table: per denoising step, how much of the draft is right and how many "
                        "blank cells the sampler has accepted (and how many of those are right)")
    e.set_defaults(func=_eval)

    t = sub.add_parser("train", help="train the Sudoku model (or, with --baseline, the AR baseline)")
    t.add_argument("--config", default=str(RECIPE_PATH), type=Path,
                   help="recipe YAML (data parallel: torchrun --nproc_per_node N -m canvaslm.cli sudoku train ...)")
    t.add_argument("--out", default=None, help="output dir (default runs/sudoku/<objective>)")
    t.add_argument("--baseline", action="store_true", help="train the autoregressive baseline instead")
    t.add_argument("--threads", type=_threads, default=None, help="torch threads (default: the recipe's)")
    t.add_argument("--device", default=None, help="cpu | cuda (default: the recipe's, cpu)")
    t.add_argument("--no-resume", action="store_true", help="start over even if OUT has a trainer state")
    t.add_argument("--max-steps", type=_positive, default=None, help="optimizer steps (default: the recipe's)")
    t.add_argument("--max-seconds", type=float, default=None,
                   help="stop after this much training time and save the model (default: the recipe's, no limit)")
    t.set_defaults(func=_train)
