"""Sudoku recipe: miniature training (loss falls, resume is exact), solve/eval/CLI plumbing, the shipped model."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from canvaslm.recipes.sudoku.data import (DIGIT_BASE_ID, EOS_ID, N_CELLS, PROMPT_LEN, TARGET_LEN, VOCAB_SIZE,
                                          Example, Split, make_split)
from canvaslm.recipes.sudoku.model_config import ModelShape, model_config
from canvaslm.recipes.sudoku.puzzles import is_valid_solution
from canvaslm.recipes.sudoku.train import Recipe, TensorSampler, TrainConfig, augment, lr_at, to_pairs, train_recipe

MINI_SHAPE = ModelShape(hidden_size=32, num_layers=2, num_heads=2, head_dim=16, num_kv_heads=1,
                        intermediate_size=32, num_experts=2, top_k_experts=1, moe_intermediate_size=16)
MINI_TRAIN = TrainConfig(batch_size=8, max_steps=40, lr=3e-3, warmup_steps=3, log_every=1, save_every=10,
                         threads=0)

# The first three puzzles of the seed-0 held-out hard split, with their solutions.
SHIPPED_HARD = [
    ("009010008035400006000000000000002000000051640008390015000200000700005060064930002",
     "249613578135478926687529431516742893923851647478396215351264789792185364864937152"),
    ("000007014080000000000000730007605000042300000016840003063100020020003040000090000",
     "239587614781436295654921738397615482842379156516842973963154827128763549475298361"),
    ("001000005005800060070030009060007000000300081000106003000050900019000008020090070",
     "641972835395814267872635149163587492257349681984126753736258914419763528528491376"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and extra threads only add contention on a busy CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mini_split() -> Split:
    return make_split(n_train=48, n_test=6, seed=123, n_test_hard=3)


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory, mini_split):
    out = tmp_path_factory.mktemp("sudoku_mini")
    model_dir = train_recipe(Recipe(MINI_SHAPE, MINI_TRAIN), out, log=lambda s: None, split=mini_split)
    return out, model_dir


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_shipped_recipe_loads_and_baseline_is_ar():
    r = Recipe.from_yaml()
    assert r.model.canvas_length == TARGET_LEN
    cfg = model_config(r.model)
    assert cfg.vocab_size == VOCAB_SIZE == 832 and cfg.layer_types[-1] == "full_attention"
    assert cfg.sliding_window >= 83 + cfg.canvas_length
    b = r.for_baseline()
    assert b.train.objective == "ar" and b.model == r.model and b.train.n_train == r.train.n_train


def test_recipe_rejects_unknown_keys(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ValueError, match="batch_sise"):
        Recipe.from_yaml(p)
    with pytest.raises(ValueError, match="canvas_length"):
        ModelShape(canvas_length=40)
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="mlm")
    with pytest.raises(ValueError, match="sc_passes"):
        TrainConfig(sc_passes=0)


def test_recipe_values_are_type_checked_naming_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 1e-4\n  weight_decay: 1e-2\n  grad_clip: null\n")  # YAML 1.1: '1e-4' is a string
    t = Recipe.from_yaml(p).train
    assert (t.lr, t.weight_decay, t.grad_clip) == (1e-4, 1e-2, None) and isinstance(t.lr, float)
    for text, msg in [("train:\n  lr: fast\n", "r.yaml: train.lr must be a number, got 'fast'"),
                      ("train:\n  batch_size: 8.0\n", "r.yaml: train.batch_size must be an integer, got 8.0"),
                      ("train:\n  augment: 'no'\n", "r.yaml: train.augment must be true or false, got 'no'"),
                      ("train:\n  grad_clip: -1\n", "r.yaml: train.grad_clip must be a number >= 0"),
                      ("train:\n  device: gpu\n", "r.yaml: train.device must be cpu | cuda | cuda:N"),
                      ("train:\n  threads: -1\n", "r.yaml: train.threads must be >= 0"),
                      ("baseline:\n  max_steps: '10'\n", "r.yaml: baseline: train.max_steps must be an integer"),
                      ("train: 3\n", "r.yaml: train must be a mapping, got 3"),
                      ("train: [1\n", "r.yaml: not valid YAML: expected ',' or ']'"),
                      ("train:\n  lr: 0.001\n  lr: 0.1\n", "r.yaml: not valid YAML: key 'lr' appears twice")]:
        p.write_text(text)
        with pytest.raises(ValueError) as e:
            Recipe.from_yaml(p)
        assert str(e.value).startswith(str(tmp_path)) and msg in str(e.value), (text, str(e.value))


def test_grad_clip_0_or_null_is_off(tmp_path, mini_split):
    def run(clip):
        cfg = replace(MINI_TRAIN, max_steps=3, save_every=3, grad_clip=clip)
        train_recipe(Recipe(MINI_SHAPE, cfg), tmp_path / str(clip), log=lambda s: None, split=mini_split)
        return [(r["loss"], r["grad_norm"]) for r in map(json.loads, (tmp_path / str(clip) / "log.jsonl")
                                                        .read_text().splitlines())]

    unclipped = run(1e9)
    assert run(0.0) == unclipped  # 0 used to zero every gradient
    assert run(None) == unclipped


def test_sc_passes_reaches_the_objective(tmp_path, mini_split):
    runs = {}
    for n in (1, 3):
        cfg = replace(MINI_TRAIN, max_steps=3, sc_passes=n)
        train_recipe(Recipe(MINI_SHAPE, cfg), tmp_path / str(n), log=lambda s: None, split=mini_split)
        runs[n] = _losses(tmp_path / str(n))
    assert runs[1] != runs[3]


def test_structured_embedding_shares_rows_columns_boxes_and_digits():
    from canvaslm.recipes.sudoku.data import CELL_BASE_ID
    from canvaslm.recipes.sudoku.train import structured_embedding

    w = structured_embedding((VOCAB_SIZE, 32), 0.02, seed=0)
    tok = lambda r, c, d: w[CELL_BASE_ID + 10 * (9 * r + c) + d]  # noqa: E731
    # a digit moves every cell token alike, and half as far as the answer's digit tokens move
    torch.testing.assert_close(tok(0, 0, 5) - tok(0, 0, 2), tok(7, 4, 5) - tok(7, 4, 2))
    torch.testing.assert_close(tok(3, 8, 5) - tok(3, 8, 2), (w[DIGIT_BASE_ID + 5] - w[DIGIT_BASE_ID + 2]) / 2)
    # moving a cell across the boxes of one band is the same move in every row of the band
    torch.testing.assert_close(tok(0, 0, 1) - tok(0, 3, 1), tok(2, 0, 7) - tok(2, 3, 7))
    assert not torch.allclose(tok(0, 0, 1) - tok(0, 3, 1), tok(3, 0, 1) - tok(3, 3, 1))  # another band, other boxes
    assert abs(float(w.std()) - 0.02) < 0.004
    torch.testing.assert_close(w, structured_embedding((VOCAB_SIZE, 32), 0.02, seed=0))


def test_embedding_init_reaches_the_model(tmp_path, mini_split):
    from canvaslm.checkpoint import load_model
    from canvaslm.recipes.sudoku.data import CELL_BASE_ID

    cfg = replace(MINI_TRAIN, max_steps=1, save_every=1, lr=1e-9, embedding_init="structured")
    out = train_recipe(Recipe(MINI_SHAPE, cfg), tmp_path, log=lambda s: None, split=mini_split)
    w = load_model(out).embed_weight
    d = lambda c, k: w[CELL_BASE_ID + 10 * c + k]  # noqa: E731
    torch.testing.assert_close(d(0, 5) - d(0, 2), d(40, 5) - d(40, 2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="train.embedding_init must be one of"):
        TrainConfig(embedding_init="grid")


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_augment_keeps_a_valid_puzzle(mini_split):
    rng = random.Random(0)
    for ex in mini_split.train[:10]:
        aug = augment(ex, rng)
        assert is_valid_solution(aug.puzzle, aug.solution)
        assert aug.puzzle.count("0") == ex.puzzle.count("0") and aug.level == ex.level


def test_miniature_training_loss_falls(mini_run):
    out, model_dir = mini_run
    losses = _losses(out)
    assert len(losses) == MINI_TRAIN.max_steps
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).exists()


@pytest.mark.parametrize("sampler", ["python", "tensor"])
def test_resume_continues_the_same_run(tmp_path, mini_split, sampler):
    short = Recipe(MINI_SHAPE, replace(MINI_TRAIN, max_steps=4, save_every=2, sampler=sampler))
    full_dir = train_recipe(short, tmp_path / "full", log=lambda s: None, split=mini_split)
    half = Recipe(MINI_SHAPE, replace(short.train, max_steps=2))
    train_recipe(half, tmp_path / "resumed", log=lambda s: None, split=mini_split)
    resumed_dir = train_recipe(short, tmp_path / "resumed", log=lambda s: None, split=mini_split)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "resumed")
    from safetensors.torch import load_file

    a, b = load_file(full_dir / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_kill_logs_each_step_once(tmp_path, mini_split):
    short = Recipe(MINI_SHAPE, replace(MINI_TRAIN, max_steps=4, save_every=2))
    train_recipe(short, tmp_path / "full", log=lambda s: None, split=mini_split)
    killed = tmp_path / "killed"
    train_recipe(Recipe(MINI_SHAPE, replace(short.train, max_steps=2)), killed, log=lambda s: None, split=mini_split)
    with open(killed / "log.jsonl", "a") as f:  # step 3 was logged, then the run died before saving it
        f.write(json.dumps({"step": 3, "loss": 99.0}) + "\n")
    train_recipe(short, killed, log=lambda s: None, split=mini_split)
    assert _losses(killed) == _losses(tmp_path / "full")
    train_recipe(Recipe(MINI_SHAPE, replace(short.train, max_steps=1)), killed, log=lambda s: None,
                 split=mini_split, resume=False)  # a fresh run starts a fresh log
    assert _losses(killed) == _losses(tmp_path / "full")[:1]


def test_constraint_pins_givens_and_eos():
    from canvaslm.recipes.sudoku.solve import SudokuConstraint

    puzzle = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
    pinned, allowed = SudokuConstraint(puzzle).canvas(0, TARGET_LEN, 16)
    assert pinned[0] == DIGIT_BASE_ID + 5 and pinned[2] == -1 and pinned[N_CELLS] == EOS_ID
    assert allowed[2].nonzero().flatten().tolist() == [DIGIT_BASE_ID + d for d in range(1, 10)]
    _, cand = SudokuConstraint(puzzle, candidates=True).canvas(0, TARGET_LEN, 16)
    # cell 2 (row 1, col 3) sees 5, 3, 7 in its row, 8 in its column and 6, 9 in its box
    assert cand[2].nonzero().flatten().tolist() == [DIGIT_BASE_ID + d for d in (1, 2, 4)]
    assert SudokuConstraint(puzzle).canvas(1, TARGET_LEN, 16) == (None, None)


def test_solve_and_eval_plumbing(mini_run, mini_split):
    from canvaslm.checkpoint import load_model
    from canvaslm.llm import LLM
    from canvaslm.recipes.sudoku.eval import eval_ar, eval_diffusion, eval_sets, format_table, score
    from canvaslm.recipes.sudoku.solve import solve

    _, model_dir = mini_run
    llm = LLM(model_dir, device="cpu")
    exs = mini_split.test_hard
    res = solve(llm, [e.puzzle.replace("0", ".") for e in exs], steps=2)
    for ex, r in zip(exs, res):
        assert r.solution is not None and len(r.solution) == 81 and "0" not in r.solution
        assert all(p == "0" or p == s for p, s in zip(ex.puzzle, r.solution))  # givens are pinned
        assert r.solved == is_valid_solution(ex.puzzle, r.solution) and 1 <= r.decoder_passes <= 2
    assert [r.solution for r in solve(llm, [exs[0].puzzle], steps=2)] == [res[0].solution]  # batch-invariant
    assert [r.solution for r in solve(llm, exs[0].puzzle, steps=2)] == [res[0].solution]  # one puzzle, as a str
    sets = {k: v[:2] for k, v in eval_sets(mini_split).items()}
    rows = eval_diffusion(llm, sets, steps=(1, 2)) + eval_ar(load_model(model_dir), sets)
    assert len(rows) == 3 * len(sets)
    table = format_table(rows)
    assert "hard (held-out)" in table and "autoregressive baseline" in table
    assert score([Example("0" * 81, exs[0].solution, "hard")], [exs[0].solution]) == (1.0, 1.0)


def test_depth_sets_split_by_singles_rounds(mini_split):
    from canvaslm.recipes.sudoku.eval import depth_sets
    from canvaslm.recipes.sudoku.puzzles import singles_rounds

    exs = list(mini_split.test) + list(mini_split.test_hard)
    sets = depth_sets(exs, steps=4)
    assert sorted(e.puzzle for v in sets.values() for e in v) == sorted(e.puzzle for e in exs)
    for name, group in sets.items():
        for e in group:
            rounds, grid = singles_rounds(e.puzzle)
            if name == "singles stall":
                assert 0 in grid
            else:
                assert 0 not in grid and (rounds <= 4) == (name == "singles <= 4 rounds")


def test_cli_solve(mini_run, mini_split, capsys):
    from canvaslm.cli import main

    _, model_dir = mini_run
    puzzle = mini_split.test_hard[0].puzzle
    rows = " ".join(puzzle[i:i + 9].replace("0", ".") for i in range(0, 81, 9))  # pasted as rows: the same
    rc = main(["sudoku", "solve", "--model", str(model_dir), "--steps", "2", puzzle, rows])
    out = capsys.readouterr()
    lines = out.out.split()
    assert rc in (0, 1) and len(lines) == 2 and all(len(x) == 81 and x.isdigit() for x in lines)
    assert lines[0] == lines[1] or rc == 1
    for i, line in enumerate(lines):  # a warning names the puzzle it is about
        assert (f"puzzle {i + 1}:" in out.err) == (not is_valid_solution(puzzle, line))
    assert main(["sudoku", "solve", "--model", str(model_dir), puzzle * 2]) == 2
    assert "several puzzles?" in capsys.readouterr().err
    assert main(["sudoku", "solve", "--model", str(model_dir), "12x"]) == 2
    assert "81 characters" in capsys.readouterr().err
    assert main(["sudoku", "solve", "--model", str(model_dir), "11" + "0" * 79]) == 2
    assert "contradictory" in capsys.readouterr().err
    assert main(["sudoku", "solve", "--model", str(model_dir), "012345678" + "0" * 9 + "900" + "0" * 60]) == 2
    assert "has no solution" in capsys.readouterr().err  # no clash, but no digit is left for the first cell
    impossible = ".....5.8....6.1.43..........1.5........1.6...3.......553.....61........4........."  # Norvig's
    assert main(["sudoku", "solve", "--model", str(model_dir), impossible]) == 2  # at once, not after minutes
    err = capsys.readouterr().err  # every cell keeps a candidate digit: the error must not say otherwise
    assert "puzzle 1 ('.....5.8....6.1.43..'...): it has no solution: no way to fill its blanks" in err
    assert main(["sudoku", "solve", "--model", str(model_dir), "--dtype", "bfloat16", "--steps", "2", puzzle]) in (0, 1)
    assert len(capsys.readouterr().out.split()[0]) == 81
    assert main(["sudoku", "solve", "--model", str(model_dir), "--dtype", "float99", puzzle]) == 2
    assert "float99" in capsys.readouterr().err
    assert main(["sudoku", "solve", "--model", str(model_dir), "--quantization", "int4", "--steps", "2", puzzle]) in (0, 1)
    assert len(capsys.readouterr().out.split()[0]) == 81
    with pytest.raises(SystemExit) as e:  # argparse: exit 2
        main(["sudoku", "solve", "--model", str(model_dir), "--threads", "-1", puzzle])
    assert e.value.code == 2 and "--threads: must be >= 0" in capsys.readouterr().err


def test_cli_eval_refuses_what_it_cannot_evaluate(mini_run, tmp_path, capsys):
    from canvaslm.cli import main
    from canvaslm.testing import make_tiny_checkpoint

    model_dir = mini_run[1]
    other = make_tiny_checkpoint(tmp_path / "not_sudoku")
    base = ["sudoku", "eval", "--model", str(model_dir), "--n", "1", "--steps", "1"]  # refused before any puzzle
    assert main([*base, "--ar-only", "--ar-model", str(other)]) == 2
    assert "its vocabulary has" in capsys.readouterr().err
    assert main([*base, "--trace", "--ar-model", str(model_dir)]) == 2
    assert "--trace follows the diffusion model's steps" in capsys.readouterr().err
    # the diffusion model is checked as the baseline is, with the same exit status as every named error
    assert main(["sudoku", "eval", "--model", str(other), "--n", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and "its vocabulary has" in err
    with pytest.raises(SystemExit) as e:  # argparse: exit 2, with the option's own message
        main(["sudoku", "eval", "--model", str(model_dir), "--n", "x"])
    assert e.value.code == 2 and "--n: must be a positive integer, got 'x'" in capsys.readouterr().err


def test_cli_eval_steps_run_once_each_in_order():
    from canvaslm.recipes.sudoku.cli import _steps_list

    assert _steps_list("8,4,8, 4,12") == [8, 4, 12]


def test_cli_train_names_a_missing_cuda_device(tmp_path, capsys):
    import torch

    from canvaslm.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(["sudoku", "train", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "device 'cuda': this machine has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_eval_ar_only_sets_threads(mini_run, monkeypatch):
    import torch

    from canvaslm.cli import main

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    main(["sudoku", "eval", "--ar-only", "--ar-model", str(mini_run[1]), "--threads", "1", "--n", "1", "--hard-only"])
    assert calls == [1]


def _shipped_llm():
    from canvaslm.llm import BUNDLED_MODEL, LLM

    if not (BUNDLED_MODEL / "model.safetensors").exists():
        pytest.skip("no shipped Sudoku model in this checkout")
    return LLM(device="cpu")


def test_shipped_model_fills_hard_grids_at_12_steps():
    from canvaslm.recipes.sudoku.eval import score
    from canvaslm.recipes.sudoku.solve import solve

    llm = _shipped_llm()
    assert llm.defaults.max_denoising_steps <= 12 and llm.cfg.canvas_length == TARGET_LEN
    puzzles = [p for p, _ in SHIPPED_HARD]
    results = solve(llm, puzzles)
    for (p, _), r in zip(SHIPPED_HARD, results):
        assert r.solution is not None and r.decoder_passes <= 12
        assert all(a == "0" or a == b for a, b in zip(p, r.solution))
    _, cells = score([Example(p, s, "hard") for p, s in SHIPPED_HARD], [r.solution for r in results])
    # docs/sudoku.md: ~62% of blank cells on the held-out hard split (guessing a digit: 11%); on these
    # three puzzles 45-55% over sampling seeds 0-7 (47% at seed 0)
    assert cells >= 0.3, cells


# Easy puzzles (36-45 givens) of the seed-0 mixed test split that the shipped model solves at 12 steps
# (it solves 76% of that split's easy puzzles).
SHIPPED_EASY = [
    ("000205804850007192213498050006040309100952460000706500000070003325684901907103080",
     "769215834854367192213498756576841329138952467492736518681579243325684971947123685"),
    ("910500037843000590000009128080000200490012300075340981024090003609084700100020009",
     "912568437843271596567439128381957264496812375275346981724695813639184752158723649"),
    ("109000470500197008038020016902501083405000090603978524057300049341700000200004357",
     "129683475564197238738425916972541683485236791613978524857362149341759862296814357"),
]


def test_shipped_model_solves_easy_puzzles_at_12_steps():
    from canvaslm.recipes.sudoku.solve import solve

    results = solve(_shipped_llm(), [p for p, _ in SHIPPED_EASY], steps=12)
    assert [r.solution for r in results] == [s for _, s in SHIPPED_EASY]
    assert all(r.solved for r in results)


@pytest.mark.xfail(reason="the CPU-trained shipped model is far below the 95% target (docs/sudoku.md)",
                   strict=False)
def test_shipped_model_solves_fixed_hard_puzzles():
    from canvaslm.recipes.sudoku.solve import solve

    results = solve(_shipped_llm(), [p for p, _ in SHIPPED_HARD], steps=12)
    assert [r.solution for r in results] == [s for _, s in SHIPPED_HARD]


def test_trace_follows_solve_step_by_step():
    from canvaslm.recipes.sudoku.eval import format_trace, score, trace_diffusion
    from canvaslm.recipes.sudoku.solve import solve

    llm = _shipped_llm()
    exs = [Example(p, s, "hard") for p, s in SHIPPED_HARD]
    trace = trace_diffusion(llm, exs, steps=6, seed=3)
    assert [t.step for t in trace] == list(range(1, len(trace) + 1)) and 1 <= len(trace) <= 6
    for t in trace:
        assert 0 <= t.accepted_correct <= t.accepted <= 1 and 0 <= t.argmax_accuracy <= 1
    assert trace[0].accepted < trace[-1].accepted  # the sampler accepts more cells as it goes
    # the last draft is what solve commits: same seeds, so the same cell accuracy
    _, cells = score(exs, [r.solution for r in solve(llm, [e.puzzle for e in exs], steps=6, seed=3)])
    assert trace[-1].argmax_accuracy == pytest.approx(cells)
    assert "precision" in format_trace("hard", trace)


def test_trace_over_several_solve_batches_counts_every_puzzle_at_every_step():
    """A batch whose puzzles all stop early is not called back again; its cells still count, as they
    stand, at the later steps of the batches still running."""
    from canvaslm.recipes.sudoku.eval import trace_diffusion

    llm = _shipped_llm()
    exs = [Example(p, s, "easy") for p, s in SHIPPED_EASY] + [Example(p, s, "hard") for p, s in SHIPPED_HARD]
    whole = trace_diffusion(llm, exs, steps=12)
    split = trace_diffusion(llm, exs, steps=12, batch_size=3)  # the easy batch stops first
    assert whole[-1].finished == split[-1].finished == 1.0
    assert len(split) == len(whole)
    for a, b in zip(split, whole):  # each puzzle draws from its own seed: batching changes nothing
        assert (a.argmax_accuracy, a.accepted, a.accepted_correct, a.finished) == pytest.approx(
            (b.argmax_accuracy, b.accepted, b.accepted_correct, b.finished), abs=0.01), a.step


def test_digit_noise_turns_kept_answer_cells_into_digits():
    from canvaslm.recipes.sudoku.train import add_digit_noise
    from canvaslm.train.objective import NoiseDraw

    B, C = 400, TARGET_LEN
    g = torch.Generator().manual_seed(0)
    replaced = torch.rand(B, C, generator=g) < 0.3
    base = NoiseDraw(t=torch.full((B,), 0.3), canvas_index=torch.zeros(B, dtype=torch.long), replace=replaced,
                     random_tokens=torch.full((B, C), 700), sc_taken=torch.zeros(B, dtype=torch.bool))
    out = add_digit_noise(base, torch.Generator().manual_seed(1), 0.4)
    flipped = out.replace & ~base.replace
    assert torch.equal(out.replace[base.replace], base.replace[base.replace])  # nothing un-replaced
    assert torch.equal(out.random_tokens[base.replace], base.random_tokens[base.replace])  # the vocabulary noise stays
    assert not flipped[:, N_CELLS:].any()  # never the EOS
    digits = out.random_tokens[flipped]
    assert ((digits > DIGIT_BASE_ID) & (digits <= DIGIT_BASE_ID + 9)).all() and len(set(digits.tolist())) == 9
    rate = flipped[:, :N_CELLS].sum() / (~base.replace[:, :N_CELLS]).sum()
    assert 0.17 < rate < 0.23  # r ~ U(0, 0.4): 0.2 on average
    assert add_digit_noise(base, torch.Generator().manual_seed(1), 0.0).replace.equal(base.replace)
    with pytest.raises(ValueError, match="digit_noise"):
        TrainConfig(digit_noise=1.5)


@pytest.mark.parametrize("canvas_length", [TARGET_LEN, TARGET_LEN + 5])
def test_tensor_sampler_batches_are_make_batch_of_valid_augmented_puzzles(mini_split, canvas_length):
    from canvaslm.recipes.sudoku.data import EOS_ID, PAD_ID, decode_prompt, decode_solution
    from canvaslm.recipes.sudoku.puzzles import count_solutions
    from canvaslm.train.objective import make_batch

    source = mini_split.train[0]
    sampler = TensorSampler([source], canvas_length, seed=0)
    batch = sampler.batch(16)
    P = PROMPT_LEN
    exs = [Example(decode_prompt(row[:P].tolist()), decode_solution(row[P:].tolist()), source.level)
           for row in batch.tokens]
    ref = make_batch(to_pairs(exs), canvas_length, PAD_ID, EOS_ID)
    for name in ("tokens", "positions", "prompt_lens", "num_canvases"):
        assert torch.equal(getattr(batch, name), getattr(ref, name)), name
    assert batch.canvas_length == canvas_length
    for ex in exs:  # each one is the source puzzle under a symmetry: valid, same givens count, still unique
        assert is_valid_solution(ex.puzzle, ex.solution)
        assert ex.puzzle.count("0") == source.puzzle.count("0")
        assert count_solutions(ex.puzzle, limit=2) == 1
    assert len({ex.puzzle for ex in exs}) > 1
    plain = TensorSampler([source], canvas_length, seed=0).batch(2, augment=False)
    assert decode_prompt(plain.tokens[0, :P].tolist()) == source.puzzle


def test_tensor_sampler_covers_the_symmetries():
    """Two givens side by side in row 1, box 1: a row/column permutation keeps them in one row of one box,
    a transposition puts them in one column; across draws they land everywhere, transposed half the time,
    and the digit relabelling is uniform."""
    solution = "".join(str((r * 3 + r // 3 + c) % 9 + 1) for r in range(9) for c in range(9))
    puzzle = solution[:2] + "0" * 79
    sampler = TensorSampler([Example(puzzle, solution, "hard")], TARGET_LEN, seed=1)
    p, s = sampler.draw(4000)
    same_col, where, digits = 0, set(), []
    for row in p.tolist():
        (a, da), (b, db) = [(i, d) for i, d in enumerate(row) if d]
        assert a // 27 == b // 27 and (a % 9) // 3 == (b % 9) // 3  # one box
        assert a // 9 == b // 9 or a % 9 == b % 9  # one row, or one column
        same_col += a % 9 == b % 9
        where |= {a, b}
        digits.append(da if a < b else db)
    assert 0.45 < same_col / len(p) < 0.55
    assert where == set(range(81))
    counts = torch.bincount(torch.tensor(digits), minlength=10)[1:]
    assert counts.min() > 0.8 * len(p) / 9 and counts.max() < 1.2 * len(p) / 9


def test_training_stops_at_max_seconds_and_saves(tmp_path, mini_split):
    logs = []
    cfg = replace(MINI_TRAIN, max_steps=1000, max_seconds=1e-9, sampler="tensor")
    model_dir = train_recipe(Recipe(MINI_SHAPE, cfg), tmp_path, log=logs.append, split=mini_split)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1]
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=False)["step"] == 1
    assert (model_dir / "model.safetensors").exists()
    assert any("max_seconds" in line for line in logs)
    with pytest.raises(ValueError, match="max_seconds"):
        TrainConfig(max_seconds=-1)
    with pytest.raises(ValueError, match="sampler"):
        TrainConfig(sampler="numpy")


def test_cli_train_overrides_reach_the_recipe(tmp_path):
    """`--max-steps` and `--max-seconds` override the recipe; `--max-seconds 0` lifts the recipe's limit."""
    import yaml

    from canvaslm.cli import main

    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump({
        "model": {k: getattr(MINI_SHAPE, k) for k in ("hidden_size", "num_layers", "num_heads", "head_dim",
                                                      "num_kv_heads", "intermediate_size", "num_experts",
                                                      "top_k_experts", "moe_intermediate_size")},
        "train": {"n_train": 24, "n_test": 3, "n_test_hard": 2, "data_dir": str(tmp_path / "data"), "batch_size": 4,
                  "max_steps": 50, "log_every": 1, "max_seconds": 1e-9, "threads": 1}}))
    out = tmp_path / "run"
    assert main(["sudoku", "train", "--config", str(config), "--out", str(out), "--max-steps", "3",
                 "--max-seconds", "0"]) == 0
    assert len(_losses(out)) == 3
    used = json.loads((out / "recipe.json").read_text())["train"]
    assert (used["max_steps"], used["max_seconds"], used["threads"]) == (3, 0, 1)  # unset flags keep the recipe's


