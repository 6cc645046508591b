"""Sudoku puzzles: a bitmask solver, a seeded unique-solution generator, and a technique grader.

A grid is a list of 81 ints in row-major order, 0 for a blank. Pure Python, no torch: the data
pipeline must run anywhere the trainer's CPU workers do.
"""

from __future__ import annotations

import random
from typing import Sequence

Grid = list[int]

# Given-count ranges per difficulty level (inclusive). 'hard' additionally needs more than
# naked singles, see `needs_beyond_naked_singles`.
LEVELS: dict[str, tuple[int, int]] = {
    "easy": (36, 45),
    "medium": (30, 35),
    "hard": (22, 29),
}

_ALL = 0x1FF  # nine candidate bits, bit d-1 for digit d
_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_POP = [bin(m).count("1") for m in range(512)]
# Digits (1..9) present in each mask, precomputed so the inner loop never does bit tricks.
_DIGITS = [tuple(d + 1 for d in range(9) if m >> d & 1) for m in range(512)]
# The 20 cells sharing a row, column or box with each cell.
_PEERS = [
    tuple(j for j in range(81) if j != i and (_ROW[j] == _ROW[i] or _COL[j] == _COL[i] or _BOX[j] == _BOX[i]))
    for i in range(81)
]


# ---------------------------------------------------------------------------------------------
# Parsing and formatting
# ---------------------------------------------------------------------------------------------


def parse_puzzle(s: str) -> Grid:
    """Parse 81 characters ('1'-'9' givens, '0' or '.' blanks; whitespace between them is ignored) into a grid.

    Raises ValueError naming the problem: wrong length, a bad character and its position, or two
    givens that contradict each other.
    """
    if not isinstance(s, str):
        raise ValueError(f"puzzle must be a str of 81 characters, got {type(s).__name__}")
    s = "".join(s.split())  # a grid pasted as 9 rows or with spaces between them
    if len(s) != 81:
        several = " (several puzzles? give each as its own argument)" if len(s) % 81 == 0 and s else ""
        raise ValueError(f"puzzle must have 81 characters (whitespace aside), got {len(s)}{several}")
    grid: Grid = []
    for i, ch in enumerate(s):
        if ch == ".":
            grid.append(0)
        elif "0" <= ch <= "9":
            grid.append(ord(ch) - 48)
        else:
            raise ValueError(f"bad character {ch!r} at position {i} (row {i // 9 + 1}, col {i % 9 + 1}); "
                             "expected '1'-'9', '0' or '.'")
    _check_no_contradiction(grid)
    return grid


def _check_no_contradiction(grid: Sequence[int]) -> None:
    for i, v in enumerate(grid):
        if v:
            for j in _PEERS[i]:
                if j > i and grid[j] == v:
                    raise ValueError(
                        f"contradictory givens: digit {v} at position {i} (row {i // 9 + 1}, col {i % 9 + 1}) "
                        f"and position {j} (row {j // 9 + 1}, col {j % 9 + 1}) share a unit")


def as_grid(x: str | Sequence[int]) -> Grid:
    """Accept an 81-char string or a sequence of 81 ints (0-9); return a fresh grid list."""
    if isinstance(x, str):
        return parse_puzzle(x)
    grid = [int(v) for v in x]
    if len(grid) != 81:
        raise ValueError(f"grid must have 81 cells, got {len(grid)}")
    for i, v in enumerate(grid):
        if not 0 <= v <= 9:
            raise ValueError(f"bad cell value {v} at position {i}; expected 0-9")
    return grid


def format_grid(grid: str | Sequence[int]) -> str:
    """Grid -> 81-digit string, '0' for blanks."""
    return "".join(str(v) for v in as_grid(grid))


def is_valid_solution(puzzle: str | Sequence[int], solution: str | Sequence[int]) -> bool:
    """True if `solution` is a complete, rule-abiding grid that keeps every given of `puzzle`."""
    try:
        p, s = as_grid(puzzle), as_grid(solution)
    except ValueError:
        return False
    if any(pv and pv != sv for pv, sv in zip(p, s)):
        return False
    if 0 in s:
        return False
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(s):
        bit = 1 << (v - 1)
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        if rows[r] & bit or cols[c] & bit or boxes[b] & bit:
            return False
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
    return True


