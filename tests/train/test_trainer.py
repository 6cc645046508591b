"""Trainer: config validation, schedule, gradient accumulation, resume after a kill, export, CLI, data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from canvaslm.checkpoint import load_model
from canvaslm.config import ConfigError
from canvaslm.kv_cache import KVCache
from canvaslm.train.data import DataError, ExampleStream, load_examples
from canvaslm.train.trainer import TrainConfig, Trainer, kept_for_backward, lr_factor

from .helpers import tiny_config


def test_config_validation(tmp_path):
    base = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown keys \['learning_rate'\]"):
        TrainConfig.from_dict({**base, "learning_rate": 1})
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig.from_dict({**base, "batch_size": 6, "grad_accum": 4})
    with pytest.raises(ConfigError, match="model"):
        TrainConfig.from_dict({**base, "model": {"shape": "tiny"}})
    with pytest.raises(ValueError, match="lora: unknown keys"):
        TrainConfig.from_dict({**base, "lora": {"rnk": 4}})
    (tmp_path / "c.yaml").write_text("max_steps: 3\nout_dir: run\nmodel: {init: {shape: tiny}}\ndata: x.jsonl\n"
                                     "sc_probability: 0.5\n")
    with pytest.raises(ConfigError, match="sc_probability"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


def test_config_values_are_type_checked_naming_the_file(tmp_path):
    import yaml

    from canvaslm.shapes import SHAPES, text_config

    base = tiny_config(tmp_path, max_steps=1)
    path = tmp_path / "c.yaml"
    # PyYAML (YAML 1.1) reads 1e-4, without a dot, as a string: a float field takes it as the number
    rest = {k: v for k, v in base.items() if k not in ("lr", "weight_decay", "clip", "betas")}
    path.write_text(yaml.safe_dump(rest) + "lr: 1e-4\nweight_decay: '1e-2'\nclip: null\nbetas: [0.9, 9.9e-1]\n")
    c = TrainConfig.from_yaml(path)
    assert (c.lr, c.weight_decay, c.clip, c.betas) == (1e-4, 1e-2, None, (0.9, 0.99)) and isinstance(c.lr, float)
    assert Trainer(c).train()[-1]["grad_norm"] > 0  # clip: null is off
    init = base["model"]["init"]
    assert set(SHAPES) == {s for s in SHAPES if text_config(s)}  # every name builds
    cases = [({"model": {"init": {**init, "shape": "huge"}}}, "model.init.shape must be one of 26b-a4b, small, "
                                                               "tiny, got 'huge'"),
             ({"lr": "fast"}, "lr must be a number, got 'fast'"),
             ({"seed": 1.5}, "seed must be an integer, got 1.5"),
             ({"batch_size": 4.0}, "batch_size must be an integer, got 4.0"),
             ({"max_steps": True}, "max_steps must be an integer, got True"),
             ({"eval_every": "10"}, "eval_every must be an integer, got '10'"),
             ({"plot": "yes"}, "plot must be true or false, got 'yes'"),
             ({"tokenizer": 3}, "tokenizer must be a string or null, got 3"),
             ({"betas": 0.9}, "betas must be a pair of numbers, got 0.9"),
             ({"betas": [0.9, 1.5]}, "betas must be two numbers in [0, 1)"),
             ({"clip": -1}, "clip must be a number >= 0 (0 or null: no clipping)"),
             ({"lora": 8}, "lora must be a mapping or null, got 8"),
             ({"lora": {"rank": "8"}}, "lora.rank must be an integer, got '8'"),
             ({"lora": {"targets": "q_proj"}}, "lora.targets must be a list of strings, got 'q_proj'"),
             ({"data": ["a", "b"]}, "data must be a string or a mapping, got ['a', 'b']"),
             ({"data": {**base["data"], "eval_size": "ten"}}, "data.eval_size must be an integer, got 'ten'"),
             ({"data": {**base["data"], "eval_size": -1}}, "data.eval_size must be an integer >= 0"),
             ({"model": {"init": [1]}}, "model.init must be a mapping, got [1]"),
             ({"model": {"init": {**init, "seed": "x"}}}, "model.init.seed must be an integer, got 'x'"),
             ({"eval_max_examples": 0}, "eval_max_examples must be a positive integer, got 0"),
             ({"device": "gpu"}, "device must be auto | cpu | cuda | cuda:N, got 'gpu'"),
             ({"export_dtype": "bf16x"}, "export_dtype: unknown dtype 'bf16x'"),
             ({"generation": {"foo": 1}}, "generation: unknown keys ['foo']"),
             ({"generation": {"t_min": "low"}}, "generation.t_min must be a number, got 'low'"),
             ({"generation": {"max_new_tokens": 0}}, "generation: generation parameter max_new_tokens must be")]
    for change, msg in cases:
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_yaml(path)
        assert str(e.value).startswith(f"{path}: ") and msg in str(e.value), (change, str(e.value))
    path.write_text("max_steps: [1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: expected ',' or '\]', but got .* at line 2"):
        TrainConfig.from_yaml(path)
    path.write_text(yaml.safe_dump(base) + "lr: 5.0\n")  # a key twice: PyYAML kept the last, silently
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: key 'lr' appears twice in one mapping \(first at "
                                          r"line \d+\) at line \d+"):
        TrainConfig.from_yaml(path)
    path.write_text("base: &b {lr: 0.001, batch_size: 2}\nother:\n  <<: *b\n  lr: 0.002\n")  # a merge's key may be
    import canvaslm.train.typecheck as tc  # overridden

    assert tc.safe_load_unique(path.read_text())["other"] == {"lr": 0.002, "batch_size": 2}
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the config file \(No such file"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device 'cuda', but CUDA is not available .*use device: cpu or auto"):
            Trainer(TrainConfig.from_dict({**base, "device": "cuda"}))


def test_config_refuses_values_that_cannot_train(tmp_path):
    import yaml

    base = tiny_config(tmp_path, max_steps=1)
    init = base["model"]["init"]
    path = tmp_path / "c.yaml"
    cases = [({"diffusion_weight": -1}, "diffusion_weight must be a finite number >= 0, got -1.0"),
             ({"ar_weight": float("nan")}, "ar_weight must be a finite number >= 0, got nan"),
             ({"diffusion_weight": float("inf")}, "diffusion_weight must be a finite number >= 0, got inf"),
             ({"diffusion_weight": 0, "ar_weight": 0}, "diffusion_weight and ar_weight are both 0: nothing to train"),
             ({"ar_only": True, "ar_weight": 0}, "ar_weight must be > 0 with ar_only"),
             ({"data": {"train": ""}}, "data.train is required"),
             ({"data": {**base["data"], "eval": ""}}, "data.eval must not be empty"),
             ({"data": {**base["data"], "eval": "e.jsonl"}}, "data.eval_size does not combine with data.eval"),
             ({"lora": {"targets": []}}, "lora.targets is empty and lora.include_experts is false"),
             ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
             ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
             ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0, got inf"),
             ({"model": {"init": {**init, "std": float("nan")}}},
              "model.init.std must be a finite number >= 0, got nan"),
             ({"model": {"init": {**init, "std": -1}}}, "model.init.std must be a finite number >= 0, got -1.0"),
             ({"seed": 2**45}, "seed must be an integer with absolute value below 2**40 = 1099511627776, got "
                               "35184372088832"),
             ({"model": {"init": {**init, "seed": -2**40}}}, "model.init.seed must be an integer with absolute "
                                                            "value below 2**40")]
    for change, msg in cases:
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_yaml(path)
        assert str(e.value).startswith(f"{path}: ") and msg in str(e.value), (change, str(e.value))
    for ok in ({"diffusion_weight": 0}, {"ar_weight": 0}, {"ar_only": True, "diffusion_weight": 0},
               {"lora": {"targets": [], "include_experts": True}}, {"data": {**base["data"], "eval_size": 0,
                                                                             "eval": "e.jsonl"}},
               {"seed": 2**40 - 1}, {"seed": -2**40 + 1}, {"model": {"init": {**init, "seed": 2**40 - 1}}}):
        TrainConfig.from_dict({**base, **ok})
    for seed in (2**40 - 1, -2**40 + 1):  # the extreme seeds order examples (torch takes the epoch seeds)
        assert sorted(ExampleStream(5, seed).indices(0, 5)) == list(range(5))


def test_resume_with_a_longer_run_follows_the_new_schedule(tmp_path):
    """The first step after resuming with a larger max_steps (or other warmup / min_lr_ratio) uses the new
    schedule's lr, not the one the optimizer saved (the old schedule's next lr)."""
    full = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "full", max_steps=8, warmup_steps=2))).train()
    short = tiny_config(tmp_path / "short", max_steps=4, warmup_steps=2)
    Trainer(TrainConfig.from_dict(short)).train()
    again = Trainer(TrainConfig.from_dict({**short, "max_steps": 8}), resume=True).train()
    assert [r["lr"] for r in again[4:]] == pytest.approx([r["lr"] for r in full[4:]], rel=1e-12)
    assert again[4]["lr"] == pytest.approx(3e-3 * lr_factor(4, 2, 8, 0.1))
    changed = Trainer(TrainConfig.from_dict({**short, "max_steps": 10, "warmup_steps": 6, "min_lr_ratio": 0.5}),
                      resume=True).train()
    assert [r["lr"] for r in changed[8:]] == pytest.approx([3e-3 * lr_factor(s, 6, 10, 0.5) for s in (8, 9)])


def test_a_new_run_refuses_an_out_dir_holding_another_run(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2, save_every=1)
    Trainer(TrainConfig.from_dict(cfg)).train()
    run = Path(cfg["out_dir"])
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(ConfigError) as e:
        Trainer(TrainConfig.from_dict({**cfg, "max_steps": 1, "lr": 1e-3}))
    assert str(e.value) == (f"out_dir {run} holds an earlier run (checkpoint-0000001, checkpoint-0000002, latest): "
                            "pass --resume to continue it, or train into another (or an empty) out_dir")
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # metrics.jsonl and all: untouched
    (run / "latest").unlink()
    with pytest.raises(ConfigError, match=r"holds an earlier run \(checkpoint-0000001, checkpoint-0000002\)"):
        Trainer(TrainConfig.from_dict(cfg))
    assert Trainer(TrainConfig.from_dict({**cfg, "max_steps": 3}), resume=True).step == 2  # --resume continues
    fresh = TrainConfig.from_dict({**cfg, "out_dir": str(tmp_path / "other")})
    Trainer(fresh)  # writes metrics.jsonl, saves nothing
    assert Trainer(fresh).step == 0  # an out_dir without checkpoints is fine


@pytest.mark.parametrize("resume", [False, True])
def test_an_out_dir_that_cannot_be_a_directory_is_refused_before_any_work(tmp_path, resume):
    cfg = tiny_config(tmp_path)
    data = Path(cfg["data"]["train"])
    before = data.read_bytes()
    with pytest.raises(ConfigError) as e:
        Trainer(TrainConfig.from_dict({**cfg, "out_dir": str(data)}), resume=resume)
    assert str(e.value) == (f"train config: out_dir {data} is a file, not a directory; name a directory for the "
                            "run's checkpoints")
    with pytest.raises(ConfigError, match=rf"train config: out_dir .*run: cannot be created: {data} is not a dir"):
        Trainer(TrainConfig.from_dict({**cfg, "out_dir": str(data / "run")}), resume=resume)
    assert data.read_bytes() == before


def test_rotation_and_resume_take_only_numbered_checkpoints(tmp_path):
    """A user's checkpoint-best copy in out_dir is kept by the rotation and never resumed from; the latest
    checkpoint is the highest step, also past 7 digits."""
    import shutil

    from canvaslm.train.checkpointing import latest_checkpoint

    cfg = tiny_config(tmp_path, max_steps=2, save_every=1, keep_checkpoints=1)
    Trainer(TrainConfig.from_dict(cfg)).train()
    run = Path(cfg["out_dir"])
    shutil.copytree(run / "checkpoint-0000002", run / "checkpoint-best")
    Trainer(TrainConfig.from_dict({**cfg, "max_steps": 3}), resume=True).train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000003", "checkpoint-best"]
    (run / "latest").unlink()
    assert latest_checkpoint(run) == run / "checkpoint-0000003"
    for name in ("checkpoint-9999999", "checkpoint-10000000", "checkpoint-zzz"):
        (run / name).mkdir()
        (run / name / "trainer_state.pt").write_bytes(b"")
    assert latest_checkpoint(run) == run / "checkpoint-10000000"


def test_a_typo_in_model_init_is_an_error_naming_the_key(tmp_path):
    init = {k: v for k, v in tiny_config(tmp_path)["model"]["init"].items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match=r"model.init.hiden_size is not a model.init key .*mean hidden_size\?"):
        Trainer(TrainConfig.from_dict(tiny_config(tmp_path, model={"init": {**init, "hiden_size": 32}})))
    with pytest.raises(ConfigError, match=r"model.init.shape is not a model.init key \(expected config, seed"):
        Trainer(TrainConfig.from_dict(tiny_config(tmp_path, model={"init": {"config": {}, "shape": "tiny"}})))
    t = Trainer(TrainConfig.from_dict(tiny_config(tmp_path, model={"init": {**init, "hidden_size": 48}})))
    assert t.model.cfg.hidden_size == 48  # a text-config field is one


def test_lr_schedule():
    f = [lr_factor(s, 10, 110, 0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)


def test_example_stream_is_a_pure_function_of_position():
    s = ExampleStream(10, seed=3)
    first = s.indices(0, 25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert ExampleStream(10, seed=3).indices(7, 9) == first[7:16]
    assert ExampleStream(10, seed=4).indices(0, 10) != first[:10]


def _grads(trainer):
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    one = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "a", grad_accum=1)))
    two = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "b", grad_accum=2)))
    s1, s2 = one.compute_gradients(0), two.compute_gradients(0)
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-6)
    g1, g2 = _grads(one), _grads(two)
    assert g1.keys() == g2.keys() and not any(".router." in n for n in g1)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=2e-5, msg=n)


def test_resume_after_kill_reproduces_the_loss_curve(tmp_path):
    cfg = dict(max_steps=6, save_every=2, eval_every=3)
    full = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "full", **cfg))).train()
    killed_cfg = TrainConfig.from_dict(tiny_config(tmp_path / "killed", **cfg))
    Trainer(killed_cfg).train(stop_at=5)  # "killed" after step 5: the last checkpoint is step 4
    run = tmp_path / "killed" / "run"
    assert (run / "latest").read_text().strip() == "checkpoint-0000004"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000002", "checkpoint-0000004"]
    resumed = Trainer(killed_cfg, resume=True)
    assert resumed.step == 4
    again = resumed.train()
    assert [r["step"] for r in again] == list(range(1, 7))
    assert [r["loss"] for r in again] == [r["loss"] for r in full]  # exact on CPU
    assert [r.get("eval_loss") for r in again] == [r.get("eval_loss") for r in full]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    a, b = load_model(tmp_path / "full" / "run" / "final"), load_model(run / "final")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert full[-1]["loss"] < full[0]["loss"]


def test_resume_refuses_a_config_that_changes_the_run(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2, lora={"rank": 2, "alpha": 4})
    Trainer(TrainConfig.from_dict(cfg)).train()
    ckpt = tmp_path / "run" / "checkpoint-0000002"
    for change, shown in [({"lora": {"rank": 4, "alpha": 4}}, "lora: {'rank': 2, 'alpha': 4} -> {'rank': 4, "),
                          ({"lora": None}, "lora: {'rank': 2, 'alpha': 4} -> None"),
                          ({"batch_size": 8}, "batch_size: 4 -> 8"),
                          ({"seed": 1, "lr": 1e-3}, "changes seed, lr (seed: 0 -> 1; lr: 0.003 -> 0.001)"),
                          ({"data": {**cfg["data"], "eval_size": 4}}, "changes data ("),
                          ({"freeze_router": False}, "freeze_router: True -> False")]:
        with pytest.raises(ConfigError) as e:
            Trainer(TrainConfig.from_dict({**cfg, **change, "max_steps": 3}), resume=True)
        assert str(e.value).startswith(f"{ckpt}: --resume with a config that changes") and shown in str(e.value), \
            str(e.value)
    # what may change: a longer run, other intervals, the same lora written out in full
    same = {**cfg, "max_steps": 3, "eval_every": 1, "save_every": 5, "keep_checkpoints": 3, "clip": None,
            "lora": {"rank": 2, "alpha": 4.0, "dropout": 0.0}, "data": {**cfg["data"], "kwargs": None}}
    hist = Trainer(TrainConfig.from_dict(same), resume=True).train()
    assert [r["step"] for r in hist] == [1, 2, 3]


def test_resume_reads_data_paths_as_the_files_they_name(tmp_path, monkeypatch):
    """`data: data.jsonl` was compared as text: resumed from another working directory it trained on another
    file unnoticed, and the same file named by its absolute path was refused as a change."""
    import shutil

    cfg = tiny_config(tmp_path / "a", max_steps=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "data.jsonl").write_text((tmp_path / "a" / "data.jsonl").read_text().replace("[", "[ ", 1))
    monkeypatch.chdir(tmp_path / "a")
    relative = {**cfg, "data": {**cfg["data"], "train": "data.jsonl"}}
    Trainer(TrainConfig.from_dict(relative)).train()
    monkeypatch.chdir(tmp_path / "b")  # same text, another file
    with pytest.raises(ConfigError, match=f"changes data .*{tmp_path / 'b' / 'data.jsonl'}"):
        Trainer(TrainConfig.from_dict({**relative, "max_steps": 3}), resume=True)
    hist = Trainer(TrainConfig.from_dict({**cfg, "max_steps": 3}), resume=True).train()  # absolute: same file
    assert [r["step"] for r in hist] == [1, 2, 3]


@torch.no_grad()
def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    trainer = Trainer(TrainConfig.from_dict(tiny_config(tmp_path, max_steps=2, plot=True)))
    trainer.train()
    final = tmp_path / "run" / "final"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    ours = load_model(final)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(final).eval()
    cfg = ours.cfg
    ids = torch.randint(3, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    cache_ref = DynamicCache(config=ref.config.get_text_config(decoder=True))
    enc_ref = ref.model.encoder(input_ids=ids, past_key_values=cache_ref, position_ids=torch.arange(40)[None])
    cache = KVCache(cfg, 1, 40 + cfg.canvas_length)
    hidden = ours.encode(ids, torch.arange(40)[None], torch.tensor([0]), cache)
    torch.testing.assert_close(hidden, enc_ref.last_hidden_state, rtol=1e-4, atol=1e-4)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(1))
    want = ref(decoder_input_ids=canvas, past_key_values=cache_ref).logits
    got = ours.denoise(canvas, torch.tensor([0]), cache)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the exported weights are the trained ones
    trained = trainer.model.state_dict()
    for n, t in ours.state_dict().items():
        if not n.startswith("rotary."):
            assert torch.equal(t, trained[n]), n


def test_ar_only_baseline_trains_the_encoder(tmp_path):
    t = Trainer(TrainConfig.from_dict(tiny_config(tmp_path, max_steps=2, ar_only=True)))
    hist = t.train()
    assert all(r["diffusion_loss"] == 0.0 and r["ar_loss"] == r["loss"] for r in hist)
    sc = dict(t.model.named_parameters())["model.decoder.self_conditioning.gate_proj.weight"]
    assert sc.grad is None  # the decoder-only parts get no gradient


def test_cli_train_and_export(tmp_path):
    import yaml

    from canvaslm.cli import main

    cfg = tiny_config(tmp_path, max_steps=2)
    cfg["model"] = {"init": {**cfg["model"]["init"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--max-steps", "1"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--resume"]) == 0  # continue to step 2
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2]
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exp"), "--dtype", "bfloat16"]) == 0
    m = load_model(tmp_path / "exp")
    assert m.cfg.vocab_size == 32 and not (tmp_path / "exp" / "trainer_state.pt").exists()


def test_export_never_replaces_a_run_or_other_files(tmp_path, capsys):
    from canvaslm.cli import main

    Trainer(TrainConfig.from_dict(tiny_config(tmp_path, max_steps=2, save_every=1))).train()
    run = tmp_path / "run"
    (run / "NOTES.txt").write_text("mine")
    before = sorted(p.name for p in run.iterdir())
    ckpt = run / "checkpoint-0000002"
    cases = [(run, "is the source"), (tmp_path, "holds the source"), (ckpt, "is the source"),
             (run / "checkpoint-0000001", "holds a training run"), (tmp_path / "notes", "not a model or adapter")]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    for out, msg in cases:
        for extra in ([], ["--adapter"]):
            assert main(["export", str(run), str(out), *extra]) == 2
            assert msg in capsys.readouterr().err
    assert main(["export", str(ckpt), str(run)]) == 2 and "holds the source" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before and (run / "NOTES.txt").read_text() == "mine"
    assert (tmp_path / "notes" / "a.txt").is_file()
    assert main(["export", str(run), str(run / "final")]) == 0  # a model dir (the run's own export) is replaced
    for _ in range(2):  # a new directory, then the model directory it holds
        assert main(["export", str(run), str(tmp_path / "exp")]) == 0


def test_text_data_with_tokenizer_and_callable_source(tmp_path, tiny_checkpoint, monkeypatch):
    from canvaslm.tokenizer import Tokenizer

    (tmp_path / "my_data.py").write_text("def make(n):\n    return [([2, 5 + i], [6, 7]) for i in range(n)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    tok = Tokenizer.from_dir(tiny_checkpoint)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "ab", "response": "cd"}) + "\n")
    [(p, r)] = load_examples(str(path), tok)
    assert r == tok.encode("cd", add_special_tokens=False) and p == tok.encode("ab")
    with pytest.raises(DataError, match="need a tokenizer"):
        load_examples(str(path), None)
    ex = load_examples("my_data:make", kwargs={"n": 5})
    assert ex[4] == ([2, 9], [6, 7])
    with pytest.raises(DataError, match="outside the vocabulary"):
        load_examples("my_data:make", kwargs={"n": 5}, vocab_size=8)
    with pytest.raises(DataError, match="cannot import"):
        load_examples("no_such_module_xyz:make")
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, model=str(tiny_checkpoint), data={"train": str(path)},
                                            max_steps=1, batch_size=2, lora={"rank": 2}))
    t = Trainer(cfg)
    t.train()
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()


def test_chat_data_one_example_per_assistant_turn(tmp_path, tiny_checkpoint):
    """OpenAI fine-tuning rows ({"messages", "tools"}): each assistant turn is one example whose prompt is the
    templated conversation before it (what the server encodes for the same messages) and whose response is
    the turn as the template renders it, up to its end marker; "weight": 0 skips a turn."""
    from canvaslm.server.protocol import ChatCompletionRequest
    from canvaslm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_checkpoint)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"},
                {"role": "assistant", "content": "It is 3."},
                {"role": "user", "content": "and 2+2?"}, {"role": "assistant", "content": "4", "weight": 0}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": tools}) + "\n")
    (p1, r1), (p2, r2) = load_examples(str(path), tok)
    served = ChatCompletionRequest(model="m", messages=messages[:4]).message_dicts()
    assert p2 == tok.encode_chat(served, tools=tools)  # the server's prompt for the same conversation
    assert tok.decode(r2, skip_special_tokens=False) == "It is 3.<end_of_turn>" and r2[-1] in tok.eos_ids
    assert tok.decode(r1, skip_special_tokens=False) == 'call:add{"a": 1, "b": 2}<end_of_turn>'  # arguments as an object
    assert "Tools: " in tok.decode(p1, skip_special_tokens=False)
    for row, needle in (({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
                        ({"messages": "hi"}, "must be a list"),
                        ({"messages": messages, "tools": "add"}, "'tools' must be a list")):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=needle):
            load_examples(str(path), tok)
    with pytest.raises(DataError, match="need a tokenizer"):
        load_examples(str(path), None)
    path.write_text(json.dumps({"messages": messages}) + "\n")
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, model=str(tiny_checkpoint), data={"train": str(path)},
                                            max_steps=1, batch_size=2, lora={"rank": 2}))
    Trainer(cfg).train()  # trains on them end to end


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    """A real kill (SIGKILL of a `canvaslm train` process) and `--resume`: the same loss curve."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    cfg = tiny_config(tmp_path / "killed", max_steps=7, save_every=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = Path(cfg["out_dir"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "canvaslm.cli", "train", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300

    def saved_three():  # `latest` is the commit point: a checkpoint dir renamed into place is not yet it
        pointer = run / "latest"
        return pointer.is_file() and pointer.read_text().strip() >= "checkpoint-0000003"

    while not saved_three() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the run finished before it could be killed"
    resumed = Trainer(TrainConfig.from_yaml(path), resume=True)
    assert resumed.step >= 3
    again = resumed.train()
    full = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "full", max_steps=7, save_every=1))).train()
    assert [r["loss"] for r in again] == [r["loss"] for r in full]
    assert not list(run.glob(".checkpoint-*"))


