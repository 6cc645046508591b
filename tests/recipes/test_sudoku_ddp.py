"""`torchrun --nproc_per_node 2` Sudoku training (gloo on CPU) follows the one-process run on the same batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("sudoku_ddp_worker.py")
ROOT = Path(__file__).parents[2]


def _train(out: Path, nproc: int, objective: str, digit_noise: float, sc_passes: int) -> tuple[list[dict], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(out), objective, str(digit_noise), str(sc_passes)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return log, load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize("objective,digit_noise,sc_passes", [("diffusion", 0.0, 1), ("ar", 0.0, 1),
                                                             ("diffusion", 0.3, 3)])
def test_two_processes_follow_the_one_process_run(tmp_path, objective, digit_noise, sc_passes):
    log1, w1 = _train(tmp_path / "one", 1, objective, digit_noise, sc_passes)
    log2, w2 = _train(tmp_path / "two", 2, objective, digit_noise, sc_passes)
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == [1, 2, 3]
    for a, b in zip(log1, log2):
        for key in ("loss", "diffusion", "ar"):
            assert abs(a[key] - b[key]) <= 2e-4, (key, a, b)
    assert w1.keys() == w2.keys()
    # Adam turns float-rounding differences in near-zero gradients (rarely used embedding rows) into
    # ~1e-5 weight differences; a wrong reduction would move weights by the learning rate (~1e-3)
    for name, w in w1.items():
        diff = (w2[name] - w).abs().max().item()
        assert diff < 1e-4, (name, diff)
    assert not (tmp_path / "two" / "model" / "model.safetensors.tmp").exists()
