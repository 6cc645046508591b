"""Hugging Face datasets as training data (train/data.py): a dataset dir or repo id read with the `datasets`
library, offline. Rows mean what the same dicts mean in a JSONL file; `columns` renames; TRL's
prompt/completion formats; every failure names the dataset and split."""

from __future__ import annotations

import json

import pytest

from canvaslm.train.data import DataError, load_examples
from canvaslm.train.trainer import TrainConfig, Trainer

from .helpers import tiny_config

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from canvaslm.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_checkpoint)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHAT = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(3)]


def test_a_dataset_dir_reads_like_the_same_jsonl(tmp_path, tok):
    ds = tmp_path / "ds"
    write_jsonl(ds / "train.jsonl", CHAT)
    write_jsonl(ds / "test.jsonl", CHAT[:1])
    want = load_examples(str(write_jsonl(tmp_path / "chat.jsonl", CHAT)), tok)
    assert load_examples(str(ds), tok) == want  # a directory: its train split
    assert load_examples(f"hf:{ds}", tok) == want
    assert load_examples({"dataset": str(ds), "split": "test"}, tok) == want[:1]
    assert load_examples({"dataset": str(ds), "max_examples": 2}, tok) == want[:2]


@pytest.mark.parametrize("rows", [
    [{"prompt": "ab", "response": "cd"}, CHAT[0]],
    [{"prompt": "ab", "response": "cd"}, {"prompt_ids": [2, 5], "response_ids": [6]}],
], ids=["text+chat", "text+ids"])
def test_rows_of_several_formats_read_as_in_jsonl(tmp_path, tok, rows):
    """datasets gives every row every column, null where the row had none: a text row held messages=None and
    was refused as a bad conversation."""
    write_jsonl(tmp_path / "mixed" / "train.jsonl", rows)
    want = load_examples(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), tok)
    assert len(want) == 2 and load_examples(str(tmp_path / "mixed"), tok) == want


def test_columns_rename_and_trl_formats(tmp_path, tok):
    alpaca = [{"instruction": f"say {w}", "output": w} for w in ("yes", "no")]
    write_jsonl(tmp_path / "alpaca" / "train.jsonl", alpaca)
    got = load_examples({"dataset": str(tmp_path / "alpaca"), "columns": {"prompt": "instruction",
                                                                          "response": "output"}}, tok)
    plain = [{"prompt": r["instruction"], "response": r["output"]} for r in alpaca]
    assert got == load_examples(str(write_jsonl(tmp_path / "plain.jsonl", plain)), tok)
    # TRL's standard prompt-completion rows
    trl = [{"prompt": r["prompt"], "completion": r["response"]} for r in plain]
    assert load_examples(str(write_jsonl(tmp_path / "trl.jsonl", trl)), tok) == got
    # ... and its conversational form: the completion's turns are trained, the prompt's are context
    conv = [{"prompt": c["messages"][:1], "completion": c["messages"][1:]} for c in CHAT]
    assert load_examples(str(write_jsonl(tmp_path / "conv.jsonl", conv)), tok) == \
        load_examples(str(write_jsonl(tmp_path / "chat.jsonl", CHAT)), tok)
    two_turns = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}], "completion": [{"role": "assistant", "content": "d"}]}
    (only,) = load_examples(str(write_jsonl(tmp_path / "two.jsonl", [two_turns])), tok)
    assert tok.decode(only[1], skip_special_tokens=False).startswith("d")


@pytest.mark.parametrize("spec,needle", [
    ({"dataset": "nobody/no-such-dataset"}, "'nobody/no-such-dataset' split 'train' cannot be read.*offline"),
    ({"dataset": "DIR", "split": "validation"}, "split 'validation' cannot be read"),
    ({"dataset": "DIR", "columns": {"prompt": "question"}}, r"columns \['question'\].*not in the dataset"),
    ({"dataset": "DIR", "shuffle": True}, "unknown: \\['shuffle'\\]"),
    ({"dataset": "DIR", "max_examples": 0}, "max_examples must be a positive integer"),
    ({"dataset": "DIR", "columns": ["prompt"]}, "'columns' must map"),
])
def test_bad_sources_name_the_dataset(tmp_path, tok, spec, needle):
    write_jsonl(tmp_path / "d" / "train.jsonl", CHAT)
    spec = {k: (str(tmp_path / "d") if v == "DIR" else v) for k, v in spec.items()}
    with pytest.raises(DataError, match=needle):
        load_examples(spec, tok)


def test_without_the_datasets_package_the_error_says_so(tmp_path, tok, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *a, **kw):
        if name == "datasets":
            raise ImportError("no module named datasets")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="pip install datasets"):
        load_examples("hf:owner/name", tok)


def test_training_on_a_dataset_end_to_end(tmp_path, tiny_checkpoint):
    ds = tmp_path / "ds"
    write_jsonl(ds / "train.jsonl", CHAT * 2)
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, model=str(tiny_checkpoint),
                                            data={"train": {"dataset": str(ds)}, "eval": f"hf:{ds}"},
                                            max_steps=1, batch_size=2, lora={"rank": 2}))
    Trainer(cfg).train()


def test_a_mapped_column_wins_over_the_datasets_own_of_that_name(tmp_path, tok):
    """columns: {response_ids: gold} on a dataset that also has response_ids trains on gold, whatever the column
    order; a mapped prompt / response wins over a messages column (both were silently the other way round)."""
    d = write_jsonl(tmp_path / "a" / "train.jsonl", [{"gold": [9, 9], "prompt_ids": [2, 5], "response_ids": [7, 7]}])
    assert load_examples({"dataset": str(d.parent), "columns": {"response_ids": "gold"}}) == [([2, 5], [9, 9])]
    d = write_jsonl(tmp_path / "b" / "train.jsonl", [{"question": "q", "answer": "GOLD", "messages": [
        {"role": "user", "content": "old"}, {"role": "assistant", "content": "OLD"}]}])
    [(_, response)] = load_examples({"dataset": str(d.parent), "columns": {"prompt": "question", "response": "answer"}},
                                    tok)
    assert tok.decode(response, skip_special_tokens=False) == "GOLD"


def test_a_saved_dataset_loads_as_saved(tmp_path):
    """Dataset.save_to_disk / DatasetDict.save_to_disk directories load (load_dataset refused them, its message
    pointing at a load_from_disk no config key reaches)."""
    rows = [{"prompt_ids": [2, 5], "response_ids": [7]}] * 3
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert load_examples(str(tmp_path / "one")) == [([2, 5], [7])] * 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_examples({"dataset": str(tmp_path / "dict"), "split": "test"})) == 1
    with pytest.raises(DataError, match=r"the saved dataset has splits \['test', 'train'\], not 'dev'"):
        load_examples({"dataset": str(tmp_path / "dict"), "split": "dev"})


def test_a_dataset_mappings_keys_are_checked_with_the_config(tmp_path):
    import yaml

    from canvaslm.config import ConfigError

    cfg = tiny_config(tmp_path)
    cfg["data"] = {"train": {"dataset": str(tmp_path), "splt": "test"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"c.yaml: data.train: .*unknown: \['splt'\]"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
