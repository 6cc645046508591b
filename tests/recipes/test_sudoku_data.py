"""Tests for the Sudoku recipe's data side: solver, generator, grader, splits and tokens."""

import hashlib
import json
import random
import time

import pytest

from canvaslm.recipes.sudoku import data, puzzles
from canvaslm.recipes.sudoku.puzzles import (
    LEVELS,
    as_grid,
    count_solutions,
    format_grid,
    generate_puzzle,
    generate_puzzles,
    is_valid_solution,
    needs_beyond_naked_singles,
    parse_puzzle,
    singles_rounds,
    solve,
)

# Arto Inkala's "world's hardest sudoku" (2012) and its published solution.
HARD = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."
HARD_SOLUTION = "812753649943682175675491283154237896369845721287169534521974368438526917796318452"
# A puzzle solvable by naked singles alone (few blanks, each forced by its peers).
EASY = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
# Norvig's "impossible" puzzle (no solution, though no cell is out of digits) and his hard1 (several
# solutions): search that only branches on cells stalls on them for minutes, singles propagation or not.
NO_SOLUTION = ".....5.8....6.1.43..........1.5........1.6...3.......553.....61........4........."
SEVERAL = ".....6....59.....82....8....45........3........6..3.54...325..6.................."


def test_solver_on_known_hard_puzzle():
    assert format_grid(solve(HARD)) == HARD_SOLUTION
    assert count_solutions(HARD) == 1
    assert is_valid_solution(HARD, HARD_SOLUTION)


def test_count_solutions_stops_at_limit():
    assert count_solutions("0" * 81) == 2
    assert count_solutions("0" * 81, limit=5) == 5
    assert count_solutions(HARD_SOLUTION[:72] + "0" * 9) == 1  # a blank last row is forced
    # Contradictory grids: strings are rejected by the parser, int lists simply have no solution.
    assert solve([1, 1] + [0] * 79) is None and count_solutions([1, 1] + [0] * 79) == 0


def test_solver_settles_no_or_several_solutions_in_few_steps(monkeypatch):
    steps = []
    propagate = puzzles._propagate
    monkeypatch.setattr(puzzles, "_propagate", lambda *a: steps.append(1) or propagate(*a))
    assert count_solutions(NO_SOLUTION, limit=1) == 0 and solve(NO_SOLUTION) is None
    assert count_solutions(SEVERAL, limit=1) == 1 and count_solutions(SEVERAL, limit=5) == 5
    assert is_valid_solution(SEVERAL, solve(SEVERAL))
    assert len(steps) < 20_000, len(steps)  # about 2 * 2,600 (no solution) + 100: well under a second


def test_generator_output_is_pinned():
    """The seeded data splits (and the shipped model trained on them) depend on the generator's exact
    output: a solver change must not move it (these are the hashes before the propagating solver)."""
    want = {"easy": "7d376df46e356e5f", "medium": "8687443b718ff9d5", "hard": "21e0df998dac065d"}
    for level, digest in want.items():
        text = "".join(format_grid(p) + format_grid(s) for p, s in generate_puzzles(8, level, seed=2))
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest, level


def test_is_valid_solution_rejects_bad_grids():
    assert not is_valid_solution(HARD, HARD_SOLUTION[:-1] + "0")  # incomplete
    swapped = HARD_SOLUTION[1] + HARD_SOLUTION[0] + HARD_SOLUTION[2:]
    assert not is_valid_solution("0" * 81, swapped)  # breaks columns
    assert not is_valid_solution(HARD, "x" * 81)  # unparsable


@pytest.mark.parametrize("level", list(LEVELS))
def test_generated_puzzles_unique_and_in_range(level):
    lo, hi = LEVELS[level]
    for puzzle, solution in generate_puzzles(10, level, seed=7):
        assert lo <= 81 - puzzle.count(0) <= hi
        assert count_solutions(puzzle) == 1
        assert is_valid_solution(puzzle, solution)
        assert solve(puzzle) == solution


def test_hard_puzzles_need_more_than_naked_singles():
    assert needs_beyond_naked_singles(HARD)
    assert not needs_beyond_naked_singles(EASY)
    assert not needs_beyond_naked_singles(HARD_SOLUTION)
    for puzzle, _ in generate_puzzles(10, "hard", seed=3):
        assert needs_beyond_naked_singles(puzzle)


def test_singles_rounds_counts_parallel_deduction_depth():
    solution = as_grid(HARD_SOLUTION)
    assert singles_rounds(solution) == (0, solution)
    one_blank = solution[:40] + [0] + solution[41:]
    assert singles_rounds(one_blank) == (1, solution)
    chain = list(solution)  # row 0 blanked: every cell is a naked single (its column holds 8 digits)
    chain[:9] = [0] * 9
    assert singles_rounds(chain) == (1, solution)
    for puzzle, sol in generate_puzzles(6, "hard", seed=5):
        rounds, grid = singles_rounds(puzzle)
        assert all(g in (0, s) for g, s in zip(grid, sol))  # sound: only forced digits are written
        assert grid.count(0) < puzzle.count(0) or rounds == 0
    assert singles_rounds(HARD) == (0, as_grid(HARD))  # not one single to start from: it needs search


def test_generation_is_deterministic_for_a_seed():
    assert generate_puzzles(5, "hard", seed=11) == generate_puzzles(5, "hard", seed=11)
    assert generate_puzzles(5, "hard", seed=11) != generate_puzzles(5, "hard", seed=12)


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="unknown level 'expert'"):
        generate_puzzle(random.Random(0), "expert")


