"""bench/sudoku_gpu.sh, the prepared device command for the Sudoku run, driven end to end on the CPU with a
miniature recipe: both trainings stop at their time limit with a saved model, the eval table has both
models, the log is written into OUT (what the device tool returns), and each model's archive parts, made right
after its training, put back together into the model and its loss log."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_sudoku_gpu_script_dry_run_on_cpu(tmp_path):
    recipe = yaml.safe_load((REPO / "canvaslm/recipes/sudoku/recipe_gpu.yaml").read_text())
    recipe["model"].update(hidden_size=32, num_layers=2, num_heads=2, head_dim=16, num_kv_heads=1,
                           intermediate_size=32, num_experts=2, top_k_experts=1, moe_intermediate_size=16)
    recipe["train"].update(n_train=24, n_test=3, n_test_hard=2, data_dir=str(tmp_path / "data"), batch_size=4,
                           max_steps=1000, warmup_steps=2, log_every=1, save_every=1000, threads=1)
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "CONFIG": str(config), "TRAIN_SECONDS": "2", "AR_SECONDS": "1",
           "N_EVAL": "2", "HELD_OUT": "2", "STEPS": "4", "RUN_DIR": str(tmp_path / "run"), "OUT": str(out),
           "PYTHON": sys.executable, "BATCH": "3"}
    proc = subprocess.run(["bash", str(REPO / "bench/sudoku_gpu.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout
    assert proc.returncode == 0, log + proc.stderr
    for stage in ("env", "diffusion", "ar", "eval", "held-out"):
        assert f"== {stage}: rc 0," in log, log
    assert "train.max_seconds (2 s) is spent" in log and "train.max_seconds (1 s) is spent" in log
    assert "| autoregressive baseline |" in log and "| hard (held-out) solved / cells |" in log
    assert "train.batch_size 3" in log and "batch 3, " in log, log  # BATCH: the dry run's small batch
    assert (out / "sudoku_gpu.log").read_text() == log
    assert log.index("sudoku_diffusion.tgz.part-") < log.index("== ar:")  # archived right after its training
    for name in ("diffusion", "ar"):
        parts = sorted(out.glob(f"sudoku_{name}.tgz.part-*"))
        assert parts, name
        with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)), mode="r:gz") as tar:
            names = set(tar.getnames())
        for member in ("model/model.safetensors", "model/config.json", "log.jsonl"):
            assert f"{name}/{member}" in names, sorted(names)
