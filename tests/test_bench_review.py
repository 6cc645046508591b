"""Review fixes of the benchmark scripts: each figure compares like with like and a bad run says why."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    """bench/<name>.py imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _row(batch: int, step_s: float, tok_s: float) -> dict:
    return {"batch": batch, "step_s": step_s, "tok_s": tok_s}


def test_reference_ratio_uses_our_batch_1_row_whatever_the_order_of_batches():
    """The reference generates one request: ours/reference divides by our batch-1 row, not the first one."""
    from canvaslm.bench import _reference_line

    res = {"ours": [_row(4, 0.4, 400.0), _row(1, 0.1, 100.0)], "floor_s": 0.01}
    line = _reference_line(res, "eager", {"step_s": 0.2, "tok_s": 50.0})
    assert "ours/reference (batch 1): step 0.500, tok/s 2.00x" in line, line


def test_a_run_without_batch_1_measures_one_for_the_reference(monkeypatch):
    import canvaslm.bench as bench

    monkeypatch.setattr(bench, "build_reference", lambda model, device: None)
    monkeypatch.setattr(bench, "bench_reference", lambda *a, **k: {"step_s": 1.0, "tok_s": 1.0, "canvas_s": 1.0})
    lines = []
    bc = bench.BenchConfig(shape="tiny", prompt_len=4, new_tokens=16, steps_per_canvas=2, canvas_length=16,
                           batches=(2,), reference=("eager",))
    res = bench.run_bench(bc, print_fn=lines.append)
    assert [o["batch"] for o in res["ours"]] == [2] and res["ours_batch1"]["batch"] == 1
    peer = res["ours_batch1"]
    assert f"tok/s {peer['tok_s']:.2f}x" in lines[-1], lines
    assert "measured as the reference's peer" in bench.format_report(res)


def test_continuous_bench_times_equal_work_and_compares_tokens_per_second(monkeypatch, capsys):
    """Both methods run every request to its budget (a random model's EOS stopped rows at different points
    in each: 62 vs 64 tokens), and the headline is the ratio of tokens/s."""
    import re

    mod = _script("continuous")
    monkeypatch.setattr(sys, "argv", ["continuous.py", "--shape", "tiny", "--canvas", "16", "--prompts", "8",
                                      "--max-batch", "4", "--threads", "1"])
    mod.main()
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| generate")]
    assert len(rows) == 2 and rows[0][3] == rows[1][3], out
    peer, engine = (float(r[4]) for r in rows)  # tokens/s
    ratio = float(re.search(r"generate_continuous: ([\d.]+)x", out).group(1))
    assert ratio == pytest.approx(engine / peer, rel=0.02), out


def test_continuous_bench_refuses_unequal_work_naming_the_request():
    from types import SimpleNamespace as NS

    mod = _script("continuous")
    params = [mod.budget_params(seed=0, max_new_tokens=32, max_denoising_steps=2)] * 2
    assert params[0].min_tokens == 32
    outs = {"peer": [NS(token_ids=[5] * 32)] * 2, "engine": [NS(token_ids=[5] * 32), NS(token_ids=[5] * 30)]}
    with pytest.raises(RuntimeError, match=r"engine: requests \(index, tokens, budget\) \[\(1, 30, 32\)\]"):
        mod.equal_work(outs, params)
    assert mod.equal_work({"peer": outs["peer"]}, params) == 64


def test_long_context_shortens_the_long_prompt_so_its_follow_up_fits():
    """The follow-up turn is the long prompt + its 2-canvas reply + 32 tokens, then 2 canvases more: the
    old clamp (limit - 3 canvases - 64) left it 224 positions over a 2048-position context at canvas 256."""
    mod = _script("long_context")
    for limit, canvas in ((2048, 256), (131072, 256), (4096, 32), (1057, 256)):
        n = mod.fit_long(1 << 20, 256, limit, canvas)
        assert n + 2 * canvas + mod.FOLLOW_NEW + 2 * canvas == limit, (limit, canvas, n)
    assert mod.fit_long(1000, 256, 131072, 256) == 1000  # fits: kept
    with pytest.raises(ValueError, match="context of 1024 positions is too small"):
        mod.fit_long(4096, 256, 1024, 256)