def test_transform_augments_deterministically(tmp_path, monkeypatch):
    (tmp_path / "aug.py").write_text("def tag(p, r, rng):\n    return p, r + [rng.randint(5, 31)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = tiny_config(tmp_path)
    cfg = TrainConfig.from_dict({**base, "data": {**base["data"], "transform": "aug:tag"}})
    a, b = Trainer(cfg), Trainer(cfg)
    (ex_a, pos), (ex_b, _) = next(a._micro_batches(3)), next(b._micro_batches(3))
    plain = [a.train_examples[i] for i in a.stream.indices(3 * cfg.batch_size, cfg.batch_size)]
    assert ex_a == ex_b and pos == [0, 1, 2, 3]
    assert [r[:-1] for _, r in ex_a] == [r for _, r in plain]
    assert ex_a != next(a._micro_batches(4))[0]


def test_a_transform_that_edits_in_place_leaves_the_examples_as_loaded(tmp_path, monkeypatch):
    """The transform gets copies: one that appends to its lists (or shuffles them) changed the loaded examples, so
    step s was no longer a function of (seed, s) and a resumed run saw other examples."""
    (tmp_path / "inplace.py").write_text("def grow(p, r, rng):\n    p.append(rng.randint(5, 31))\n    return p, r\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = tiny_config(tmp_path)
    t = Trainer(TrainConfig.from_dict({**base, "data": {**base["data"], "transform": "inplace:grow"}}))
    loaded = [(list(p), list(r)) for p, r in t.train_examples]
    first, again = next(t._micro_batches(0))[0], next(t._micro_batches(0))[0]
    assert first == again and [(list(p), list(r)) for p, r in t.train_examples] == loaded


def test_transform_output_is_checked_naming_the_transform_and_row(tmp_path, monkeypatch):
    (tmp_path / "badtf.py").write_text(
        "def oov(p, r, rng):\n    return p, r + [500]\n"
        "def none(p, r, rng):\n    return None\n"
        "def floats(p, r, rng):\n    return [float(t) for t in p], r\n"
        "def empty(p, r, rng):\n    return [], r\n"
        "def long(p, r, rng):\n    return p + [5] * 40, r\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = tiny_config(tmp_path, max_length=32)
    data = Path(base["data"]["train"])
    for fn, msg in (("oov", r"token ids \[500\] outside the vocabulary \[0, 32\)"),
                    ("none", r"expected a \(prompt_ids, response_ids\) pair, got null"),
                    ("floats", r"'prompt ids' must be a list of integer token ids, got 2.0 in it"),
                    ("empty", r"empty prompt"),
                    ("long", r"its example is \d+ tokens long \(prompt \+ response in canvases of 8\), past "
                             r"max_length 32")):
        t = Trainer(TrainConfig.from_dict({**base, "data": {**base["data"], "transform": f"badtf:{fn}"}}))
        with pytest.raises(DataError, match=rf"^data.transform 'badtf:{fn}' on {data}:\d+: {msg}"):
            next(t._micro_batches(0))


def test_a_transform_that_cannot_be_imported_is_named_by_its_key_before_the_data_loads(tmp_path, monkeypatch):
    (tmp_path / "tfmod.py").write_text("limit = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = tiny_config(tmp_path)
    missing = {"train": str(tmp_path / "nope.jsonl")}  # never read: the transform is resolved first
    for spec, msg in (("nomod:fn", "cannot import (No module named 'nomod';"),
                      ("tfmod:nofn", "cannot import (module 'tfmod' has no attribute 'nofn';"),
                      ("tfmod:limit", "limit is not callable"),
                      ("tfmod", "expected 'module:function'")):
        with pytest.raises(DataError) as e:
            Trainer(TrainConfig.from_dict({**base, "data": {**missing, "transform": spec}}))
        assert str(e.value).startswith(f"train config: data.transform {spec!r}: {msg}")


def test_a_module_in_the_working_directory_imports_without_it_on_sys_path(tmp_path, monkeypatch):
    """The `canvaslm` console script runs with its bin/ dir, not the working directory, as sys.path[0] (unlike
    `python -m` and torchrun -m): `data.train: mydata:make` beside the config failed there only."""
    import sys

    from canvaslm.train.data import resolve_callable

    (tmp_path / "cwd_only_mod.py").write_text("def make():\n    return [([2, 5], [6])]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert resolve_callable("cwd_only_mod:make")() == [([2, 5], [6])]
    with pytest.raises(DataError, match=f"looked up in the working directory {tmp_path}"):
        resolve_callable("cwd_missing_mod:make")


def test_data_kwargs_need_a_module_function_source(tmp_path, monkeypatch):
    (tmp_path / "pairs.py").write_text("def make(n):\n    return [([2, 5], [6])] * n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = tiny_config(tmp_path)
    train = base["data"]["train"]
    for source in (train, "hf:owner/name"):
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict({**base, "data": {"train": source, "kwargs": {"n": 3}}}, "c.yaml")
        assert str(e.value) == (f"c.yaml: data.kwargs apply only to a 'module:function' source (data.train or "
                                f"data.eval), and {source!r} is read, not called, got {{'n': 3}}")
    t = Trainer(TrainConfig.from_dict({**base, "data": {"train": train, "eval": "pairs:make", "kwargs": {"n": 3}}}))
    assert t.eval_examples == [([2, 5], [6])] * 3
    TrainConfig.from_dict({**base, "data": {"train": train, "kwargs": {}}})  # empty kwargs: nothing dropped


def test_eval_every_without_eval_data_warns(tmp_path, caplog):
    cfg = tiny_config(tmp_path, eval_every=2, data={"train": tiny_config(tmp_path)["data"]["train"]})
    with caplog.at_level("WARNING", logger="canvaslm.train"):
        Trainer(TrainConfig.from_dict(cfg))
    assert "eval_every is 2, but there is no eval data (set data.eval, or data.eval_size" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="canvaslm.train"):
        Trainer(TrainConfig.from_dict({**cfg, "out_dir": str(tmp_path / "b"), "data": tiny_config(tmp_path)["data"]}))
    assert "eval_every" not in caplog.text


def test_bf16_autocast_step_on_cpu(tmp_path):
    """The GPU default (bf16 autocast over fp32 master weights) runs through the same code on CPU."""
    t = Trainer(TrainConfig.from_dict(tiny_config(tmp_path, max_steps=1, dtype="bf16")))
    rec = t.train_step()
    assert t.autocast_dtype == torch.bfloat16 and math.isfinite(rec["loss"])
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


@pytest.mark.parametrize("lora", [None, {"rank": 4, "alpha": 8, "include_experts": True}])
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(tmp_path, lora):
    """Recomputing each layer in the backward (the encoder's cache writes included) changes no loss or
    gradient, and what autograd keeps between forward and backward shrinks several-fold."""
    runs = {}
    for gc in (False, True):
        t = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / str(gc), lora=lora, gradient_checkpointing=gc)))
        assert t.model.gradient_checkpointing is gc
        examples, pos = next(iter(t._micro_batches(0)))
        with torch.enable_grad():
            out, kept = kept_for_backward(t.model, lambda: t._loss(examples, pos))
            out.loss.backward()
        runs[gc] = out.loss.item(), kept, {n: p.grad.clone() for n, p in t.model.named_parameters()
                                           if p.grad is not None}
        torch.rand(3)  # the next run's adapters start the same anyway: their init follows the config's seed
    (l0, kept0, g0), (l1, kept1, g1) = runs[False], runs[True]
    assert l0 == l1 and g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-7, msg=n)
    assert kept1 * 3 < kept0, (kept0, kept1)


def test_gradient_checkpointing_trains_the_same_curve(tmp_path):
    plain = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "a", max_steps=3))).train()
    gc = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "b", max_steps=3, gradient_checkpointing=True))).train()
    assert [h["loss"] for h in gc] == pytest.approx([h["loss"] for h in plain], rel=1e-6)
    with pytest.raises(ConfigError, match="gradient_checkpointing must be true or false"):
        TrainConfig.from_dict(tiny_config(tmp_path / "c", gradient_checkpointing="yes"))


