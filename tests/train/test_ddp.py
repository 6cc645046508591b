"""Data parallel: `torchrun --nproc_per_node 2` on CPU (gloo) gives the same gradients and loss curve as one
process on the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from .helpers import tiny_config

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(tmp_path: Path, nproc: int, **extra) -> dict:
    cfg = tiny_config(tmp_path, max_steps=2, grad_accum=1, batch_size=4, **extra)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(tmp_path / "c.yaml"), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_process_gradients_match_one_process(tmp_path):
    one, two = _run(tmp_path / "one", 1), _run(tmp_path / "two", 2)
    assert one["world"] == 1 and two["world"] == 2
    assert one["grads"].keys() == two["grads"].keys()
    for n, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][n], g, rtol=1e-4, atol=2e-5, msg=n)
    assert abs(one["stats"]["loss"] - two["stats"]["loss"]) < 1e-5
    assert one["stats"]["tokens"] == two["stats"]["tokens"]
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a.get("eval_loss", 0) - b.get("eval_loss", 0)) < 1e-4


def test_two_processes_with_lora_and_gradient_checkpointing_match_one_plain_process(tmp_path):
    """Each torchrun process builds the same adapters (their init follows the config's seed) and recomputes
    its layers in the backward: the gradients are the plain one-process run's."""
    lora = {"rank": 4, "alpha": 8, "include_experts": True}
    one = _run(tmp_path / "one", 1, lora=lora)
    two = _run(tmp_path / "two", 2, lora=lora, gradient_checkpointing=True)
    assert one["grads"].keys() == two["grads"].keys() and all("lora_" in n for n in one["grads"])
    for n, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][n], g, rtol=1e-4, atol=2e-5, msg=n)
    assert abs(one["stats"]["loss"] - two["stats"]["loss"]) < 1e-5


def test_a_parameter_without_gradient_joins_the_reduction_as_zeros(monkeypatch):
    """An expert none of this process's tokens picked has grad None; it must still take its place in the
    flat buffer, or every later gradient would be averaged with another parameter's."""
    from canvaslm.train import trainer

    seen = []

    def fake_all_reduce(flat):  # the other process sent the same numbers
        seen.append(flat.numel())
        flat.mul_(2)

    monkeypatch.setattr(trainer.dist, "all_reduce", fake_all_reduce)
    used, idle, frozen = (torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2)),
                          torch.nn.Parameter(torch.ones(4), requires_grad=False))
    used.grad = torch.full((3,), 0.5)
    extra = torch.tensor([7.0])
    trainer.DistContext(rank=0, world=2).all_reduce_gradients([used, idle, frozen], [extra])
    assert seen == [3 + 2 + 1]
    assert torch.equal(used.grad, torch.full((3,), 0.5)) and torch.equal(idle.grad, torch.zeros(2))
    assert frozen.grad is None and extra.item() == 7.0
