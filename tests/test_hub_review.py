"""canvaslm.hub: the files a repo id's snapshot holds (named chat templates in additional_chat_templates/
included, other sub-folders not) and offline mode as huggingface_hub reads it (TRANSFORMERS_OFFLINE too).
No test here reaches the network: snapshot_download is stubbed, or the cache alone is read."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("huggingface_hub")

from canvaslm.hub import CHECKPOINT_FILES, SKIP, offline, resolve_model  # noqa: E402

COMMIT = "c" * 40
REMOTE = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja", "additional_chat_templates/tool_use.jinja", "README.md",
          "original/consolidated.safetensors", "original/params.json", "gguf/model.json",
          "additional_chat_templates/old/tool_use.jinja", "additional_chat_template/x.jinja",
          "additional_chat_templatesX/x.jinja", "additional/x.jinja", "a/x.json", "x/additional_chat_templates/y.jinja"]
FETCHED = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           "chat_template.jinja", "additional_chat_templates/tool_use.jinja"]


def test_the_patterns_keep_named_chat_templates_and_only_them_from_sub_folders():
    from huggingface_hub.utils import filter_repo_objects

    assert list(filter_repo_objects(REMOTE, allow_patterns=CHECKPOINT_FILES, ignore_patterns=SKIP)) == FETCHED
    # every other first folder, however close to additional_chat_templates, is skipped
    name = "additional_chat_templates"
    near = [name[:i] + "/t.jinja" for i in range(1, len(name))]
    near += [name[:i] + "Z" + name[i + 1:] + "/t.jinja" for i in range(len(name))]
    assert list(filter_repo_objects(near, allow_patterns=CHECKPOINT_FILES, ignore_patterns=SKIP)) == []


@pytest.fixture()
def online(monkeypatch, tmp_path, tiny_checkpoint):
    """snapshot_download stubbed as the Hub would answer for a repo holding REMOTE (the tiny checkpoint's files
    plus a named tool_use template and files it must skip), filtered as huggingface_hub filters; -> its calls."""
    import huggingface_hub

    source = tmp_path / "remote"
    shutil.copytree(tiny_checkpoint, source)
    for f in REMOTE:
        if not (source / f).exists():
            (source / f).parent.mkdir(parents=True, exist_ok=True)
            (source / f).write_text("{{ 'tool use: ' }}{{ messages[0]['content'] }}" if f.endswith(".jinja") else "{}")
    calls = []

    def fake(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, local_files_only=False, **kw):
        from huggingface_hub.utils import filter_repo_objects

        calls.append(dict(repo_id=repo_id, local_files_only=local_files_only))
        snap = tmp_path / "hub" / COMMIT
        for f in filter_repo_objects(REMOTE, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snap / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / f, snap / f)
        return str(snap)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_a_repos_named_chat_templates_are_fetched(online):
    from canvaslm.tokenizer import Tokenizer

    snap = resolve_model("acme/tools")
    held = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
    assert held == sorted(FETCHED)
    tok = Tokenizer.from_dir(snap)
    assert "tool_use" in tok.chat_templates, sorted(tok.chat_templates)
    assert not (snap / "original").exists() and not (snap / "additional_chat_templates" / "old").exists()


@pytest.mark.parametrize("env,is_offline", [
    ({}, False),
    ({"HF_HUB_OFFLINE": "1"}, True),
    ({"TRANSFORMERS_OFFLINE": "1"}, True),
    ({"TRANSFORMERS_OFFLINE": "yes"}, True),
    ({"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "1"}, True),
    ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False),  # huggingface_hub's rule: HF_HUB_OFFLINE wins
    ({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "0"}, True),
])
def test_offline_mode_is_read_as_huggingface_hub_reads_it(monkeypatch, env, is_offline):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert offline() is is_offline


def test_transformers_offline_reads_only_the_cache_and_says_so(online, monkeypatch, tmp_path):
    """TRANSFORMERS_OFFLINE=1 alone: the look-up is local_files_only, and a missing or partial model names it."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    resolve_model("acme/tools")
    assert online == [dict(repo_id="acme/tools", local_files_only=True)]

    def missing(repo_id, **kw):
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(FileNotFoundError, match=r"acme/none is not in the Hugging Face cache .* and "
                                                r"TRANSFORMERS_OFFLINE is set"):
        resolve_model("acme/none")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(partial))
    with pytest.raises(FileNotFoundError, match=r"only partly in the Hugging Face cache .*no weights\) and "
                                                r"TRANSFORMERS_OFFLINE is set"):
        resolve_model("acme/partial")