def test_resume_refuses_a_run_of_another_recipe(mini_split, tmp_path):
    short = Recipe(MINI_SHAPE, replace(MINI_TRAIN, max_steps=2, save_every=1))
    out = tmp_path / "run"
    train_recipe(short, out, log=lambda s: None, split=mini_split)
    state = (out / "trainer_state.pt").read_bytes()
    for other, named in ((replace(short.train, lr=short.train.lr * 2), "train.lr"),
                         (replace(short.train, seed=short.train.seed + 1), "train.seed")):
        with pytest.raises(ValueError, match=rf"another recipe \({named} differ\).*--no-resume"):
            train_recipe(Recipe(MINI_SHAPE, other), out, log=lambda s: None, split=mini_split)
        assert (out / "trainer_state.pt").read_bytes() == state  # nothing of the old run was touched
    wider = replace(MINI_SHAPE, hidden_size=MINI_SHAPE.hidden_size * 2)
    with pytest.raises(ValueError, match=r"model.hidden_size"):
        train_recipe(Recipe(wider, short.train), out, log=lambda s: None, split=mini_split)
    # more steps, another thread count: the same run, resumed
    train_recipe(Recipe(MINI_SHAPE, replace(short.train, max_steps=3, threads=1)), out, log=lambda s: None,
                 split=mini_split)
    assert len(_losses(out)) == 3
    # a fresh start under a new recipe is still there
    train_recipe(Recipe(MINI_SHAPE, replace(short.train, lr=short.train.lr * 2, max_steps=1)), out,
                 log=lambda s: None, split=mini_split, resume=False)
    assert len(_losses(out)) == 1
