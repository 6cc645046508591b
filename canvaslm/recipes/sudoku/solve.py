"""Solve Sudoku puzzles with a trained DiffusionGemma: one canvas, a few denoising steps.

The prompt is `encode_prompt(puzzle)`; the answer is one canvas of 82 tokens (81 cells + EOS). The
`SudokuConstraint` is canvas control, not solving: it pins the given digits and the EOS in place (they
are always accepted, never renoised) and lets every blank cell take only the digits 1-9. Optionally
(`candidates=True`, off by default and never used for the reported numbers unless stated) it also
removes, per blank cell, the digits that already appear among that cell's givens' row, column or box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from canvaslm.recipes.sudoku.data import (DIGIT_BASE_ID, EOS_ID, N_CELLS, PAD_ID, TARGET_LEN, decode_solution,
                                          encode_prompt)
from canvaslm.recipes.sudoku.puzzles import _PEERS, format_grid, is_valid_solution, parse_puzzle


class SudokuConstraint:
    """Canvas constraint for one puzzle: `.canvas(k, C, V) -> (pinned [C] long (-1 free), allowed [C, V] bool)`."""

    def __init__(self, puzzle: str | Sequence[int], candidates: bool = False):
        self.grid = parse_puzzle(puzzle) if isinstance(puzzle, str) else [int(v) for v in puzzle]
        self.candidates = candidates

    def min_new_tokens(self, canvas_length: int) -> int:
        return TARGET_LEN

    def canvas(self, k: int, C: int, V: int):
        if k > 0:  # the answer fits the first canvas; nothing to say about later ones
            return None, None
        if C < TARGET_LEN:
            raise ValueError(f"SudokuConstraint: canvas_length {C} is shorter than the {TARGET_LEN}-token answer")
        pinned = torch.full((C,), PAD_ID, dtype=torch.long)  # beyond the answer: padding
        allowed = torch.zeros(C, V, dtype=torch.bool)
        for i, v in enumerate(self.grid):
            if v:
                pinned[i] = DIGIT_BASE_ID + v
                allowed[i, DIGIT_BASE_ID + v] = True
                continue
            pinned[i] = -1
            banned = {self.grid[j] for j in _PEERS[i]} if self.candidates else set()
            for d in range(1, 10):
                allowed[i, DIGIT_BASE_ID + d] = d not in banned
        pinned[N_CELLS] = EOS_ID
        allowed[N_CELLS:, :] = False
        allowed[torch.arange(N_CELLS, C), pinned[N_CELLS:]] = True
        return pinned, allowed


@dataclass(frozen=True)
class SolveResult:
    puzzle: str
    solution: str | None  # 81 digits, or None when the output is not a grid
    solved: bool  # a valid completion of the puzzle
    decoder_passes: int


def normalize_puzzle(text: str) -> str:
    """'0'/'.' blanks -> an 81-char '0'-blank string; ValueError naming the problem otherwise."""
    return format_grid(parse_puzzle(text))


def solve(llm, puzzles: Sequence[str], steps: int | None = None, seed: int = 0, candidates: bool = False,
          batch_size: int = 128, on_draft=None, **sampling) -> list[SolveResult]:
    """Solve puzzles (81-char strings) with `llm` (a canvaslm.LLM). steps=None uses the checkpoint's
    default; `sampling` passes further SamplingParams fields (temperature, entropy_bound, ...). Each puzzle
    gets its own seed (seed + index), so a result does not depend on the batch it ran in.
    `on_draft(first, state)` sees the batch's CanvasState after every denoising step; `first` is the
    index of the batch's first puzzle."""
    from canvaslm.llm import SamplingParams

    if isinstance(puzzles, str):  # one puzzle given as such, not a sequence of its characters
        puzzles = [puzzles]
    puzzles = [normalize_puzzle(p) for p in puzzles]
    results: list[SolveResult] = []
    for lo in range(0, len(puzzles), batch_size):
        chunk = puzzles[lo:lo + batch_size]
        params = [SamplingParams(max_new_tokens=TARGET_LEN, max_denoising_steps=steps, seed=seed + lo + i,
                                 constraint=SudokuConstraint(p, candidates), **sampling)
                  for i, p in enumerate(chunk)]
        hook = (lambda k, st, lo=lo: on_draft(lo, st)) if on_draft is not None else None
        outs = llm.generate([encode_prompt(p) for p in chunk], params, on_draft=hook, use_tqdm=False)
        for p, out in zip(chunk, outs):
            sol = decode_solution(out.token_ids)
            ok = sol is not None and is_valid_solution(p, sol)
            results.append(SolveResult(p, sol, ok, out.decoder_passes))
    return results
