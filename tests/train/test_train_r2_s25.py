"""Trainer review round 2 (session 25): clean_partial puts back a final/ or checkpoint that a kill between
save's two renames left only as its `.NAME.old.` set-aside, and keeps a user's look-alikes (a name of the
other kind, an all-digit suffix); a `module:function` data source wrapped by functools.wraps is checked against
the wrapper's own parameters."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from canvaslm import checkpoint
from canvaslm.train import checkpointing as ckpt
from canvaslm.train.data import DataError, load_examples


class _Killed(BaseException):
    pass


def _files(d: Path) -> dict:
    return {p.name: p.read_text() for p in d.iterdir()}


def test_a_kill_between_the_two_renames_leaves_final_to_put_back(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    src = tmp_path / "w.txt"
    src.write_text("old")
    checkpoint.write_dir_atomically(run / "final", {"w.txt": src})
    src.write_text("new")
    real = os.replace

    def killed(a, b):  # final/ moved aside, then killed before the new one's rename (and so before any rollback)
        if Path(b).name == "final" and not Path(a).name.startswith(".final.old."):
            raise _Killed
        if Path(b).name != "final":
            real(a, b)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(_Killed):
            checkpoint.write_dir_atomically(run / "final", {"w.txt": src}, replace_any=True)
    assert not (run / "final").exists() and [p.name[:11] for p in run.iterdir()] == [".final.old."]
    ckpt.clean_partial(run)
    assert sorted(p.name for p in run.iterdir()) == ["final"]  # was [] (the only copy deleted)
    assert _files(run / "final") == {"w.txt": "old"}


def test_clean_partial_puts_back_only_a_missing_save(tmp_path):
    run = tmp_path / "run"
    for name in ("final", "checkpoint-0000002"):
        (run / name).mkdir(parents=True)
        (run / name / "w").write_text("published")
    for prefix in (".final.old.", ".checkpoint-0000001.old.", ".checkpoint-0000002.old."):
        Path(tempfile.mkdtemp(prefix=prefix, dir=run), "w").write_text(prefix)
    Path(tempfile.mkdtemp(prefix=".checkpoint-0000001.tmp.", dir=run), "w").write_text("half written")
    ckpt.clean_partial(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-0000001", "checkpoint-0000002", "final"]
    assert [(run / n / "w").read_text() for n in ("checkpoint-0000001", "checkpoint-0000002", "final")] == \
        [".checkpoint-0000001.old.", "published", "published"]


def test_clean_partial_keeps_look_alikes_of_the_other_kind_and_dated_names(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    temps = []
    while len(temps) < 3 or any(n[-8:].isdigit() for n in temps):  # tempfile's rare all-digit names are kept
        for t in temps:
            (run / t).rmdir() if (run / t).is_dir() else (run / t).unlink()
        temps = [Path(tempfile.mkstemp(prefix=f".{n}.tmp.", dir=run)[1]).name for n in ("latest", "metrics.jsonl")]
        temps.append(Path(tempfile.mkdtemp(prefix=".final.tmp.", dir=run)).name)
    assert all(ckpt.is_run_temp(n) for n in temps)
    mine_dirs = [".latest.tmp.abcd1234", ".trainer_state.tmp.abcd1234", ".final.tmp.20241203",  # a dir where the
                 ".checkpoint-0000001.backup_1", ".final.abcd1234"]  # run writes files; no tmp. marker
    mine_files = [".final.tmp.abcd1234", ".checkpoint-0000001.old.abcd1234", ".metrics.jsonl.tmp.20250101",
                  ".latest.abcd1234"]
    for n in mine_dirs:
        (run / n).mkdir()
    for n in mine_files:
        (run / n).write_text("mine")
    ckpt.clean_partial(run)
    assert sorted(p.name for p in run.iterdir()) == sorted(mine_dirs + mine_files)
    assert not ckpt.is_run_temp(".final.tmp.20241203") and not ckpt.is_run_temp(".final.tmp.abcd1234", is_dir=False)
    assert ckpt.is_run_temp(".final.tmp.abcd1234", is_dir=True)
    assert ckpt.is_run_temp(".latest.tmp.abcd1234", is_dir=False)
    assert not ckpt.is_run_temp(".checkpoint-100.backup_1") and not ckpt.is_run_temp(".latest.abcd1234")


def test_a_wrapped_source_is_checked_against_the_wrappers_parameters(tmp_path, monkeypatch):
    (tmp_path / "rows_r2_s25.py").write_text(
        "import functools\n"
        "def sized(f):\n"
        "    @functools.wraps(f)\n"
        "    def w(*a, repeat=1, **k):\n"
        "        return f(*a, **k) * repeat\n"
        "    return w\n"
        "@sized\n"
        "def make(n=1):\n"
        "    return [([2, 5], [6])] * n\n"
        "def strict(f):\n"
        "    @functools.wraps(f)\n"
        "    def w(n=1):\n"
        "        return f(n)\n"
        "    return w\n"
        "@strict\n"
        "def loose(n=1, **k):\n"
        "    return [([2, 5], [6])] * n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_examples("rows_r2_s25:make", kwargs={"n": 2, "repeat": 2}) == [([2, 5], [6])] * 4  # was a DataError
    with pytest.raises(DataError, match=r"'rows_r2_s25:loose' called with data.kwargs \{'m': 1\}: .*'m'"):
        load_examples("rows_r2_s25:loose", kwargs={"m": 1})  # the wrapper's own parameters refuse it