def test_max_length_leaves_out_long_examples_and_positions_are_checked(tmp_path, caplog):
    from canvaslm.train.objective import canvases_of

    def length(p, r):
        return len(p) + 8 * canvases_of(r, 8, (1,))

    with caplog.at_level("WARNING", logger="canvaslm.train"):
        t = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "a", max_length=16)))
    kept = t.train_examples + t.eval_examples
    assert kept and all(length(p, r) <= 16 for p, r in kept) and len(kept) < 64
    assert f"data.train: left out {64 - len(kept)} of 64 examples longer than max_length 16" in caplog.text
    assert t.train()[-1]["loss"] > 0
    with pytest.raises(DataError, match=r"data.train: all 64 examples are longer than max_length 8 \(the shortest "
                                        r"is 12 tokens"):
        Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "b", max_length=8)))
    with pytest.raises(ConfigError, match="max_length 200000 is past the model's max_position_embeddings 131072"):
        Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "c", max_length=200_000)))
    for bad in ("16", 1, True):
        with pytest.raises(ConfigError, match=r"max_length must be an integer (>= 2|or null)"):
            TrainConfig.from_dict(tiny_config(tmp_path / "d", max_length=bad))
    cfg = tiny_config(tmp_path / "e")
    cfg["model"]["init"]["max_position_embeddings"] = 24  # without max_length, a sequence past it is named
    with pytest.raises(DataError, match=r"e/data.jsonl:1: the example is 26 tokens long .* past the model's max_pos"
                                        r"ition_embeddings 24 \(too long: 19 of the 64 examples of data.train\); set"):
        Trainer(TrainConfig.from_dict(cfg))