# ---------------------------------------------------------------------------------------------
# Solver: bitmask candidates, naked and hidden singles to a fixed point, then a branch on the
# narrowest choice left: a cell's digits or the places of a unit's digit, as exact cover does
# ---------------------------------------------------------------------------------------------

_UNITS = [[j for j in range(81) if key[j] == u] for key in (_ROW, _COL, _BOX) for u in range(9)]


def _propagate(cand: list[int], queue: list[int]) -> bool:
    """Apply naked and hidden singles to candidate masks `cand`, in place, until neither fills a cell.

    `queue` holds cells fixed to one digit whose digit is not yet struck from their peers. False on
    a contradiction (a cell with no digit left, or a unit's digit with no place left).
    """
    while queue:
        while queue:  # naked singles: a fixed cell's digit leaves its 20 peers
            c = queue.pop()
            bit = cand[c]
            for p in _PEERS[c]:
                m = cand[p]
                if m & bit:
                    m ^= bit
                    if not m:
                        return False
                    cand[p] = m
                    if _POP[m] == 1:
                        queue.append(p)
        for unit in _UNITS:  # hidden singles: a digit with one place left in a unit goes there
            once = twice = 0
            for c in unit:
                m = cand[c]
                twice |= once & m
                once |= m
            if once != _ALL:
                return False
            only = once & ~twice
            if only:
                for c in unit:
                    m = cand[c] & only
                    if m and m != cand[c]:
                        if m & (m - 1):  # two digits that can only go in this one cell
                            return False
                        cand[c] = m
                        queue.append(c)
    return True


def _candidates(grid: Sequence[int]) -> list[int] | None:
    """Candidate masks of `grid` after propagation, or None if the givens already contradict."""
    cand = [1 << (v - 1) if v else _ALL for v in grid]
    return cand if _propagate(cand, [i for i, v in enumerate(grid) if v]) else None


def _narrowest(cand: list[int]) -> list[tuple[int, int]]:
    """The fewest ways to settle one open choice of propagated masks `cand`, as (cell, digit bit) pairs:
    the digits of the cell with the fewest candidates, or the places of a unit's digit if it has fewer
    still; empty once every cell is fixed. Branching on places as well as cells is what exact cover
    (Knuth's DLX) does; branching on cells alone can wander for minutes through a puzzle with no
    solution (Norvig's "impossible" one) even with singles propagation."""
    best, best_n = -1, 10
    for c in range(81):
        n = _POP[cand[c]]
        if 1 < n < best_n:
            best, best_n = c, n
            if n == 2:  # propagation leaves nothing narrower
                return [(c, 1 << (d - 1)) for d in _DIGITS[cand[c]]]
    if best < 0:
        return []
    options = [(best, 1 << (d - 1)) for d in _DIGITS[cand[best]]]
    for unit in _UNITS:
        # acc[k]: the digits with more than k places in the unit, for k < best_n
        acc = [0] * best_n
        for c in unit:
            m = cand[c]
            for k in range(best_n - 1, 0, -1):
                acc[k] |= acc[k - 1] & m
            acc[0] |= m
        for k in range(1, len(options) - 1):  # k + 1 places, fewer than the best so far
            exact = acc[k] & ~acc[k + 1]
            if exact:
                bit = exact & -exact
                options = [(c, bit) for c in unit if cand[c] & bit]
                break
    return options


def _count(cand: list[int], limit: int, found: list[Grid]) -> int:
    """Count the solutions of propagated masks `cand` up to `limit`; the first one found is appended to `found`."""
    options = _narrowest(cand)
    if not options:  # every cell fixed, and propagation let no clash through
        if not found:
            found.append([_DIGITS[m][0] for m in cand])
        return 1
    count = 0
    for c, bit in options:
        child = cand[:]
        child[c] = bit
        if _propagate(child, [c]):
            count += _count(child, limit - count, found)
            if count >= limit:
                break
    return count


def _solutions(grid: Sequence[int], limit: int, found: list[Grid]) -> int:
    cand = _candidates(grid)
    return 0 if cand is None else _count(cand, limit, found)


