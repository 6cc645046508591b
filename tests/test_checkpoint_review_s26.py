"""Checkpoint review (session 26): non-finite weights (or ones a narrower load dtype overflows) are refused by
name; a device this engine does not run on is a named error; `quantize SRC .` is refused before the work, a
save to `x/..` or through a symlinked directory writes where it points (the link kept), and a failed set-aside
leaves nothing behind; quantize reads SRC's generation_config.json before the long load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from canvaslm.checkpoint import CheckpointError, check_device, load_model, save_model
from canvaslm.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt_s26") / "src")


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "canvaslm.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _with_weight(src, dst, name, change):
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_non_finite_weights_are_refused_by_name(src, tmp_path):
    name = "model.decoder.layers.0.self_attn.q_proj.weight"

    def nan(t):
        t.view(-1)[3] = float("nan")
        return t

    bad = _with_weight(src, tmp_path / "nan", name, nan)
    with pytest.raises(CheckpointError, match=rf"{name}: values that are NaN or infinite in model.safetensors"):
        load_model(bad)

    def big(t):
        t = t.float()
        t.view(-1)[0] = 1e5  # finite in float32, inf in float16
        return t

    wide = _with_weight(src, tmp_path / "big", name, big)
    load_model(wide, dtype="float32")
    with pytest.raises(CheckpointError, match=rf"{name}: values in model.safetensors over the range of torch.float16"):
        load_model(wide, dtype="float16")


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_devices_the_engine_does_not_run_on_are_named(device):
    with pytest.raises(CheckpointError, match=f"device '{device}': canvaslm runs on cpu or cuda"):
        check_device(device)


def test_quantize_into_the_working_directory_is_refused_before_loading(src, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    r = cli("quantize", src, ".", "--to", "int4", cwd=here)
    assert r.returncode == 2 and "is the working directory" in r.stderr and "loading" not in r.stderr.lower()
    assert os.listdir(here) == []


def test_save_model_to_dot_writes_the_directory_it_names(src, tmp_path, monkeypatch):
    """`.`'s parent is `.`: the temp dir went inside DST, which then held a stranger and was refused."""
    model = load_model(src)
    (tmp_path / "e").mkdir()
    monkeypatch.chdir(tmp_path / "e")
    save_model(model, ".")
    assert (tmp_path / "e" / "config.json").exists() and sorted(os.listdir(tmp_path)) == ["e"]


def test_a_symlinked_dst_keeps_its_link_and_leaves_no_stray(src, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "dst")
    r = cli("quantize", src, tmp_path / "dst", "--to", "int4")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dst").is_symlink() and (tmp_path / "dst" / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["dst", "real"]  # no .dst.old. left behind
    load_model(tmp_path / "dst")


def test_quantize_reads_the_generation_config_before_loading(src, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "generation_config.json").write_text(json.dumps({"max_denoising_steps": "x"}))
    r = cli("quantize", bad, tmp_path / "q", "--to", "int4")
    assert r.returncode == 2 and "generation_config.json" in r.stderr
    assert "100%" not in r.stderr  # refused before any weight was read
