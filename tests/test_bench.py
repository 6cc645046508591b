"""`canvaslm bench` runs end to end on CPU at a tiny size and reports every figure, reference included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from canvaslm.bench import BenchConfig, run_bench


def test_reference_holds_our_weights_and_matches_our_logits():
    import torch

    from canvaslm.bench import build_bench_model, build_reference
    from canvaslm.shapes import model_config

    model = build_bench_model(model_config("tiny", canvas_length=16), torch.device("cpu"), "float32", seed=0)
    ref = build_reference(model, torch.device("cpu"))
    assert not any(t.is_meta for t in ref.state_dict(keep_vars=True).values())
    assert ref.lm_head.weight.data_ptr() == model.embed_weight.data_ptr()  # tied, no copy
    h = torch.randn(3, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    ours, theirs = model.logits(h), ref.lm_head(h)  # ours applies the final softcap on top
    cap = model.cfg.final_logit_softcapping
    torch.testing.assert_close(ours, torch.tanh(theirs / cap) * cap, rtol=1e-5, atol=1e-5)


def test_bench_tiny_cpu_reports_all_figures():
    lines = []
    bc = BenchConfig(shape="tiny", prompt_len=8, new_tokens=32, steps_per_canvas=2, canvas_length=16,
                     batches=(1, 2), reference=("eager",))
    res = run_bench(bc, print_fn=lines.append)
    text = "\n".join(lines)
    for needle in ("memory floor", "ours  batch 1: decoder step", "encode canvas", "batch 2 / batch 1",
                   "transformers eager batch 1", "ours/reference"):
        assert needle in text, text
    assert res["ours"][0]["tok_s"] > 0 and res["floor_s"] > 0
    assert "error" not in res["reference"]["eager"], res["reference"]


def test_fused_sampler_path_on_cpu():
    bc = BenchConfig(shape="tiny", prompt_len=4, new_tokens=16, steps_per_canvas=2, canvas_length=16,
                     batches=(1,), reference=(), sampler="fused")
    res = run_bench(bc, print_fn=lambda s: None)
    assert res["ours"][0]["step_s"] > 0


def test_quantised_run_measures_its_unquantised_peer_in_the_same_run():
    lines = []
    bc = BenchConfig(shape="tiny", prompt_len=4, new_tokens=16, steps_per_canvas=2, canvas_length=16,
                     batches=(1,), reference=(), int4=True, vs_unquantized=True)
    res = run_bench(bc, print_fn=lines.append)
    text = "\n".join(lines)
    assert "float32 int4" in text and "unquantized (float32) batch 1" in text, text
    assert "int4/unquantized: step" in text
    # the peer really is the float model: more weight bytes than the int4 one that followed
    assert res["unquantized"]["weight_bytes"] > res["weight_bytes"] > 0


def test_our_rows_are_printed_before_the_reference_runs(monkeypatch):
    """A time limit that strikes while the reference runs must not lose our figures: each of our rows is
    printed as measured, the reference rows after."""
    import canvaslm.bench as bench

    lines = []

    class Stop(BaseException):
        pass

    def stopped(*a, **k):
        raise Stop(list(lines))

    monkeypatch.setattr(bench, "bench_reference", stopped)
    bc = BenchConfig(shape="tiny", prompt_len=4, new_tokens=16, steps_per_canvas=2, canvas_length=16,
                     batches=(1, 2), reference=("eager",))
    with pytest.raises(Stop) as e:
        run_bench(bc, print_fn=lines.append)
    before = "\n".join(e.value.args[0])
    for needle in ("memory floor", "ours  batch 1: decoder step", "ours  batch 2: decoder step",
                   "batch 2 / batch 1 throughput", "peak process RSS"):
        assert needle in before, before


def test_quantised_run_with_a_reference_says_why_there_is_none():
    lines = []
    bc = BenchConfig(shape="tiny", prompt_len=4, new_tokens=16, steps_per_canvas=2, canvas_length=16,
                     batches=(1,), reference=("eager",), fp8=True)
    res = run_bench(bc, print_fn=lines.append)
    text = "\n".join(lines)
    assert not res["reference"]
    assert "transformers reference: not run (fp8 weights" in text and "--vs-unquantized" in text, text


def test_bad_batches_and_devices_are_named_with_exit_2(capsys):
    import importlib.util

    import torch

    from canvaslm import cli

    spec = importlib.util.spec_from_file_location("bench_step", Path(__file__).parents[1] / "bench" / "bench_step.py")
    bench_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_step)
    cases = [(["--batches", "1,x"], "--batches"), (["--device", "cdua"], "'cdua' is not a torch device")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device"))
    for flags, needle in cases:
        assert cli.main(["bench", *flags]) == 2
        assert needle in capsys.readouterr().err
        assert bench_step.main(flags) == 2
        assert needle in capsys.readouterr().err


def test_bench_scripts_name_a_device_they_cannot_use():
    """Every bench/*.py taking --device says so and exits 2 (was a traceback deep in model building)."""
    repo = Path(__file__).resolve().parents[1]
    for script in ("continuous", "kv_cache_fp8", "long_context", "lora_serving", "prefix_cache", "sampling_cuts",
                   "serve_concurrency", "serve_load", "thinking_budget", "vision_tower"):
        proc = subprocess.run([sys.executable, str(repo / "bench" / f"{script}.py"), "--device", "cdua"], cwd=repo,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "error: device 'cdua' is not a torch device" in proc.stderr, \
            (script, proc.stdout, proc.stderr[-2000:])


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="--steps-per-canvas"):
        BenchConfig(steps_per_canvas=0)
    with pytest.raises(ValueError, match="--reference"):
        BenchConfig(reference=("fast",))
    with pytest.raises(ValueError, match="--fp8 and --int4"):
        BenchConfig(fp8=True, int4=True)
    with pytest.raises(ValueError, match="--vs-unquantized compares"):
        BenchConfig(vs_unquantized=True)


def test_cli_and_standalone_script_parse():
    out = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--steps-per-canvas" in out.stdout
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "bench_step.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--shape" in out.stdout


def test_fast_path_gpu_script_runs_its_stages_on_cpu(tmp_path):
    """bench/fast_path_gpu.sh, the prepared device command, dry-run at the tiny shape: the int4 stage
    benchmarks int4 weights, the serve stage measures both concurrency levels through HTTP, the log lands
    in OUT, and an unknown stage is refused."""
    import os

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DEVICE": "cpu", "SHAPE": "tiny", "WHEELS": "none", "OUT": str(tmp_path),
           "PYTHON": sys.executable, "CANVAS": "16", "PREFIX": "1024", "CONT_PROMPTS": "4", "LONG": "2048",
           "VISION_TOKENS": "70"}
    proc = subprocess.run(["bash", str(repo / "bench/fast_path_gpu.sh"), "int4", "serve", "prefix", "continuous",
                           "lora", "context", "kvfp8", "vision", "nosuchstage"],
                          cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1200)  # ~95 s alone; CI machines may be busy
    assert proc.returncode == 2, proc.stdout + proc.stderr
    log = (tmp_path / "fast_path_gpu.log").read_text()
    assert "== int4: rc 0," in log and "float32 int4" in log and "batch 4 / batch 1 throughput" in log, log
    assert "int4/unquantized: step" in log, log
    assert "== serve: rc 0," in log and "concurrency 1:" in log and "concurrency 4:" in log, log
    assert "== prefix: rc 0," in log and "3072 of 4352" in log and "outputs identical: True" in log, log
    assert "== continuous: rc 0," in log and "x the speed of generate" in log, log
    assert "== lora: rc 0," in log and "| merged adapter 1 (peer) |" in log, log
    assert "== context: rc 0," in log and "engine: max_model_len 131072: the model's whole context" in log, log
    assert "reused (" in log, log
    assert "== kvfp8: rc 0," in log and "| float8_e4m3fn |" in log and "fp8 / peer: time" in log, log
    assert "== vision: rc 0," in log and "1 image(s)" in log, log  # a CPU dry run shrinks the images and timings
    assert "unknown stage nosuchstage" in log


def test_fast_path_gpu_script_plan_fits_the_device_budget():
    """The header's device calls add up: each call's timeout_s covers its stages' limits (+ 30 s for the wheel
    install and torch import) and stays within the 600 s a call may take, the first call (the default stages,
    tests and bf16) within ~420 s, and the tests stage runs every CUDA check (no -x)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "bench/fast_path_gpu.sh").read_text()
    limits = {m[0]: int(m[1]) for m in re.findall(r"\) stage ([a-z0-9-]+) (\d+) ", text)}
    assert {"tests", "bf16", "fp8", "int4", "serve", "vision", "compiled"} <= set(limits), limits
    default = re.search(r'for s in "\$\{@:-([^}]*)\}"', text)[1].split()
    assert default == ["tests", "bf16"] and sum(limits[s] for s in default) + 30 <= 420, (default, limits)
    calls = re.findall(r'run\(command="bash bench/fast_path_gpu.sh ?([^"]*)", carry=\["\.whl"\], timeout_s=(\d+)\)', text)
    calls += re.findall(r'"([a-z0-9 -]+)" (?:timeout_s=)?(\d+)', text.split("Later sessions")[1].split("# Dry run")[0])
    assert len(calls) >= 10, calls
    for stages, timeout in calls:
        need = sum(limits[s] for s in (stages.split() or default)) + 30
        assert need <= int(timeout) <= 600, (stages, timeout, need)
    assert int(calls[0][1]) <= 420 and calls[0][0] == ""
    assert "pytest -q -x" not in text and "stage tests" in text


def test_lora_serving_bench_runs_its_three_engines():
    """bench/lora_serving.py at a miniature shape: the peer (a merged adapter) and both served runs report."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench/lora_serving.py"), "--hidden", "64", "--layers", "2",
                           "--requests", "2", "--adapters", "1", "--rank", "2", "--canvases", "1", "--canvas", "8",
                           "--steps", "2", "--prompt", "8"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["merged adapter 1 (peer)", "served, all on adapter 1",
                                                       "served, spread over base + 1 adapters"]
    assert rows[0].endswith("| 1.00x |")


def test_constraint_passes_bench_compares_with_the_dense_peer():
    """bench/constraint_passes.py at a small vocabulary: both ways give the same masks and committed ids."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench/constraint_passes.py"), "--vocab", "600", "--files", "60",
                           "--width", "31", "--repeat", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| dense [states x symbols] (peer) |" in proc.stdout
    assert "same masks: True, same committed ids: True" in proc.stdout, proc.stdout


def test_union_compile_bench_builds_the_peers_automata():
    """bench/union_compile.py at a small vocabulary: the 1-D uniques and the peer's dim=1 unique build the same
    union automata."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench/union_compile.py"), "--vocab", "600", "--files", "60",
                           "--repeat", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| torch.unique(dim=1) (peer) |" in proc.stdout and "same automata: True" in proc.stdout, proc.stdout


def test_editor_infill_bench_warms_the_chunks_it_then_reuses():
    """bench/editor_infill.py at a tiny size: the completion after the warm-up takes the chunks from the cache."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench/editor_infill.py"), "--extra", "512", "--hidden", "32",
                           "--canvas", "16", "--n-predict", "8", "--threads", "1"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in proc.stdout.splitlines()
            if line.startswith("| ") and "ms" not in line}
    assert rows["cold (peer)"][3] == "0" and rows["after the warm-up"][3] == "512", proc.stdout


def test_training_memory_bench_compares_with_the_keep_everything_peer():
    """bench/grad_checkpointing.py at the tiny shape: three processes, equal losses, less kept with checkpointing."""
    import re

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench/grad_checkpointing.py"), "--shape", "tiny", "--batch", "2",
                           "--prompt", "40", "--canvas", "8", "--steps", "1", "--threads", "1"], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| whole logits, every activation kept (peer) |" in proc.stdout and "(equal)" in proc.stdout, proc.stdout
    row = next(line for line in proc.stdout.splitlines() if "+ gradient_checkpointing |" in line)
    assert float(re.search(r"([\d.]+)x less kept", row).group(1)) > 2, row


def test_cpu_defaults_bench_runs_the_peer_and_both_new_defaults():
    """bench/cpu_defaults.py at the tiny shape: the old CPU defaults (the peer), the inverse-CDF draw, and the
    new defaults (dtype forced to float32 here so the rows do not depend on this CPU's bf16 instructions)."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench/cpu_defaults.py"), "--shape", "tiny", "--prompts", "1",
                           "--steps", "1", "--dtype", "float32"], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert [r[1].strip() for r in rows] == ["float32, reference draws (peer: the old defaults)",
                                            "float32, inverse-CDF draws", "float32, inverse-CDF draws (the new defaults)"]
    assert [int(r[3]) for r in rows] == [256] * 3 and rows[0][5].strip() == "1.00x"


def test_prefix_cache_bench_refuses_a_single_request_up_front():
    """--requests 1 has no later requests to compare: refused before the run (was a StatisticsError after it)."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench/prefix_cache.py"), "--shape", "tiny", "--canvas", "16",
                           "--prefix", "64", "--suffix", "8", "--requests", "1", "--steps", "2"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--requests must be at least 2" in proc.stderr, proc.stdout + proc.stderr


def test_continuous_bench_warms_up_both_methods_before_timing(monkeypatch):
    """bench/continuous.py runs generate and generate_continuous untimed first, so the peer (timed first) is not
    charged the first call's compiles."""
    import importlib.util

    from canvaslm.llm import LLM

    calls = []
    for name in ("generate", "generate_continuous"):
        orig = getattr(LLM, name)
        monkeypatch.setattr(LLM, name, lambda self, prompts, *a, _o=orig, _n=name, **k:
                            (calls.append((_n, len(prompts))), _o(self, prompts, *a, **k))[1])
    spec = importlib.util.spec_from_file_location("continuous", Path(__file__).parents[1] / "bench" / "continuous.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["continuous.py", "--shape", "tiny", "--canvas", "8", "--prompts", "3",
                                      "--max-batch", "2", "--threads", "1"])
    mod.main()
    assert calls == [("generate", 2), ("generate_continuous", 2), ("generate", 3), ("generate_continuous", 3)], calls