class _State:
    """Unit masks of used digits plus the list of empty cells; mutated in place while searching."""

    __slots__ = ("cells", "rows", "cols", "boxes", "empties")

    def __init__(self, grid: Sequence[int]):
        self.cells = list(grid)
        self.rows, self.cols, self.boxes = [0] * 9, [0] * 9, [0] * 9
        self.empties = []
        for i, v in enumerate(self.cells):
            if v:
                bit = 1 << (v - 1)
                self.rows[_ROW[i]] |= bit
                self.cols[_COL[i]] |= bit
                self.boxes[_BOX[i]] |= bit
            else:
                self.empties.append(i)


def _search(st: _State, limit: int, found: list[Grid], rng: random.Random | None = None) -> int:
    """Count solutions up to `limit` by plain MRV backtracking; the first one found is appended to `found`.

    Only `random_full_grid` uses it: its digit shuffles follow this exact search path, so the seeded
    puzzles (and the data splits the shipped model was trained on) depend on it. It can stall for
    minutes where the givens leave no solution or several; counting and solving use `_count`.
    """
    empties, rows, cols, boxes, cells = st.empties, st.rows, st.cols, st.boxes, st.cells
    if not empties:
        if not found:
            found.append(cells[:])
        return 1
    # MRV: the cell with the fewest candidates keeps the tree narrow; stop early on 0 or 1.
    best_k, best_mask, best_n = -1, 0, 10
    for k, c in enumerate(empties):
        m = ~(rows[_ROW[c]] | cols[_COL[c]] | boxes[_BOX[c]]) & _ALL
        n = _POP[m]
        if n < best_n:
            if n == 0:
                return 0
            best_k, best_mask, best_n = k, m, n
            if n == 1:
                break
    c = empties[best_k]
    empties[best_k] = empties[-1]
    empties.pop()
    r, co, b = _ROW[c], _COL[c], _BOX[c]
    digits = _DIGITS[best_mask]
    if rng is not None:
        digits = list(digits)
        rng.shuffle(digits)
    count = 0
    for d in digits:
        bit = 1 << (d - 1)
        cells[c] = d
        rows[r] |= bit
        cols[co] |= bit
        boxes[b] |= bit
        count += _search(st, limit - count, found, rng)
        rows[r] ^= bit
        cols[co] ^= bit
        boxes[b] ^= bit
        if count >= limit:
            break
    cells[c] = 0
    empties.append(c)
    empties[best_k], empties[-1] = empties[-1], empties[best_k]  # restore order for the caller
    return count


def count_solutions(puzzle: str | Sequence[int], limit: int = 2) -> int:
    """Number of solutions, stopping once `limit` are found (so 2 means 'two or more')."""
    return _solutions(as_grid(puzzle), limit, [])


def solve(puzzle: str | Sequence[int]) -> Grid | None:
    """One solution of the puzzle, or None if it has none."""
    found: list[Grid] = []
    _solutions(as_grid(puzzle), 1, found)
    return found[0] if found else None


def needs_beyond_naked_singles(puzzle: str | Sequence[int]) -> bool:
    """True if repeatedly filling cells that have exactly one candidate does not solve the puzzle.

    A cheap technique grade: puzzles that need only naked singles are trivial for a model that
    fills the most confident cells first, so 'hard' puzzles must require more.
    """
    st = _State(as_grid(puzzle))
    rows, cols, boxes, cells = st.rows, st.cols, st.boxes, st.cells
    progress = True
    while progress and st.empties:
        progress = False
        remaining = []
        for c in st.empties:
            m = ~(rows[_ROW[c]] | cols[_COL[c]] | boxes[_BOX[c]]) & _ALL
            n = _POP[m]
            if n == 0:
                return True  # contradiction: singles cannot finish it
            if n == 1:
                bit = m
                cells[c] = _DIGITS[m][0]
                rows[_ROW[c]] |= bit
                cols[_COL[c]] |= bit
                boxes[_BOX[c]] |= bit
                progress = True
            else:
                remaining.append(c)
        st.empties = remaining
    return bool(st.empties)


