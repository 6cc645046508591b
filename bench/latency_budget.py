"""A latency budget (`max_time`) against the full denoising schedule, on the bundled Sudoku model, in the
same run.

    python bench/latency_budget.py [--n 64] [--level easy] [--steps 48] [--threads 2]

The peer solves a batch of puzzles with the full schedule (up to --steps denoising steps, the sampler's
early stop on). Then the same batch, seeds and steps run under budgets of 1/8, 1/4 and 1/2 of the
peer's wall time: after the budget (counted from the first denoising step) the canvas is committed as
its current draft. Printed: wall
milliseconds of the batch (prompt encoding included), its ratio to the peer, decoder passes per puzzle,
and exact solves / blank-cell accuracy. Puzzles come from the recipe's test split when it is cached under
runs/sudoku/data (else freshly generated with seed 1234).
"""

from __future__ import annotations

import argparse
import time

import torch

from canvaslm import LLM
from canvaslm.recipes.sudoku.eval import score
from canvaslm.recipes.sudoku.solve import solve


def puzzles(level: str, n: int):
    from canvaslm.recipes.sudoku.data import Example
    from canvaslm.recipes.sudoku.puzzles import format_grid, generate_puzzles
    from canvaslm.recipes.sudoku.train import Recipe

    d = Recipe.from_yaml().train.split_dir()
    if (d / "test_hard.jsonl").exists():
        from canvaslm.recipes.sudoku.data import load_split

        split = load_split(d, validate=False)
        exs = list(split.test_hard) if level == "hard (held-out)" else [e for e in split.test if e.level == level]
        return exs[:n], f"the test split ({d})"
    pairs = generate_puzzles(n, level.split()[0], seed=1234)
    return [Example(format_grid(p), format_grid(s), level) for p, s in pairs], "generated (seed 1234)"


def run(llm, exs, steps, max_time=None):
    t = time.perf_counter()
    res = solve(llm, [e.puzzle for e in exs], steps=steps, batch_size=len(exs), max_time=max_time)
    ms = 1e3 * (time.perf_counter() - t)
    solved, cells = score(exs, [r.solution for r in res])
    return ms, sum(r.decoder_passes for r in res) / len(res), solved, cells


def setup(description: str):
    """(args, the bundled model, the puzzles, where they came from) for a Sudoku batch benchmark."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--n", type=int, default=64, help="puzzles in the batch")
    ap.add_argument("--level", default="easy", choices=["easy", "medium", "hard", "hard (held-out)"])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return (args, LLM(), *puzzles(args.level, args.n))


def main() -> None:
    args, llm, exs, source = setup(__doc__.splitlines()[0])
    run(llm, exs[:4], args.steps)  # first-call setup out of the figures
    peer = run(llm, exs, args.steps)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads; bundled Sudoku model; {len(exs)} "
          f"{args.level} puzzles from {source}, one batch; up to {args.steps} steps")
    print("| budget | ms | vs the peer | decoder passes / puzzle | solved | cells |")
    print("|---|---|---|---|---|---|")
    print(f"| none (peer) | {peer[0]:.0f} | 1.00x | {peer[1]:.1f} | {100 * peer[2]:.1f}% | {100 * peer[3]:.1f}% |")
    for share in (1 / 8, 1 / 4, 1 / 2):
        budget = share * peer[0] / 1e3
        ms, passes, solved, cells = run(llm, exs, args.steps, max_time=budget)
        print(f"| {1e3 * budget:.0f} ms ({share:g} of the peer's time) | {ms:.0f} | {ms / peer[0]:.2f}x | "
              f"{passes:.1f} | {100 * solved:.1f}% | {100 * cells:.1f}% |")


if __name__ == "__main__":
    main()
