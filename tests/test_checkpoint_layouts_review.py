"""A directory holding both model.safetensors and model.safetensors.index.json (what transformers'
save_pretrained leaves when it saves one layout over the other) loads model.safetensors, as transformers
loads it, with a warning naming both files. Also: config.json's num_hidden_layers far out of range is a
ConfigError naming the field."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from canvaslm.checkpoint import CheckpointError, load_model, save_model
from canvaslm.config import ConfigError, ModelConfig
from canvaslm.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """(single: model.safetensors of seed 5, sharded: index + shards of seed 0)."""
    root = tmp_path_factory.mktemp("layouts")
    single = make_tiny_checkpoint(root / "single", seed=5)
    sharded = save_model(load_model(make_tiny_checkpoint(root / "src", seed=0)), root / "sharded",
                         max_shard_bytes=20_000)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    return single, sharded


def _state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}


def _same(a, b) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_wins_over_a_stale_index(layouts, tmp_path, caplog):
    """A single-file save over a sharded one: the old index (its shards gone or not) is not read."""
    single, sharded = layouts
    both = tmp_path / "single_over_sharded"
    shutil.copytree(single, both)
    shutil.copy(sharded / "model.safetensors.index.json", both)  # its shards gone: the index lists missing files
    with caplog.at_level(logging.WARNING, logger="canvaslm"):
        model = load_model(both)
    assert _same(model, load_model(single))
    assert f"{both} holds both model.safetensors and model.safetensors.index.json; loading model.safetensors" \
        in caplog.text


def test_single_file_wins_over_shards_saved_later(layouts, tmp_path, caplog):
    """A sharded save over a single-file one: transformers loads the old model.safetensors, and so do we."""
    single, sharded = layouts
    both = tmp_path / "sharded_over_single"
    shutil.copytree(sharded, both)
    shutil.copy(single / "model.safetensors", both)
    with caplog.at_level(logging.WARNING, logger="canvaslm"):
        model = load_model(both)
        load_model(both)
    assert _same(model, load_model(single)) and not _same(model, load_model(sharded))
    assert caplog.text.count("holds both model.safetensors and model.safetensors.index.json") == 1  # once a dir


def test_transformers_reads_the_same_file(layouts, tmp_path):
    transformers = pytest.importorskip("transformers")
    single, sharded = layouts
    both = tmp_path / "both"
    shutil.copytree(sharded, both)
    shutil.copy(single / "model.safetensors", both)
    if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        pytest.skip("this transformers has no DiffusionGemma")
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(both)
    theirs = ref.get_input_embeddings().weight
    ours = load_model(both).embed_weight
    assert torch.equal(ours.to(theirs.dtype), theirs)


def test_one_layout_alone_loads_as_before(layouts, tmp_path):
    single, sharded = layouts
    assert _same(load_model(sharded), load_model(sharded))
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    next(broken.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shard files that are missing"):
        load_model(broken)


@pytest.mark.parametrize("layers", [10**30, 2**63, 4097])
def test_a_huge_num_hidden_layers_is_a_config_error(layouts, layers):
    cfg = json.loads((layouts[0] / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = layers
    with pytest.raises(ConfigError, match=rf"config.json: text_config.num_hidden_layers must be at most 4096, "
                                          rf"got {layers}"):
        ModelConfig.from_dict(cfg)


def test_a_malformed_index_is_named_where_it_is_read(layouts, tmp_path):
    """The index is read only without a model.safetensors beside it; there, a malformed one is named."""
    single, sharded = layouts
    d = tmp_path / "bad_index"
    shutil.copytree(sharded, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1, 2]}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weight_map must map tensor names"):
        load_model(d)
    shutil.copy(single / "model.safetensors", d)
    assert _same(load_model(d), load_model(single))
