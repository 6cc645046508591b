"""Sudoku data: fixed-seed train/test splits, the tiny token layout, and JSONL I/O.

Token layout (VOCAB_SIZE = 832):
    prompt = [BOS] + 81 cell tokens + [SEP]                       -> PROMPT_LEN = 83
    target = 81 digit tokens + [EOS]                              -> TARGET_LEN = 82
A prompt cell token names its cell and its content: CELL_BASE_ID + 10 * cell + digit (digit 0 = blank),
810 tokens written `<r{row}c{col}:{digit}>` (1-based row/col). The model's attention is otherwise
position-relative (RoPE) and the answer canvas is bidirectional, so without them a cell has no cheap
way to know its row and box; with them the prompt's keys carry row/column/box identity, and an answer
cell finds its own by reading the prompt token exactly PROMPT_LEN - 1 positions back. Answer tokens are
plain digits (ids 3..12), so the canvas vocabulary, its noise and its constraints stay the same.
No torch here: a trainer imports the constants and turns the lists into tensors itself.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

from canvaslm.recipes.sudoku.puzzles import (
    LEVELS,
    as_grid,
    format_grid,
    generate_puzzle,
    is_valid_solution,
    parse_puzzle,
)

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
DIGIT_BASE_ID = 3  # ids 3..12 are the digits '0'..'9'
SEP_ID = 13  # '|' between the puzzle and the answer
# 14 and 15 are reserved.
N_CELLS = 81
CELL_BASE_ID = 16  # prompt cell tokens: CELL_BASE_ID + 10 * cell + digit
VOCAB_SIZE = 832  # 16 + 810 cell tokens, rounded up to a multiple of 64 (826..831 reserved)
PROMPT_LEN = 1 + N_CELLS + 1
TARGET_LEN = N_CELLS + 1
ID_TO_TOKEN = {PAD_ID: "<pad>", EOS_ID: "<eos>", BOS_ID: "<bos>", SEP_ID: "|", 14: "<r14>", 15: "<r15>"}
ID_TO_TOKEN.update({DIGIT_BASE_ID + d: str(d) for d in range(10)})
ID_TO_TOKEN.update({CELL_BASE_ID + 10 * c + d: f"<r{c // 9 + 1}c{c % 9 + 1}:{d}>" for c in range(N_CELLS)
                    for d in range(10)})
ID_TO_TOKEN.update({t: f"<r{t}>" for t in range(CELL_BASE_ID + 10 * N_CELLS, VOCAB_SIZE)})


class Example(NamedTuple):
    """One puzzle: 81-char strings ('0' for blanks) and its level name."""

    puzzle: str
    solution: str
    level: str


@dataclass(frozen=True)
class Split:
    """A train split, a test split over the same levels, and a held-out hard-only test split.

    No puzzle (and no solution grid) appears in more than one of them.
    """

    train: list[Example]
    test: list[Example]
    test_hard: list[Example]


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _generate(n: int, levels: Sequence[str], rng: random.Random, seen: set[str]) -> list[Example]:
    """`n` examples cycling through `levels`, skipping anything whose puzzle or solution is in `seen`."""
    out: list[Example] = []
    while len(out) < n:
        level = levels[len(out) % len(levels)]
        puzzle, solution = generate_puzzle(rng, level)
        p, s = format_grid(puzzle), format_grid(solution)
        if p in seen or s in seen:
            continue
        seen.add(p)
        seen.add(s)
        out.append(Example(p, s, level))
    return out


def make_split(
    n_train: int,
    n_test: int,
    seed: int,
    levels: Sequence[str] = ("easy", "medium", "hard"),
    n_test_hard: int | None = None,
) -> Split:
    """Deterministic train/test/test_hard examples for `seed`.

    Levels are interleaved round-robin. `test_hard` (default size `n_test`) is all 'hard'. Each
    split draws from its own seeded stream, and the test splits are made first, so the test sets
    do not change when `n_train` does.
    """
    levels = tuple(levels)
    if not levels:
        raise ValueError("levels must name at least one level")
    for lvl in levels:
        if lvl not in LEVELS:
            raise ValueError(f"unknown level {lvl!r}; expected one of {sorted(LEVELS)}")
    if min(n_train, n_test) < 0 or (n_test_hard is not None and n_test_hard < 0):
        raise ValueError(f"split sizes must be >= 0, got n_train={n_train}, n_test={n_test}, "
                         f"n_test_hard={n_test_hard}")
    n_test_hard = n_test if n_test_hard is None else n_test_hard
    seen: set[str] = set()
    # String seeds hash deterministically (sha512), independent of PYTHONHASHSEED.
    test = _generate(n_test, levels, random.Random(f"sudoku:{seed}:test"), seen)
    test_hard = _generate(n_test_hard, ("hard",), random.Random(f"sudoku:{seed}:test_hard"), seen)
    train = _generate(n_train, levels, random.Random(f"sudoku:{seed}:train"), seen)
    return Split(train=train, test=test, test_hard=test_hard)


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def _digit_ids(grid: str | Sequence[int]) -> list[int]:
    return [DIGIT_BASE_ID + v for v in as_grid(grid)]


def encode_prompt(puzzle: str | Sequence[int]) -> list[int]:
    """[BOS] + 81 cell tokens (cell index and digit, blank = 0) + [SEP]; length PROMPT_LEN."""
    return [BOS_ID] + [CELL_BASE_ID + 10 * c + v for c, v in enumerate(as_grid(puzzle))] + [SEP_ID]


def decode_prompt(token_ids: Iterable[int]) -> str | None:
    """The puzzle (81 chars, '0' = blank) of an `encode_prompt` token list, or None if it is not one."""
    ids = [int(t) for t in token_ids]
    if len(ids) != PROMPT_LEN or ids[0] != BOS_ID or ids[-1] != SEP_ID:
        return None
    chars = []
    for c, t in enumerate(ids[1:-1]):
        d = t - CELL_BASE_ID - 10 * c
        if not 0 <= d <= 9:
            return None
        chars.append(chr(48 + d))
    return "".join(chars)


def encode_target(solution: str | Sequence[int]) -> list[int]:
    """81 digit tokens + [EOS]; length TARGET_LEN."""
    return _digit_ids(solution) + [EOS_ID]


def encode_grids(puzzles, solutions):
    """Tensor form of `encode_prompt(p) + encode_target(s)` for [B, 81] long digit grids (0 = blank in
    puzzles): [B, PROMPT_LEN + TARGET_LEN] token ids, for batches built without a per-puzzle loop."""
    import torch

    B = puzzles.shape[0]
    col = lambda v: torch.full((B, 1), v, dtype=torch.long, device=puzzles.device)  # noqa: E731
    cells = CELL_BASE_ID + 10 * torch.arange(N_CELLS, device=puzzles.device) + puzzles  # [B, 81]
    return torch.cat([col(BOS_ID), cells, col(SEP_ID), DIGIT_BASE_ID + solutions, col(EOS_ID)], 1)


def decode_solution(token_ids: Iterable[int]) -> str | None:
    """The target region's first 81 tokens as an 81-char digit string.

    None if there are fewer than 81 tokens or any of the first 81 is not a digit token: a model
    that emits pad/eos/sep inside the grid has not produced a grid. Accepts any iterable of ints
    (a list, a numpy array, or a tensor's `.tolist()`).
    """
    chars = []
    for tok in token_ids:
        if len(chars) == N_CELLS:
            break
        d = int(tok) - DIGIT_BASE_ID
        if not 0 <= d <= 9:
            return None
        chars.append(chr(48 + d))
    return "".join(chars) if len(chars) == N_CELLS else None


def detokenize(token_ids: Iterable[int]) -> str:
    """Human-readable token string, for logs and debugging."""
    return "".join(ID_TO_TOKEN.get(int(t), f"<{int(t)}>") for t in token_ids)


# ---------------------------------------------------------------------------------------------
# JSONL I/O
# ---------------------------------------------------------------------------------------------


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> int:
    """One {"puzzle", "solution", "level"} object per line; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"puzzle": ex[0], "solution": ex[1], "level": ex[2]}) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike, validate: bool = True) -> list[Example]:
    """Read examples written by `write_jsonl`; with `validate`, check each solution fits its puzzle."""
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ex = Example(str(obj["puzzle"]), str(obj["solution"]), str(obj["level"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with puzzle, solution, level ({e})") from e
            try:  # '0' blanks from here on ('.' is read too), as scoring and training count them
                ex = Example(format_grid(parse_puzzle(ex.puzzle)), format_grid(parse_puzzle(ex.solution)), ex.level)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            if validate and not is_valid_solution(ex.puzzle, ex.solution):
                raise ValueError(f"{path}:{lineno}: solution does not solve the puzzle")
            out.append(ex)
    return out


def save_split(directory: str | os.PathLike, split: Split) -> None:
    """Write train.jsonl, test.jsonl and test_hard.jsonl under `directory` (created if missing)."""
    os.makedirs(directory, exist_ok=True)
    for name in ("train", "test", "test_hard"):
        write_jsonl(os.path.join(directory, f"{name}.jsonl"), getattr(split, name))


def load_split(directory: str | os.PathLike, validate: bool = True) -> Split:
    """Read a split written by `save_split`."""
    return Split(**{name: read_jsonl(os.path.join(directory, f"{name}.jsonl"), validate)
                    for name in ("train", "test", "test_hard")})
