"""`LLM.generate`'s static batch: rows whose canvas stopped leave the decoder calls, against every row
running every step (what the batch did before, and still does with a shared generator), in the same run.

    python bench/static_batch.py [--n 64] [--level easy] [--steps 48] [--threads 2]

The bundled Sudoku model solves one batch of puzzles (per-puzzle seeds) both ways. Each canvas stops at
its own step (the sampler's stable-and-confident rule), so the batch's slowest puzzle sets the number of
steps while most rows have stopped long before. Printed: wall milliseconds, rows run through the
decoder (summed over steps), the ratio, and whether the outputs are identical (they must be).
"""

from __future__ import annotations

import time

import torch

from canvaslm import SamplingParams
from canvaslm.generate import generate_rows
from canvaslm.recipes.sudoku.data import TARGET_LEN, encode_prompt
from canvaslm.recipes.sudoku.solve import SudokuConstraint

from latency_budget import setup  # bench/ is on sys.path when this script runs


def run(llm, exs, steps, drop: bool):
    params = [SamplingParams(max_new_tokens=TARGET_LEN, max_denoising_steps=steps, seed=i,
                             constraint=SudokuConstraint(e.puzzle)) for i, e in enumerate(exs)]
    rows = llm.rows([encode_prompt(e.puzzle) for e in exs], params)
    gens = [torch.Generator().manual_seed(i) for i in range(len(exs))]
    calls = []
    denoise = llm.model.denoise

    def counted(canvas, *a, **kw):
        calls.append(canvas.shape[0])
        return denoise(canvas, *a, **kw)

    llm.model.denoise = counted
    try:
        t = time.perf_counter()
        outs = generate_rows(llm.model, rows, gens, drop_stopped=drop)
        ms = 1e3 * (time.perf_counter() - t)
    finally:
        llm.model.denoise = denoise
    return ms, sum(calls), len(calls), [o.token_ids for o in outs]


def main() -> None:
    args, llm, exs, source = setup(__doc__.splitlines()[0])
    run(llm, exs[:4], args.steps, True)  # first-call setup out of the figures
    keep = run(llm, exs, args.steps, False)
    drop = run(llm, exs, args.steps, True)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads; bundled Sudoku model; {len(exs)} "
          f"{args.level} puzzles from {source}, one batch, per-puzzle seeds, up to {args.steps} steps")
    print("| batch | ms | decoder calls | rows decoded | vs the peer |")
    print("|---|---|---|---|---|")
    print(f"| every row every step (peer) | {keep[0]:.0f} | {keep[2]} | {keep[1]} | 1.00x |")
    print(f"| stopped rows leave | {drop[0]:.0f} | {drop[2]} | {drop[1]} | {keep[0] / drop[0]:.2f}x faster |")
    print(f"outputs identical: {'yes' if keep[3] == drop[3] else 'NO'}")


if __name__ == "__main__":
    main()