def test_truncate_prompt_cuts_long_prompts_from_the_start(tmp_path, caplog):
    """TRL-style truncation instead of leaving examples out: a long example keeps its response and the end
    of its prompt (its BOS too); one whose response alone is too long is still left out."""
    from canvaslm.train.objective import canvases_of

    from .helpers import reversal_examples

    def length(p, r):
        return len(p) + 8 * canvases_of(r, 8, (1,))

    cfg = tiny_config(tmp_path / "a", max_length=12)
    dropped = Trainer(TrainConfig.from_dict(cfg))
    with caplog.at_level("WARNING", logger="canvaslm.train"):
        cut = Trainer(TrainConfig.from_dict({**cfg, "out_dir": str(tmp_path / "b"), "truncate_prompt": True}))
    kept = cut.train_examples + cut.eval_examples
    assert len(kept) > len(dropped.train_examples + dropped.eval_examples) > 0
    assert all(length(p, r) <= 12 for p, r in kept)
    assert "prompts to fit max_length 12" in caplog.text
    full = {tuple(r): p for p, r in reversal_examples()}
    shortened = [(p, r) for p, r in kept if len(p) < len(full[tuple(r)])]
    assert shortened
    for p, r in shortened:  # the end of the original prompt, after the BOS it keeps
        orig = full[tuple(r)]
        assert p[0] == orig[0] == 2 and p[1:] == orig[len(orig) - len(p) + 1:] and length(p, r) == 12
    assert all(canvases_of(r, 8, (1,)) == 1 for p, r in kept)  # two-canvas responses cannot fit: left out
    assert cut.train()[-1]["loss"] > 0
    with pytest.raises(ConfigError, match="truncate_prompt needs max_length"):
        TrainConfig.from_dict(tiny_config(tmp_path / "c", truncate_prompt=True))


