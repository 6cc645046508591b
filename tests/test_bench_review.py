"""Review fixes of the benchmark scripts: each figure compares like with like and a bad run says why."""

from __future__ import annotations

import importlib.util
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    """bench/<name>.py imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
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
