"""Run under torchrun: a 3-step miniature Sudoku training into argv[1] (see test_sudoku_ddp.py)."""

import sys
from dataclasses import replace

import torch

from canvaslm.recipes.sudoku.data import make_split
from canvaslm.recipes.sudoku.train import Recipe, train_recipe
from tests.recipes.test_sudoku_model import MINI_SHAPE, MINI_TRAIN

torch.set_num_threads(1)
objective = sys.argv[2] if len(sys.argv) > 2 else "diffusion"
digit_noise = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
sc_passes = int(sys.argv[4]) if len(sys.argv) > 4 else 1
cfg = replace(MINI_TRAIN, objective=objective, max_steps=3, save_every=100, digit_noise=digit_noise,
              sc_passes=sc_passes)
train_recipe(Recipe(MINI_SHAPE, cfg), sys.argv[1], log=lambda s: None,
             split=make_split(n_train=48, n_test=6, seed=123, n_test_hard=3))