def test_chat_turns_with_a_thought_train_the_thought_channel(tmp_path):
    """An assistant turn's reasoning_content (or reasoning / thinking) opens its response in the thought channel,
    as a thinking reply is written (what the server's reasoning parser reads back); earlier thoughts are left
    out of the prompt; a tokenizer without the channel tokens is a clear error."""
    from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN, ThoughtSplitter
    from canvaslm.testing import make_tiny_checkpoint
    from canvaslm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(make_tiny_checkpoint(tmp_path / "m", extra_specials=(CHANNEL_OPEN, CHANNEL_CLOSE)))
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6", "thinking": "three and three"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    (p1, r1), (p2, r2) = load_examples(str(path), tok)
    split = ThoughtSplitter.for_tokenizer(tok)
    for r, thought, answer in ((r1, "two and two", "4"), (r2, "three and three", "6")):
        s = split.split(r)
        assert s.closed and split.thought_text(s.thought) == thought
        assert tok.decode(s.content, skip_special_tokens=False) == f"{answer}<end_of_turn>"
    assert "two and two" not in tok.decode(p2, skip_special_tokens=False)  # an earlier thought: left out
    plain = [{k: v for k, v in m.items() if k not in ("reasoning_content", "thinking")} for m in messages]
    path.write_text(json.dumps({"messages": plain}) + "\n")
    assert [r for _, r in load_examples(str(path), tok)] == [split.split(r1).content, split.split(r2).content]
    for row, needle in (({"messages": [messages[0], {**messages[1], "reasoning": "other"}]}, "disagree"),
                        ({"messages": [messages[0], {**messages[1], "reasoning_content": 3}]}, "must be a string"),
                        ({"messages": [messages[0], {**messages[1], "reasoning": ["x"]}]}, "must be a string")):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=needle):
            load_examples(str(path), tok)
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match="no thought channel tokens"):
        load_examples(str(path), Tokenizer.from_dir(make_tiny_checkpoint(tmp_path / "plain")))