def singles_rounds(puzzle: str | Sequence[int]) -> tuple[int, Grid]:
    """Parallel rounds of naked and hidden singles: (rounds, grid reached).

    Each round fills, at once, every blank with a single candidate and every digit with a single place
    left in a row, column or box, all judged on the grid as it was when the round began: what a
    denoiser that commits only forced cells at each step could do. The grid keeps 0s when singles stall.
    A measure of depth: a puzzle needing r rounds needs at least r such steps.
    """
    grid = list(as_grid(puzzle))
    rounds = 0
    while 0 in grid:
        st = _State(grid)
        cand = {c: ~(st.rows[_ROW[c]] | st.cols[_COL[c]] | st.boxes[_BOX[c]]) & _ALL for c in st.empties}
        new = {c: _DIGITS[m][0] for c, m in cand.items() if _POP[m] == 1}
        for unit in _UNITS:  # a digit already in the unit is no blank's candidate there
            for d in range(1, 10):
                spots = [c for c in unit if cand.get(c, 0) >> (d - 1) & 1]
                if len(spots) == 1:
                    new[spots[0]] = d
        if not new:
            break
        for i, d in new.items():
            grid[i] = d
        rounds += 1
    return rounds, grid


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def random_full_grid(rng: random.Random) -> Grid:
    """A random complete grid: shuffled diagonal boxes, then MRV search with shuffled digit order."""
    grid = [0] * 81
    # Seeding the three diagonal boxes with permutations is always consistent and cuts search.
    for box in (0, 4, 8):
        digits = list(range(1, 10))
        rng.shuffle(digits)
        r0, c0 = (box // 3) * 3, (box % 3) * 3
        for k, d in enumerate(digits):
            grid[(r0 + k // 3) * 9 + c0 + k % 3] = d
    found: list[Grid] = []
    _search(_State(grid), 1, found, rng)
    return found[0]


def _removal_keeps_unique(st: _State, cell: int, value: int) -> bool:
    """With `cell` blanked in `st`, is `value` still the only digit it can take?

    The original grid is one solution, so uniqueness holds iff no solution has another digit there;
    searching for one is cheaper than counting to two.
    """
    others = ~(st.rows[_ROW[cell]] | st.cols[_COL[cell]] | st.boxes[_BOX[cell]]) & _ALL & ~(1 << (value - 1))
    for d in _DIGITS[others]:
        probe = st.cells[:]
        probe[cell] = d
        if _solutions(probe, 1, []):
            return False
    return True


def _dig(solution: Grid, target: int, rng: random.Random) -> Grid:
    """Blank cells of `solution` in random order while the solution stays unique, down to `target` givens."""
    st = _State(solution)
    givens = 81
    order = list(range(81))
    rng.shuffle(order)
    for cell in order:
        if givens <= target:
            break
        v = st.cells[cell]
        bit = 1 << (v - 1)
        st.cells[cell] = 0
        st.rows[_ROW[cell]] ^= bit
        st.cols[_COL[cell]] ^= bit
        st.boxes[_BOX[cell]] ^= bit
        if _removal_keeps_unique(st, cell, v):
            givens -= 1
        else:
            st.cells[cell] = v
            st.rows[_ROW[cell]] |= bit
            st.cols[_COL[cell]] |= bit
            st.boxes[_BOX[cell]] |= bit
    return st.cells[:]


def generate_puzzle(rng: random.Random, level: str = "medium") -> tuple[Grid, Grid]:
    """A (puzzle, solution) pair with a unique solution and a given count in LEVELS[level].

    Deterministic for a given `rng` state. 'hard' puzzles also need more than naked singles.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {sorted(LEVELS)}")
    lo, hi = LEVELS[level]
    while True:
        solution = random_full_grid(rng)
        # Digging stops at the sampled target, or earlier if every remaining given is needed.
        puzzle = _dig(solution, rng.randint(lo, hi), rng)
        givens = 81 - puzzle.count(0)
        if givens > hi:
            continue  # minimal puzzle above the range: start over from a new grid
        if level == "hard" and not needs_beyond_naked_singles(puzzle):
            continue
        return puzzle, solution


def generate_puzzles(n: int, level: str = "medium", seed: int = 0) -> list[tuple[Grid, Grid]]:
    """`n` (puzzle, solution) pairs from a fresh `random.Random(seed)`."""
    rng = random.Random(seed)
    return [generate_puzzle(rng, level) for _ in range(n)]