def test_parse_puzzle_accepts_dots_and_zeros():
    assert parse_puzzle(HARD) == parse_puzzle(HARD.replace(".", "0"))
    assert format_grid(parse_puzzle(HARD)) == HARD.replace(".", "0")
    rows = "\n".join(" ".join(HARD[i:i + 9]) for i in range(0, 81, 9))  # pasted as a grid: whitespace ignored
    assert parse_puzzle(rows) == parse_puzzle(HARD)


@pytest.mark.parametrize(
    "text, message",
    [
        ("123", "got 3$"),
        ("0" * 82, "81 characters \\(whitespace aside\\), got 82"),
        ("0" * 162, "got 162 \\(several puzzles\\? give each as its own argument\\)"),
        ("0" * 40 + "x" + "0" * 40, r"bad character 'x' at position 40 \(row 5, col 5\)"),
        ("55" + "0" * 79, "contradictory givens: digit 5 at position 0 .* position 1"),
        ("7" + "0" * 8 + "7" + "0" * 71, "contradictory givens: digit 7 at position 0 .* position 9"),
        ("1" + "0" * 9 + "1" + "0" * 70, "contradictory givens: digit 1 at position 0 .* position 10"),
    ],
)
def test_parse_errors_are_clear(text, message):
    with pytest.raises(ValueError, match=message):
        parse_puzzle(text)


def test_split_has_no_overlap_and_is_deterministic():
    split = data.make_split(30, 9, seed=5)
    assert len(split.train) == 30 and len(split.test) == 9 and len(split.test_hard) == 9
    train = {ex.puzzle for ex in split.train}
    test = {ex.puzzle for ex in split.test}
    hard = {ex.puzzle for ex in split.test_hard}
    assert len(train) == 30 and not train & test and not train & hard and not test & hard
    assert not {ex.solution for ex in split.train} & {ex.solution for ex in split.test + split.test_hard}
    assert {ex.level for ex in split.train} == {"easy", "medium", "hard"}
    assert all(ex.level == "hard" for ex in split.test_hard)
    for ex in split.train + split.test + split.test_hard:
        assert is_valid_solution(ex.puzzle, ex.solution)
    assert data.make_split(30, 9, seed=5) == split
    # The test sets do not depend on the train size.
    other = data.make_split(3, 9, seed=5)
    assert other.test == split.test and other.test_hard == split.test_hard


def test_split_jsonl_round_trip(tmp_path):
    split = data.make_split(6, 3, seed=1, levels=("easy",), n_test_hard=2)
    data.save_split(tmp_path, split)
    assert data.load_split(tmp_path) == split
    (tmp_path / "bad.jsonl").write_text('{"puzzle": "1"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        data.read_jsonl(tmp_path / "bad.jsonl")
    ex = split.train[0]  # '.' blanks are read as '0', as scoring and training count blanks
    (tmp_path / "dots.jsonl").write_text(json.dumps({"puzzle": ex.puzzle.replace("0", "."), "solution": ex.solution,
                                                     "level": ex.level}) + "\n")
    assert data.read_jsonl(tmp_path / "dots.jsonl") == [ex]


def test_token_layout_constants():
    assert data.VOCAB_SIZE == 832
    assert (data.PAD_ID, data.EOS_ID, data.BOS_ID, data.SEP_ID, data.CELL_BASE_ID) == (0, 1, 2, 13, 16)
    # answer digits are plain digit tokens; prompt cells name their cell and content
    assert data.encode_target("0" * 81)[0] == 3 and data.encode_target("9" + "0" * 80)[0] == 12
    assert data.encode_prompt("0" * 81)[1] == 16 and data.encode_prompt("9" + "0" * 80)[1] == 25
    assert data.encode_prompt("0" * 80 + "7")[81] == 16 + 10 * 80 + 7
    assert data.ID_TO_TOKEN[16 + 10 * 80 + 7] == "<r9c9:7>" and len(data.ID_TO_TOKEN) == data.VOCAB_SIZE


def test_encode_decode_round_trip():
    prompt = data.encode_prompt(HARD)
    target = data.encode_target(HARD_SOLUTION)
    assert len(prompt) == data.PROMPT_LEN and prompt[0] == data.BOS_ID and prompt[-1] == data.SEP_ID
    assert len(target) == data.TARGET_LEN and target[-1] == data.EOS_ID
    assert max(prompt + target) < data.VOCAB_SIZE
    assert data.decode_solution(target) == HARD_SOLUTION
    assert data.decode_prompt(prompt) == HARD.replace(".", "0")
    assert data.decode_solution(prompt[1:]) is None  # cell tokens are not answer digits
    assert data.decode_prompt(prompt[:-1]) is None and data.decode_prompt([prompt[0], *prompt[2:], 13]) is None
    assert data.detokenize(prompt).startswith("<bos><r1c1:8><r1c2:0>") and data.detokenize(prompt).endswith("|")


def test_decode_rejects_malformed():
    target = data.encode_target(HARD_SOLUTION)
    assert data.decode_solution(target[:80]) is None
    assert data.decode_solution([data.PAD_ID] + target) is None
    assert data.decode_solution(target[:40] + [data.EOS_ID] + target[41:]) is None


def test_hard_generation_speed():
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(20):
        generate_puzzle(rng, "hard")
    assert time.perf_counter() - start < 20.0
