"""Command-line details: --prompt-ids separators, --temperature 0, export's default dtype, quantize's --dtype on
the vision tower, export --adapter --dtype, bench --threads, a config.json that is not UTF-8, a closed pipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from canvaslm.cli import _parse_ids, main


def _dtypes(model_dir, part=""):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {str(f.get_tensor(k).dtype) for k in f.keys() if part in k}


@pytest.mark.parametrize("text", ["5 6", "5,6", "5, 6", " 5 ,6 "])
def test_prompt_ids_split_on_commas_and_spaces(text):
    assert _parse_ids(text) == [5, 6]  # "5 6" was the one id 56


def test_temperature_zero_is_near_greedy(tiny_checkpoint, capsys):
    args = [str(tiny_checkpoint), "--prompt", "hi", "--max-new-tokens", "4", "--steps", "2", "--seed", "1", "--json"]
    assert main(["generate", *args, "--temperature", "0"]) == 0
    zero = json.loads(capsys.readouterr().out)
    assert main(["generate", *args, "--temperature", "0.001"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == zero["token_ids"]


def test_export_keeps_the_stored_dtype_and_adapter_refuses_dtype(tiny_checkpoint, tmp_path, capsys):
    bf = tmp_path / "bf"
    assert main(["export", str(tiny_checkpoint), str(bf), "--dtype", "bfloat16"]) == 0
    out = tmp_path / "out"
    assert main(["export", str(bf), str(out)]) == 0
    assert _dtypes(out) == {"torch.bfloat16"} and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["export", str(bf), str(tmp_path / "a"), "--adapter", "--dtype", "float16"]) == 2
    assert "--dtype does not apply to --adapter" in capsys.readouterr().err


def test_quantize_dtype_reaches_the_vision_tower(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import build_vision_chat_checkpoint

    src = tmp_path / "vis"
    src.mkdir()
    build_vision_chat_checkpoint(src)
    assert "torch.float32" in _dtypes(src, "vision")
    dst = tmp_path / "q"
    assert main(["quantize", str(src), str(dst), "--to", "int4", "--dtype", "float16"]) == 0
    assert _dtypes(dst, "vision") == {"torch.float16"}


def test_bench_threads_must_not_be_negative(capsys):
    assert main(["bench", "--threads", "-1"]) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err


def test_a_config_that_is_not_utf8_names_its_file(tiny_checkpoint, tmp_path):
    import shutil

    from canvaslm.checkpoint import stored_dtype

    ck = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, ck)
    (ck / "config.json").write_bytes((ck / "config.json").read_text().encode("utf-16"))
    assert stored_dtype(ck) is not None  # read from the weights: no UnicodeDecodeError
    r = subprocess.run([sys.executable, "-m", "canvaslm.cli", "generate", str(ck), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_closed_pipe_is_no_traceback(tmp_path):
    """`canvaslm ... | head`: the reader leaves, printing raises BrokenPipeError; the shell's status, no traceback."""
    script = tmp_path / "pipe.py"
    script.write_text("import sys\nimport canvaslm.cli as c\nimport canvaslm.memory as m\n"
                      "def f(args):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
                      "m._main = f\n"
                      "sys.exit(c.main(['memory', '--shape', 'tiny', '--gpu-memory', '80']))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 141 and "Traceback" not in r.stderr, (r.returncode, r.stderr)


def test_memory_refuses_arguments_it_would_drop(tiny_checkpoint, capsys):
    assert main(["memory", str(tiny_checkpoint), "--shape", "26b-a4b", "--gpu-memory", "80"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["memory", str(tiny_checkpoint), "--revision", "v9", "--gpu-memory", "80"]) == 2
    assert "--revision v9" in capsys.readouterr().err


def test_a_one_token_budget_for_a_one_slot_constraint_says_so(tiny_checkpoint, capsys):
    base = ["generate", str(tiny_checkpoint), "--prompt", "hi", "--steps", "2", "--seed", "1"]
    assert main([*base, "--regex", "abc", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens=1 leaves no token for the regex output" in err and "65" not in err, err
    assert main([*base, "--regex", "abc", "--max-new-tokens", "4"]) == 0