def test_long_context_timing_raises_on_a_failed_request_with_its_message():
    """A request the engine refuses finished with no commit: timed() returned first=None and the script
    died on a TypeError at its last print; it now names the request and the engine's reason."""
    import asyncio

    from canvaslm.config import DiffusionParams
    from canvaslm.engine.engine import Finish

    class Refusing:
        def submit(self, req, queue, loop):
            queue.put_nowait(Finish(req.request_id, "error", 0, 0, "needs 2272 positions, over max_model_len=2048"))

    mod = _script("long_context")
    with pytest.raises(RuntimeError, match=r"request follow \(5 prompt tokens\): error: needs 2272 positions"):
        asyncio.run(mod.timed(Refusing(), "follow", [2] * 5, DiffusionParams()))


def test_step_impl_defaults_to_the_reference_step_on_a_cpu():
    from canvaslm.bench import step_impl

    assert step_impl(None, "cpu") == "reference" and step_impl(None, "cuda") == "fused"
    assert step_impl("auto", "cpu") == "cdf" and step_impl("auto", "cuda:0") == "fused"
    assert step_impl("cdf", "cuda") == "cdf"


@pytest.mark.parametrize("script,argv", [
    ("sampling_cuts", ["--vocab", "512", "--canvas", "8", "--repeat", "1"]),
    ("thinking_budget", ["--vocab", "512", "--canvas", "8", "--repeat", "1", "--threads", "1"])])
@pytest.mark.parametrize("flag,drawn", [([], "reference"), (["--sampler-impl", "cdf"], "cdf")])
def test_sampling_step_benches_time_the_step_they_name(monkeypatch, capsys, script, argv, flag, drawn):
    """Their recorded figures are the CPU reference step; since the engine's CPU default became the
    inverse-CDF step they timed that one without saying so. They now time the reference step on a CPU
    unless --sampler-impl names another, and print which."""
    import canvaslm.sampling.samplers as S

    used = set()
    for name, kind in (("categorical", "reference"), ("categorical_cdf", "cdf")):
        orig = getattr(S, name)
        monkeypatch.setattr(S, name, lambda *a, _o=orig, _k=kind, **k: (used.add(_k), _o(*a, **k))[1])
    mod = _script(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--device", "cpu", *argv, *flag])
    mod.main()
    assert used == {drawn}, used
    assert f"{drawn} s" in capsys.readouterr().out  # "reference step" / "cdf sampler step"


@pytest.mark.parametrize("rss,growth", [([400.0], 0.0), ([400.0, 600.0], 200.0), ([400.0, 600.0, 600.0], 200.0),
                                        ([400.0, 401.0, 600.0], 200.0), ([400.0, 390.0, 395.0], -5.0)])
def test_serve_load_rss_growth_is_counted_from_the_end_of_round_1(rss, growth):
    """It was counted from the end of round 2, so with 2 rounds or fewer any leak read 0 and ok() passed."""
    mod = _script("serve_load")
    rep = mod.LoadReport(clients=1, duration_s=1, requests=10, rss_mib_per_round=rss)
    assert rep.rss_growth_mib == pytest.approx(growth)
    assert rep.ok() == (growth <= 64)


@pytest.mark.parametrize("flags,needles", [
    (["--steps", "0"], ["--steps must be at least 1, got 0"]),
    (["--shape", "nosuch", "--steps", "1"], ["unknown shape 'nosuch'", "the peer variant's process exited 1"])])
def test_grad_checkpointing_bench_names_what_went_wrong(flags, needles):
    """A bad flag is refused up front; a child that fails shows its own error (was a bare CalledProcessError:
    the child's stderr was captured and dropped)."""
    import subprocess

    proc = subprocess.run([sys.executable, str(REPO / "bench/grad_checkpointing.py"), *flags, "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_random_model_is_materialised_in_its_dtype_with_the_same_values(monkeypatch):
    """build_random_model(dtype=bf16) allocated every weight in float32 first (26B-A4B: ~94 GiB, over an
    80 GB GPU) and converted after; it now converts on the meta device. The values are unchanged: drawn in
    float32 and rounded into the weight, as the float32 build rounded to bfloat16."""
    import torch

    from canvaslm.checkpoint import build_random_model
    from canvaslm.shapes import model_config

    seen = []
    orig = torch.nn.Module.to_empty
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda self, **kw: (
        seen.append({p.dtype for p in self.parameters()}), orig(self, **kw))[1])
    cfg = model_config("tiny", canvas_length=16)
    bf16 = build_random_model(cfg, dtype="bfloat16", seed=3, std=0.05)
    assert seen == [{torch.bfloat16}], seen
    fp32 = build_random_model(cfg, dtype="float32", seed=3, std=0.05).state_dict()
    for name, t in bf16.state_dict().items():
        if not name.startswith("rotary."):
            assert torch.equal(t, fp32[name].to(t.dtype)), name
