"""`canvaslm serve` as a user runs it: a subprocess on a free loopback port, answering the openai client."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from openai import OpenAI

from canvaslm.server.launch import free_port

from .conftest import wait_until_healthy


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_serve_subprocess_with_api_key(tiny_checkpoint, quantization, tmp_path):
    port = free_port()
    quant = ["--quantization", quantization] if quantization else []
    template = tmp_path / "t.jinja"
    template.write_text("CUSTOM:{% for m in messages %}{{ m['content'] }}{% endfor %}")
    proc = subprocess.Popen([sys.executable, "-m", "canvaslm.cli", "serve", str(tiny_checkpoint), "--port", str(port),
                             "--device", "cpu", "--api-key", "k", "--max-batch", "2", "--max-model-len", "128",
                             "--served-model-name", "tiny-cli", "--chat-template", str(template), *quant],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = wait_until_healthy(proc, port)
        assert httpx.get(base + "/v1/models").status_code == 401
        client = OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        out = client.completions.create(model="tiny-cli", prompt="hello", max_tokens=16, seed=1)
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1
        ids = httpx.post(base + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                         headers={"Authorization": "Bearer k"}).json()["tokens"]
        assert len(ids) == len("CUSTOM:hi")  # the --chat-template renders the chat prompt (one char per token)
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_refuses_a_bad_chat_template_before_loading(tiny_checkpoint, tmp_path):
    from canvaslm.cli import main

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    assert main(["serve", str(tiny_checkpoint), "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    assert main(["serve", str(tiny_checkpoint), "--chat-template", str(bad)]) == 2


def test_serve_takes_an_inline_chat_template(tiny_checkpoint, monkeypatch, capsys):
    """vLLM's --chat-template is a file or the template itself; a value that is neither is said to have been
    taken as a path."""
    import uvicorn

    from canvaslm.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("state", app.state.canvas))
    inline = "{% for m in messages %}INLINE:{{ m.content }}{% endfor %}"
    assert main(["serve", str(tiny_checkpoint), "--chat-template", inline, "--device", "cpu",
                 "--max-model-len", "64"]) == 0, capsys.readouterr().err
    state = seen.pop("state")
    try:
        tok = state.tokenizer
        assert tok.decode(tok.encode_chat([{"role": "user", "content": "hi"}])) == "INLINE:hi"
    finally:
        state.engine.shutdown()
    assert main(["serve", str(tiny_checkpoint), "--chat-template", "{% for m in messages %}"]) == 2
    assert "--chat-template (the template given inline): chat template has a syntax error" in capsys.readouterr().err
    assert main(["serve", str(tiny_checkpoint), "--chat-template", "no_such.jinja"]) == 2
    assert "no_such.jinja does not exist (taken as a file's path" in capsys.readouterr().err


def test_serve_port_out_of_range_is_an_argument_error(tiny_checkpoint, capsys):
    from canvaslm.cli import main

    for port in ("70000", "-1", "http"):
        with pytest.raises(SystemExit) as e:  # argparse's usage error, before the model loads
            main(["serve", str(tiny_checkpoint), "--port", port])
        assert e.value.code == 2
        assert f"--port: must be a TCP port in [0, 65535], got '{port}'" in capsys.readouterr().err


def test_serve_limits_are_checked_before_loading(tiny_checkpoint, monkeypatch, capsys):
    """--max-model-len must hold a prompt token and one canvas (it was refused after the load, naming the
    engine's Runner and its slot count); --max-steps-limit must be >= 1 (0 was taken)."""
    from canvaslm.cli import main
    from canvaslm.config import ModelConfig
    from canvaslm.server import launch

    monkeypatch.setattr(launch, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    C = ModelConfig.from_dir(tiny_checkpoint).canvas_length
    assert main(["serve", str(tiny_checkpoint), "--device", "cpu", "--max-model-len", str(C)]) == 2
    assert f"--max-model-len {C} must be in [{C + 1}, " in capsys.readouterr().err
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as e:
            main(["serve", str(tiny_checkpoint), "--max-steps-limit", bad])
        assert e.value.code == 2 and f"--max-steps-limit: must be an integer >= 1, got '{bad}'" in \
            capsys.readouterr().err


def test_max_steps_limit_caps_the_checkpoints_default(tiny_checkpoint):
    """--max-steps-limit bounds a request that names no steps too (the checkpoint's default ran past it and
    /props showed it); a request over the limit is still a 400."""
    from fastapi.testclient import TestClient

    from canvaslm.config import DiffusionParams
    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.app import build_app
    from canvaslm.server.launch import build_state

    assert DiffusionParams.from_dir(tiny_checkpoint).max_denoising_steps > 2
    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=64),
                        max_denoising_steps=2, served_model_name="model")
    try:
        client = TestClient(build_app(state))
        r = client.post("/v1/completions", json={"model": "model", "prompt": "hi", "max_tokens": 4, "seed": 1,
                                                 "stability_threshold": 0}).json()
        assert 1 <= r["usage"]["decoder_passes"] <= 2
        assert client.get("/props").json()["default_generation_settings"]["params"]["max_denoising_steps"] == 2
        r = client.post("/v1/completions", json={"model": "model", "prompt": "hi", "max_tokens": 4,
                                                 "max_denoising_steps": 3})
        assert r.status_code == 400 and "over this server's limit of 2" in r.text
    finally:
        state.shutdown()
    with pytest.raises(ValueError, match="must be >= 1"):
        build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=64),
                    max_denoising_steps=0)


def test_serve_port_0_prints_the_port_it_serves(tiny_checkpoint, monkeypatch, capsys):
    """--port 0 takes any free port: the start-up line names that port, and uvicorn is given it (was :0)."""
    import re

    import uvicorn

    from canvaslm.cli import main

    seen = {}

    def run(app, **kw):
        seen.update(kw, state=app.state.canvas)

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", str(tiny_checkpoint), "--port", "0", "--device", "cpu", "--max-model-len", "64"]) == 0
    seen.pop("state").engine.shutdown()
    printed = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/v1", capsys.readouterr().out)
    assert printed and int(printed.group(1)) == seen["port"] > 0
