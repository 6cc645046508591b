"""`canvaslm serve REPO` / `run-batch REPO` refuse a flag that needs no model before the repo id is resolved:
online, resolving it downloads the checkpoint (~50 GB for the 26B-A4B model) only to refuse the flag."""

from __future__ import annotations

import pytest

pytest.importorskip("huggingface_hub")

from canvaslm.cli import main  # noqa: E402

REPO = "acme/never-fetched"


@pytest.fixture()
def downloads(monkeypatch):
    """snapshot_download stubbed (online: HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE unset): the repo ids it
    was asked for; it fails as a download that came to nothing, so a resolved model never loads."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake(repo_id, **kw):
        calls.append(repo_id)
        raise LocalEntryNotFoundError("the test's stub downloads nothing")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


REFUSED = [
    (["-tp", "2"], "--tensor-parallel-size 2: canvaslm runs on one device"),
    (["--chat-template", "/nonexistent/tpl.jinja"], "--chat-template: /nonexistent/tpl.jinja does not exist"),
    (["--chat-template", "{% if %}"], "--chat-template"),  # a syntax error, inline
    (["--generation-config", "/nonexistent"], "--generation-config /nonexistent: no generation_config.json"),
    (["--default-chat-template-kwargs", '{"messages": []}'], "--default-chat-template-kwargs may not set messages"),
    (["--hf-overrides", '{"num_hidden_layers": 2}'], "key 'num_hidden_layers' is not one this engine takes"),
    (["--diffusion-config", '{"sampler": "greedy"}'], "entropy_bound sampler only"),
]


@pytest.mark.parametrize("flags,needle", REFUSED)
def test_serve_refuses_before_resolving_the_repo_id(downloads, capsys, flags, needle):
    assert main(["serve", REPO, *flags, "--device", "cpu"]) == 2
    assert needle in capsys.readouterr().err
    assert downloads == []


@pytest.mark.parametrize("flags,needle", [f for f in REFUSED if f[0][0] != "--chat-template"])  # serve's only
def test_run_batch_refuses_before_resolving_the_repo_id(downloads, capsys, tmp_path, flags, needle):
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", '
                     '"body": {"model": "m", "prompt": "hi"}}\n')
    assert main(["run-batch", REPO, "-i", str(batch), "-o", str(tmp_path / "out.jsonl"), *flags,
                 "--device", "cpu"]) == 2
    assert needle in capsys.readouterr().err
    assert downloads == []


def test_flags_that_need_the_model_still_resolve_it_once(downloads, capsys):
    """The stub's failure is what a plain serve of a missing repo reports: it was asked for the repo once."""
    assert main(["serve", REPO, "--diffusion-config", '{"canvas_length": 16}', "--device", "cpu"]) == 2
    assert "could not be downloaded" in capsys.readouterr().err
    assert downloads == [REPO]


def test_a_chat_template_still_needs_the_models_tokenizer(tmp_path, capsys, tiny_checkpoint):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    (bare / "tokenizer.json").unlink()
    assert main(["serve", str(bare), "--chat-template", "{{ messages }}", "--device", "cpu"]) == 2
    assert f"--chat-template: {bare} has no tokenizer.json to apply it to" in capsys.readouterr().err
