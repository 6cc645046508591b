"""What `canvaslm serve` says at start-up: the max_denoising_steps it serves with (capped by
--max-steps-limit, docs: "also caps the checkpoint's default"), and that a checkpoint without a
tokenizer.json serves token-id prompts only."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from canvaslm.cli import main


@pytest.fixture()
def served(monkeypatch, capsys):
    """main(["serve", ...]) up to uvicorn.run: (exit code, the state it would serve, what it printed)."""
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(state=app.state.canvas))

    def run(*argv):
        code = main(["serve", *argv, "--device", "cpu", "--max-model-len", "128"])
        state = seen.pop("state", None)
        if state is not None:
            state.engine.shutdown()
        return code, state, capsys.readouterr()
    return run


@pytest.mark.parametrize("flags,used,note", [
    (["--hf-overrides", '{"max_denoising_steps": 2000}'], 1024,
     "max_denoising_steps=1024 (2000 capped by --max-steps-limit 1024)"),
    (["--hf-overrides", '{"max_denoising_steps": 64}', "--max-steps-limit", "16"], 16,
     "max_denoising_steps=16 (64 capped by --max-steps-limit 16)"),
    (["--diffusion-config", '{"max_denoising_steps": 12}', "--max-steps-limit", "16"], 12,
     "sampler defaults set: max_denoising_steps=12 |"),
])
def test_the_note_gives_the_max_denoising_steps_served(served, tiny_checkpoint, flags, used, note):
    code, state, out = served(str(tiny_checkpoint), *flags)
    assert code == 0, out.err
    assert state.defaults.max_denoising_steps == used
    assert note in " | ".join(out.out.replace("canvaslm: ", "").splitlines()) + " |"


def test_a_checkpoint_default_over_the_limit_is_said_to_be_capped(served, tiny_checkpoint, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen["max_denoising_steps"] = 40
    (model / "generation_config.json").write_text(json.dumps(gen))
    code, state, out = served(str(model), "--max-steps-limit", "8")
    assert code == 0, out.err
    assert state.defaults.max_denoising_steps == 8
    assert "sampler default max_denoising_steps=8 (the generation config's 40 capped by --max-steps-limit 8)" \
        in out.out


def test_no_tokenizer_is_said_at_start_up(served, tiny_checkpoint, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    (bare / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="canvaslm.server"):
        code, state, out = served(str(bare))
    assert code == 0 and state.tokenizer is None
    assert f"{bare} has no tokenizer.json: serving without a tokenizer, so only prompts given as token ids are " \
           "served" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="canvaslm.server"):
        code, state, out = served(str(tiny_checkpoint))
    assert code == 0 and state.tokenizer is not None and "tokenizer" not in caplog.text
