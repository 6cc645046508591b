"""Trainer review (session 25): lora.alpha finite, a kill's temps all cleaned, module:function source errors,
truncate_prompt down to the BOS, freeze_router: false with lora refused, chat weights 0 or 1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from canvaslm.config import ConfigError
from canvaslm.train import checkpointing as ckpt
from canvaslm.train.data import DataError, load_examples
from canvaslm.train.lora import LoRAConfig
from canvaslm.train.trainer import TrainConfig, Trainer

from .helpers import tiny_config, write_jsonl

torch.set_num_threads(1)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), float("-inf")])
def test_lora_alpha_must_be_a_finite_number(tmp_path, alpha):
    """.inf / .nan passed `alpha <= 0` and trained to NaN weights in final/."""
    with pytest.raises(ValueError, match="lora.alpha must be a finite number > 0"):
        LoRAConfig(rank=2, alpha=alpha)
    with pytest.raises(ConfigError, match="train config: lora.alpha must be a finite number > 0"):
        TrainConfig.from_dict(tiny_config(tmp_path, lora={"rank": 2, "alpha": alpha}))


def test_clean_partial_removes_every_temp_a_kill_leaves_and_nothing_else(tmp_path, monkeypatch):
    """Every atomic write of a run (checkpoint, trainer state, latest, metrics, loss plot, final/) leaves its temp
    behind when killed before its rename: a 1-step run whose renames never happen leaves them all; clean_partial
    (run by the next Trainer) removes exactly those, and none of the user's look-alikes."""
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, max_steps=1, plot=True, data={"train": str(
        write_jsonl(tmp_path / "d.jsonl", [([2, 5, 6], [7, 8])]))}, batch_size=1))
    trainer = Trainer(cfg)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda src, dst: None)  # killed before each rename
        trainer.train()
    run = Path(cfg.out_dir)
    left = {p.name for p in run.iterdir() if p.name.startswith(".")}
    made = {n.split(".")[1] for n in left}
    assert {"checkpoint-0000001", "latest", "metrics", "loss", "final"} <= made, left
    for name in (".trainer_state.tmp.abcd1234", ".final.old.abcd1234", ".checkpoint-0000002.probe.ab_d1234"):
        (run / name).mkdir() if "trainer" not in name else (run / name).write_bytes(b"x")
    mine = [".final.notes", ".gitignore", ".checkpoint-best.abcd1234", ".latest", "notes.txt", ".final.abcdefghij"]
    for name in mine:
        (run / name).write_text("mine")
    ckpt.clean_partial(run)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == sorted(n for n in mine if n[0] == ".")
    assert all((run / n).read_text() == "mine" for n in mine)


def test_a_callable_source_that_returns_none_or_takes_other_kwargs_is_a_data_error(tmp_path, monkeypatch):
    (tmp_path / "rows_s25.py").write_text(
        "def none_fn():\n    pass\n"
        "def make(n=2):\n    return [([2, 5], [6])] * n\n"
        "def text():\n    return 'abc'\n"
        "def broken(n=1):\n    return len(n)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError, match=r"'rows_s25:none_fn' called with data.kwargs \{\}: returned None"):
        load_examples("rows_s25:none_fn")
    with pytest.raises(DataError, match=r"'rows_s25:make' called with data.kwargs \{'count': 3\}: .*'count'"):
        load_examples("rows_s25:make", kwargs={"count": 3})
    with pytest.raises(DataError, match=r"'rows_s25:text' .*returned \"abc\""):
        load_examples("rows_s25:text")
    assert load_examples("rows_s25:make", kwargs={"n": 3}) == [([2, 5], [6])] * 3
    with pytest.raises(TypeError, match="has no len"):  # the function's own error stays its own
        load_examples("rows_s25:broken")


def test_truncate_prompt_may_cut_down_to_the_kept_bos(tmp_path):
    """A prompt cut to its leading BOS alone still fits: the example is kept, not left out (an off-by-one)."""
    path = write_jsonl(tmp_path / "long.jsonl", [([2] + list(range(5, 13)), list(range(5, 12)))])
    trainer = Trainer(TrainConfig.from_dict(tiny_config(tmp_path, max_steps=1, max_length=9, truncate_prompt=True,
                                                        data={"train": str(path)}, batch_size=1)))
    assert trainer.train_examples == [([2], list(range(5, 12)))]
    cut = trainer._cut_prompt
    assert cut(([2, 5, 6], [7]), 2) == ([2], [7]) and cut(([2, 5, 6], [7]), 3) is None
    assert cut(([5, 6], [7]), 1) == ([6], [7]) and cut(([5, 6], [7]), 2) is None  # no BOS: one token must stay


def test_freeze_router_false_with_lora_is_refused(tmp_path):
    """apply_lora freezes all but the adapters, so freeze_router: false did nothing with lora; now an error."""
    with pytest.raises(ConfigError, match="train config: freeze_router: false does not combine with lora"):
        Trainer(TrainConfig.from_dict(tiny_config(tmp_path, freeze_router=False, lora={"rank": 2})))
    full = Trainer(TrainConfig.from_dict(tiny_config(tmp_path, freeze_router=False)))  # full FT trains the router
    assert any(p.requires_grad for n, p in full.model.named_parameters() if "router" in n)
    # a checkpoint of a LoRA run that said freeze_router: false (accepted before) still resumes with the fix
    config = TrainConfig.from_dict(tiny_config(tmp_path, lora={"rank": 2}))
    ckpt.check_resume_config({**ckpt.saved_config(config), "freeze_router": False}, config, tmp_path)


def test_chat_weight_must_be_0_or_1(tmp_path):
    """OpenAI's format takes weight 0 or 1; "0" (a string) was trained, 0.5 / 2 / true meant whatever != 0 said."""
    from canvaslm.testing import make_tiny_checkpoint
    from canvaslm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(make_tiny_checkpoint(tmp_path / "m"))
    path = tmp_path / "chat.jsonl"

    def rows(weight):
        turn = {"role": "assistant", "content": "4"} | ({} if weight == "absent" else {"weight": weight})
        path.write_text("\n" + json.dumps({"messages": [{"role": "user", "content": "2+2?"}, turn,
                                                        {"role": "user", "content": "3+3?"},
                                                        {"role": "assistant", "content": "6"}]}) + "\n")
        return len(load_examples(str(path), tok))

    for bad in ("0", "1", 0.5, 2, True, [0]):
        with pytest.raises(DataError, match=rf"{path}:2: messages\[1\]: 'weight' must be 0 .* or 1"):
            rows(bad)
    assert [rows(w) for w in (0, 1, None, "absent")] == [1, 2, 2, 2]  # null: as `datasets` fills an absent key
