"""Checkpoints named by Hugging Face repo id (canvaslm.hub), read from a Hugging Face cache laid out as
`hf download` leaves it. HF_HUB_OFFLINE is set throughout: nothing here may reach the network."""

from __future__ import annotations

import shutil
import types

import pytest

pytest.importorskip("huggingface_hub")

from canvaslm.hub import is_repo_id, resolve_model  # noqa: E402

COMMIT, TAGGED = "a" * 40, "b" * 40


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, tiny_checkpoint):
    """A cache holding acme/tiny-dg at main (COMMIT) and at tag v1 (TAGGED)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--tiny-dg"
    for ref, commit in (("main", COMMIT), ("v1", TAGGED)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_repo_ids_resolve_through_the_cache(hub_cache):
    assert resolve_model("acme/tiny-dg") == hub_cache / "snapshots" / COMMIT
    assert resolve_model("acme/tiny-dg", revision="v1") == hub_cache / "snapshots" / TAGGED


def test_a_local_directory_wins_and_errors_name_the_problem(hub_cache, tmp_path, monkeypatch, tiny_checkpoint):
    assert resolve_model(tiny_checkpoint) == tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "tiny-dg").mkdir(parents=True)
    assert not is_repo_id("acme/tiny-dg") and resolve_model("acme/tiny-dg").resolve() == tmp_path / "acme" / "tiny-dg"
    with pytest.raises(FileNotFoundError, match=r"acme/other is not in the Hugging Face cache .*hub.*"
                                                r"HF_HUB_OFFLINE is set \(nor is it a local directory\).*hf download acme/other"):
        resolve_model("acme/other")
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        resolve_model("./missing/dir/here")
    with pytest.raises(ValueError, match="--revision v1 applies to a Hugging Face repo id"):
        resolve_model(tiny_checkpoint, revision="v1")


def test_llm_and_cli_load_a_repo_id(hub_cache, tiny_checkpoint, capsys):
    import json

    from canvaslm.cli import main
    from canvaslm.llm import LLM, SamplingParams

    p = SamplingParams(max_new_tokens=8, seed=3)
    by_id = LLM("acme/tiny-dg", device="cpu")
    assert by_id.generate(["hi"], p)[0].token_ids == LLM(tiny_checkpoint, device="cpu").generate(["hi"], p)[0].token_ids
    assert main(["generate", "acme/tiny-dg", "--revision", "v1", "--prompt", "hi", "--max-new-tokens", "8",
                 "--seed", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == by_id.generate(["hi"], p)[0].token_ids
    assert main(["generate", "acme/nope", "--prompt", "hi"]) == 2
    assert "hf download acme/nope" in capsys.readouterr().err


def test_serve_names_the_model_by_its_repo_id(hub_cache):
    from canvaslm.cli import build_parser
    from canvaslm.server.cli import _resolve_model

    args = build_parser().parse_args(["serve", "acme/tiny-dg"])
    _resolve_model(args)
    assert args.served_model_name == "acme/tiny-dg" and args.model_dir == str(hub_cache / "snapshots" / COMMIT)
    args = build_parser().parse_args(["serve", "acme/tiny-dg", "--served-model-name", "x"])
    _resolve_model(args)
    assert args.served_model_name == "x"


def test_a_train_config_may_name_a_repo_id(hub_cache):
    from canvaslm.config import ConfigError
    from canvaslm.train.checkpointing import model_dir, tokenizer_dir

    config = types.SimpleNamespace(model="acme/tiny-dg", tokenizer=None)
    assert model_dir(config) == tokenizer_dir(config) == hub_cache / "snapshots" / COMMIT
    with pytest.raises(ConfigError, match="train config: model acme/none is not in the Hugging Face cache"):
        model_dir(types.SimpleNamespace(model="acme/none"))


def test_a_lora_adapter_may_be_a_repo_id(hub_cache, tiny_checkpoint, tmp_path):
    """`--lora-modules name=owner/adapter` and LLM(lora_modules=...) read an adapter repo from the cache."""
    import torch

    from canvaslm.checkpoint import load_model
    from canvaslm.lora_serving import AdapterError, read_adapter, write_adapter

    model = load_model(tiny_checkpoint)
    lin = dict(model.named_modules())["model.decoder.layers.0.self_attn.q_proj"]
    g = torch.Generator().manual_seed(0)
    local = write_adapter(tmp_path / "ad", {"model.decoder.layers.0.self_attn.q_proj": (
        torch.randn(2, lin.in_features, generator=g), torch.randn(lin.out_features, 2, generator=g))}, rank=2, alpha=2.0)
    repo = hub_cache.parent / "models--acme--tiny-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(local, repo / "snapshots" / COMMIT)
    by_id, by_dir = read_adapter("acme/tiny-lora", "x"), read_adapter(local, "x")
    assert by_id.rank == by_dir.rank == 2 and by_id.path == repo / "snapshots" / COMMIT
    assert all(torch.equal(a, b) for a, b in zip(by_id.weights["model.decoder.layers.0.self_attn.q_proj"],
                                                 by_dir.weights["model.decoder.layers.0.self_attn.q_proj"]))
    with pytest.raises(AdapterError, match="LoRA adapter acme/none is not in the Hugging Face cache"):
        read_adapter("acme/none", "y")


def test_memory_reads_only_the_config_of_a_repo_id(hub_cache, capsys):
    from canvaslm.cli import main

    assert main(["memory", "acme/tiny-dg", "--gpu-memory", "4", "--overhead", "0.1", "--dtype", "float32"]) == 0
    assert "acme/tiny-dg: weights 0.0 GiB (float32)" in capsys.readouterr().out
    assert main(["memory", "acme/none", "--gpu-memory", "1"]) == 2
    assert "acme/none: cannot read its config.json" in capsys.readouterr().err


def test_a_snapshot_without_weights_is_said_to_be_partly_cached(hub_cache, capsys):
    """Offline, a snapshot holding only config.json (what `canvaslm memory REPO` leaves) is named as partly in
    the cache, with how to download it, rather than a bare 'no model.safetensors' on the snapshot path."""
    from canvaslm.cli import main

    repo = hub_cache.parent / "models--acme--partial"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    shutil.copy(hub_cache / "snapshots" / COMMIT / "config.json", repo / "snapshots" / COMMIT)
    with pytest.raises(FileNotFoundError, match=r"model acme/partial is only partly in the Hugging Face cache "
                                                r"\(.*holds config.json; no weights\) and HF_HUB_OFFLINE is set; "
                                                r"download it with `hf download acme/partial`"):
        resolve_model("acme/partial")
    capsys.readouterr()
    assert main(["serve", "acme/partial", "--device", "cpu"]) == 2
    assert "acme/partial is only partly in the Hugging Face cache" in capsys.readouterr().err


def _adapter_repo(hub_cache, local, name: str, files):
    """Adapter repo acme/<name> in the cache at main, holding `files` of adapter directory `local`."""
    repo = hub_cache.parent / f"models--acme--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    for f in files:
        shutil.copy(local / f, repo / "snapshots" / COMMIT / f)
    return repo / "snapshots" / COMMIT


@pytest.fixture()
def bin_adapter(tmp_path, tiny_checkpoint):
    """An adapter directory with both weight files: adapter_model.safetensors and its adapter_model.bin twin."""
    import torch
    from safetensors.torch import load_file

    from canvaslm.checkpoint import load_model
    from canvaslm.lora_serving import write_adapter

    q = "model.decoder.layers.0.self_attn.q_proj"
    lin = dict(load_model(tiny_checkpoint).named_modules())[q]
    local = write_adapter(tmp_path / "ad", {q: (torch.ones(2, lin.in_features), torch.ones(lin.out_features, 2))},
                          rank=2, alpha=2.0)
    torch.save(load_file(str(local / "adapter_model.safetensors")), local / "adapter_model.bin")
    return local


def test_a_bin_only_adapter_repo_reads_from_the_cache(hub_cache, bin_adapter):
    """Offline, an adapter repo holding adapter_model.bin (older peft) is whole, not 'only partly' cached."""
    from canvaslm.lora_serving import read_adapter

    snap = _adapter_repo(hub_cache, bin_adapter, "bin-lora", ["adapter_config.json", "adapter_model.bin"])
    ad = read_adapter("acme/bin-lora", "x")
    assert ad.path == snap and ad.rank == 2 and float(ad.weights["model.decoder.layers.0.self_attn.q_proj"][0].sum()) > 0


def test_adapter_bin_is_fetched_only_without_safetensors(hub_cache, bin_adapter, monkeypatch):
    """Online, the adapter's files are asked for as a checkpoint's, and adapter_model.bin only for a repo
    without adapter_model.safetensors (what vLLM loads either way)."""
    import fnmatch

    import huggingface_hub

    from canvaslm.hub import resolve_adapter

    remote = {"acme/st-lora": ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"],
              "acme/bin-lora": ["adapter_config.json", "adapter_model.bin", "README.md"]}
    asked = []

    def fake_download(name, revision=None, allow_patterns=None, ignore_patterns=None, local_files_only=False):
        asked.append((name, allow_patterns))
        snap = hub_cache.parent / name.replace("/", "--") / COMMIT
        snap.mkdir(parents=True, exist_ok=True)
        for f in remote[name]:
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                shutil.copy(bin_adapter / f, snap / f)
        return str(snap)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    (bin_adapter / "README.md").write_text("an adapter")
    st = resolve_adapter("acme/st-lora")
    assert sorted(p.name for p in st.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(asked) == 1
    b = resolve_adapter("acme/bin-lora")
    assert sorted(p.name for p in b.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    assert asked[1:] == [("acme/bin-lora", asked[0][1]), ("acme/bin-lora", ["adapter_model.bin"])]
