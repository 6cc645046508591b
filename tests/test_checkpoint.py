"""Checkpoint IO: sharded and single-file loads, round trips through transformers, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from canvaslm.checkpoint import CheckpointError, build_random_model, load_model, save_model
from canvaslm.config import ConfigError, ModelConfig
from canvaslm.kv_cache import KVCache
from canvaslm.shapes import model_config

from conftest import build_reference


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return out, build_reference(out, "window8_canvas16")


@torch.no_grad()
def _our_logits(model, ids, canvas):
    cache = KVCache(model.cfg, 1, ids.shape[1] + canvas.shape[1])
    slots = torch.tensor([0])
    model.encode(ids, torch.arange(ids.shape[1])[None], slots, cache)
    return model.denoise(canvas, slots, cache)


@torch.no_grad()
def _ref_logits(ref, ids, canvas):
    from transformers.cache_utils import DynamicCache
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    ref.model.encoder(input_ids=ids, past_key_values=cache)
    return ref(decoder_input_ids=canvas, past_key_values=cache).logits


IDS = torch.arange(3, 23)[None]
CANVAS = torch.arange(40, 56)[None]


def test_sharded_checkpoint_loads(ref_dir, tmp_path):
    path, ref = ref_dir
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = load_model(tmp_path / "sharded")
    assert (_our_logits(model, IDS, CANVAS) - _ref_logits(ref, IDS, CANVAS)).abs().max() <= 1e-4


@pytest.mark.parametrize("shard_bytes", [1 << 40, 200_000])
def test_our_checkpoint_loads_in_transformers(ref_dir, tmp_path, shard_bytes):
    from transformers import DiffusionGemmaForBlockDiffusion
    path, ref = ref_dir
    model = load_model(path)
    out = save_model(model, tmp_path / "ours", max_shard_bytes=shard_bytes)
    back = DiffusionGemmaForBlockDiffusion.from_pretrained(out).eval()
    assert (_ref_logits(back, IDS, CANVAS) - _our_logits(model, IDS, CANVAS)).abs().max() <= 1e-4
    again = load_model(out)
    assert torch.equal(_our_logits(again, IDS, CANVAS), _our_logits(model, IDS, CANVAS))


def test_bfloat16_load_and_save_dtype(ref_dir, tmp_path):
    path, _ = ref_dir
    model = load_model(path, dtype="bfloat16")
    assert model.embed_weight.dtype == torch.bfloat16
    out = save_model(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["model.decoder.norm.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_the_default_dtype_follows_the_checkpoint_and_the_cpu(ref_dir, tmp_path, monkeypatch, native):
    """dtype=None / --dtype auto: bf16 on CUDA; on a CPU, bf16 only for a bf16 checkpoint on a CPU with bf16
    matrix instructions (emulated bf16 is several times slower than float32), whatever says it is bf16."""
    import canvaslm.checkpoint as ck
    from canvaslm import LLM
    from canvaslm.checkpoint import default_dtype, stored_dtype

    monkeypatch.setattr(ck, "cpu_has_native_bf16", lambda: native)
    path, _ = ref_dir
    bf16 = save_model(load_model(path, dtype="bfloat16"), tmp_path / "bf16")
    assert stored_dtype(path) == "float32" and stored_dtype(bf16) == "bfloat16"
    cfg = json.loads((bf16 / "config.json").read_text())
    del cfg["dtype"]  # no dtype key: the weights' own (the safetensors header) decide
    (bf16 / "config.json").write_text(json.dumps(cfg))
    assert stored_dtype(bf16) == "bfloat16"
    assert default_dtype("cuda", path) == default_dtype("cuda:1", None) == "bfloat16"
    assert default_dtype("cpu", path) == default_dtype("cpu", None) == "float32"  # a float32 checkpoint stays so
    want = torch.bfloat16 if native else torch.float32
    assert default_dtype("cpu", bf16) == str(want).replace("torch.", "")
    assert LLM(bf16, device="cpu").model.embed_weight.dtype == want
    assert LLM(bf16, device="cpu", dtype="float32").model.embed_weight.dtype == torch.float32  # asked: kept
    assert stored_dtype(tmp_path / "nowhere") is None


def test_the_cpu_bf16_check_reads_the_cpu_flags(monkeypatch):
    import canvaslm.checkpoint as ck

    flags = {"plain": "flags\t\t: fpu avx2 avx512f\n", "amx": "flags\t\t: fpu avx512f amx_bf16 amx_tile\n",
             "avx512_bf16": "flags : avx512f avx512_bf16\n"}
    for kind, text in flags.items():
        monkeypatch.setattr(ck.Path, "read_text", lambda self, _t=text: _t)
        assert ck.cpu_has_native_bf16() == (kind != "plain")

    def unreadable(self):
        raise OSError("no /proc here")
    monkeypatch.setattr(ck.Path, "read_text", unreadable)
    assert ck.cpu_has_native_bf16() is False


def test_save_is_atomic_and_replaces(ref_dir, tmp_path):
    path, _ = ref_dir
    model = load_model(path)
    target = tmp_path / "ckpt"
    save_model(model, target)
    (target / "model-00001-of-00002.safetensors").write_text("old")  # a checkpoint's own file: replaced
    save_model(model, target)
    assert not (target / "model-00001-of-00002.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind


def test_save_replaces_only_an_empty_or_model_dir(ref_dir, tmp_path):
    model = load_model(ref_dir[0])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"notes: exists and is not a model or adapter directory"):
        save_model(model, notes)
    run = save_model(model, tmp_path / "run")
    (run / "trainer_state.pt").write_bytes(b"state")
    (run / "checkpoint-0000002").mkdir()
    with pytest.raises(CheckpointError, match=r"run: holds a training run \(checkpoint-0000002, trainer_state.pt\)"):
        save_model(model, run)
    assert (notes / "mine.txt").read_text() == "mine" and (run / "trainer_state.pt").is_file()
    save_model(model, run, replace_any=True)  # the trainer rewriting its own checkpoint
    assert not (run / "trainer_state.pt").exists()
    (tmp_path / "empty").mkdir()
    save_model(model, tmp_path / "empty")
    (tmp_path / "empty.old").mkdir()  # a directory named like a backup is not one: a save leaves it alone
    (tmp_path / "empty.old" / "mine.txt").write_text("mine")
    save_model(model, tmp_path / "empty")
    assert (tmp_path / "empty.old" / "mine.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "empty.old", "notes", "run"]


def test_quantize_refuses_its_source_and_a_directory_holding_it(ref_dir, tmp_path):
    from canvaslm.cli import main

    src = _copy(ref_dir[0], tmp_path / "src")
    before = sorted(p.name for p in src.iterdir())
    for dst, msg in [(src, "src: is the source"), (tmp_path, "holds the source")]:
        r = subprocess.run([sys.executable, "-m", "canvaslm.cli", "quantize", str(src), str(dst), "--to", "int4"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in src.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("mine")
    assert main(["quantize", str(src), str(other), "--to", "int4"]) == 2
    assert (other / "mine.txt").read_text() == "mine"


def test_saved_files_get_the_umask_mode_not_0600(ref_dir, tmp_path):
    path, _ = ref_dir
    probe = tmp_path / "probe.txt"
    probe.write_text("x")
    out = save_model(load_model(path), tmp_path / "ckpt", max_shard_bytes=100_000)
    assert len(list(out.glob("*.safetensors"))) > 1
    for f in out.iterdir():  # safetensors alone would write its shards 0600 (unreadable to others)
        assert f.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777, f.name
    probe_dir = tmp_path / "probe_dir"
    probe_dir.mkdir()
    assert out.stat().st_mode & 0o777 == probe_dir.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_checkpoint_dir_mode_follows_the_umask(ref_dir, tmp_path, umask):
    path, _ = ref_dir
    model = load_model(path)
    old = os.umask(umask)
    try:
        out = save_model(model, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(ref_dir, tmp_path):
    path, ref = ref_dir
    ref.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path / "s")


def test_truncated_file(ref_dir, tmp_path):
    d = _copy(ref_dir[0], tmp_path / "t")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged|cannot be read"):
        load_model(d)


def _rewrite(d, edit):
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_wrong_shape_dtype_missing_unexpected_are_all_listed(ref_dir, tmp_path):
    d = _copy(ref_dir[0], tmp_path / "bad")

    def edit(t):
        t["model.decoder.norm.weight"] = torch.ones(7)
        t["model.decoder.layers.0.mlp.up_proj.weight"] = t["model.decoder.layers.0.mlp.up_proj.weight"].to(torch.int32)
        del t["model.decoder.layers.1.self_attn.q_proj.weight"]
        t["model.decoder.extra.weight"] = torch.zeros(2)
    _rewrite(d, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert "model.decoder.norm.weight: shape (7,)" in msg
    assert "up_proj.weight: dtype torch.int32" in msg
    assert "layers.1.self_attn.q_proj.weight: missing" in msg
    assert "model.decoder.extra.weight: unexpected" in msg


def _vision_tensors(d) -> dict:
    """The vision tower's tensors stored in checkpoint dir d."""
    from safetensors import safe_open

    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys() if k.startswith("model.encoder.") and "vision" in k})
    return out


def test_vision_tower_is_skipped(ref_dir):
    # the reference checkpoint carries a (tiny) vision tower; it loads as text-only
    model = load_model(ref_dir[0])
    assert not any("vision" in n for n, _ in model.named_parameters())
    assert len(model.carried_tensors) == len(_vision_tensors(ref_dir[0])) > 0


@pytest.mark.parametrize("shard_bytes", [1 << 40, 20_000])
def test_save_keeps_the_vision_tower(ref_dir, tmp_path, shard_bytes):
    """A saved (fine-tuned, quantised, re-sharded) checkpoint holds the source's vision tower bit for bit, and
    transformers loads it with nothing missing: a text-only engine must not wipe a multimodal model's eyes."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path, ref = ref_dir
    src = _vision_tensors(path)
    out = save_model(load_model(path), tmp_path / "ours", max_shard_bytes=shard_bytes)
    got = _vision_tensors(out)
    assert sorted(got) == sorted(src) and all(torch.equal(got[k], src[k]) for k in src)
    if shard_bytes < 1 << 40:
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(set(weight_map.values())) > 2 and set(src) <= set(weight_map)
        total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        assert total == sum(f.stat().st_size for f in out.glob("*.safetensors")) - sum(
            8 + int.from_bytes(f.read_bytes()[:8], "little") for f in out.glob("*.safetensors"))
    back, info = DiffusionGemmaForBlockDiffusion.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    want = ref.model.encoder.vision_tower.state_dict()
    for k, v in back.model.encoder.vision_tower.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_save_keeps_the_vision_tower_in_the_dtype_asked(ref_dir, tmp_path):
    path, _ = ref_dir
    src = _vision_tensors(path)
    got = _vision_tensors(save_model(load_model(path), tmp_path / "bf16", dtype="bfloat16"))
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], src[k].to(torch.bfloat16)) for k in src)


def test_vision_tower_survives_saves_over_its_source_and_a_lost_source_is_named(ref_dir, tmp_path):
    path, _ = ref_dir
    src = _vision_tensors(path)
    d = _copy(path, tmp_path / "work")
    (d / "processor_config.json").write_text('{"image_seq_length": 280}')  # the image processor's, copied too
    model = load_model(d)
    save_model(model, d, max_shard_bytes=20_000)  # over the files it was loaded from
    assert all(p.parent == d and p.is_file() for p in model.carried_tensors.values())
    moved = save_model(model, tmp_path / "next")  # reads the new files, not the replaced ones
    got = _vision_tensors(moved)
    assert all(torch.equal(got[k], src[k]) for k in src)
    assert json.loads((moved / "processor_config.json").read_text()) == {"image_seq_length": 280}
    assert model.carried_files == {"processor_config.json": moved / "processor_config.json"}
    assert {p.parent for p in model.carried_tensors.values()} == {moved}
    shutil.rmtree(moved)
    with pytest.raises(CheckpointError, match=r"next/model.safetensors: holds tensors this model carries"):
        save_model(model, tmp_path / "third")
    assert not (tmp_path / "third").exists() and not list(tmp_path.glob(".third.*"))


def test_fp8_save_keeps_the_vision_tower_unquantised(ref_dir, tmp_path):
    from canvaslm.quant_io import VISION_IGNORE

    path, _ = ref_dir
    src = _vision_tensors(path)
    out = save_model(load_model(path, quantization="fp8"), tmp_path / "fp8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", *VISION_IGNORE]
    got = _vision_tensors(out)
    assert all(torch.equal(got[k], src[k]) for k in src)
    assert len(load_model(out).carried_tensors) == len(src)
    plain = save_model(build_random_model(model_config("tiny", canvas_length=8)), tmp_path / "random")
    assert not _vision_tensors(plain)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(model_type="llama"), "model_type 'llama' is not supported"),
    (lambda c: c.pop("text_config"), "text_config"),
    (lambda c: c["text_config"].pop("hidden_size"), "text_config.hidden_size is required"),
    (lambda c: c["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda c: c["text_config"].update(top_k_experts=99), "top_k_experts"),
    (lambda c: c["text_config"].update(vocab_size=-5), "vocab_size must be a positive integer"),
    (lambda c: c["text_config"].update(layer_types=["sliding_attention"]), "layer_types has 1 entries"),
])
def test_bad_config(ref_dir, tmp_path, edit, match):
    d = _copy(ref_dir[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        load_model(d)


def test_malformed_config_json(ref_dir, tmp_path):
    d = _copy(ref_dir[0], tmp_path / "j")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_model(d)


def test_generation_bad_inputs(ref_dir):
    from canvaslm import LLM, SamplingParams
    from canvaslm.generate import GenerationError
    llm = LLM(ref_dir[0])
    limit = llm.cfg.max_position_embeddings
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        llm.generate([list(range(3, 10)) * (limit // 7 + 1)], SamplingParams(max_new_tokens=4))
    for bad in (0, -3):
        with pytest.raises(GenerationError, match="max_new_tokens must be a positive integer"):
            SamplingParams(max_new_tokens=bad)
    with pytest.raises(GenerationError, match="prompt is empty"):
        llm.generate([[]], SamplingParams(max_new_tokens=4))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        llm.generate([[5, 10**6]], SamplingParams(max_new_tokens=4))
    with pytest.raises(GenerationError, match="no tokenizer.json"):
        llm.generate("text prompt")


def test_cli_errors_are_one_line(ref_dir, tmp_path):
    cases = [[str(tmp_path / "nope"), "--prompt-ids", "1,2"],
             [str(ref_dir[0]), "--prompt-ids", "1,2", "--max-new-tokens", "0"],
             [str(ref_dir[0]), "--prompt-ids", "1,x"]]
    for args in cases:
        r = subprocess.run([sys.executable, "-m", "canvaslm.cli", "generate", *args], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "error" in r.stderr


def _rss_anon_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def test_26b_shape_builds_on_meta_without_memory():
    before = _rss_anon_kb()
    model = build_random_model(model_config("26b-a4b"), materialize=False)
    n = sum(p.numel() for p in model.parameters())
    assert 25.0e9 < n < 25.5e9 and abs(n - model.cfg.num_params) < 1e-4 * n
    assert all(p.is_meta for p in model.parameters())
    assert _rss_anon_kb() - before < 200_000  # kB: nothing close to 50 GB was touched


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_load_peak_memory_is_one_copy(tmp_path):
    """Loading a ~100 MB checkpoint peaks at about one copy of the weights (plus one tensor)."""
    cfg = model_config("small", vocab_size=16_384, num_hidden_layers=3,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                       per_layer_config={"2": {"head_dim": 128, "num_key_value_heads": 1}})
    save_model(build_random_model(cfg), tmp_path / "m")
    size_kb = (tmp_path / "m" / "model.safetensors").stat().st_size // 1024
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_kb())
            time.sleep(0.002)
    base = _rss_anon_kb()
    t = threading.Thread(target=watch)
    t.start()
    model = load_model(tmp_path / "m")
    done.set()
    t.join()
    assert sum(p.numel() for p in model.parameters()) * 4 // 1024 > 0.9 * size_kb
    assert peak[0] - base < 1.25 * size_kb + 60_000, (peak[0] - base, size_kb)


def test_model_config_roundtrip_matches_transformers(ref_dir):
    from transformers import DiffusionGemmaConfig
    cfg = ModelConfig.from_dir(ref_dir[0])
    hf = DiffusionGemmaConfig(**cfg.to_hf_dict())
    again = ModelConfig.from_dict(hf.to_dict())
    assert again == cfg
    text = hf.text_config
    assert [text.per_layer_config[i].head_dim for i in range(cfg.num_layers)] == list(cfg.head_dims)
    assert [text.per_layer_config[i].num_key_value_heads for i in range(cfg.num_layers)] == list(cfg.num_kv_heads)


@pytest.mark.parametrize("weight_map,match", [
    ([1, 2], "weight_map must map tensor names to file names, got list"),
    ({"model.decoder.norm.weight": ["model.safetensors"]},
     r"weight_map\['model.decoder.norm.weight'\] must be a file name, got \['model.safetensors'\]"),
])
def test_malformed_index_is_named(ref_dir, tmp_path, weight_map, match):
    d = _copy(ref_dir[0], tmp_path / "i")
    (d / "model.safetensors").unlink()  # next to it, the index would be ignored (as transformers does)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: " + match):
        load_model(d)


@pytest.mark.parametrize("bad", [lambda w: w[:1], lambda w: w.to(torch.int32), lambda w: w > 0])
def test_a_mismatched_tensor_is_not_also_missing(ref_dir, tmp_path, bad):
    d = _copy(ref_dir[0], tmp_path / "m")
    name = "model.decoder.embed_tokens.weight"
    _rewrite(d, lambda t: t.update({name: bad(t[name])}))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    problems = str(e.value).splitlines()[1:]
    assert len(problems) == 1 and problems[0].strip().startswith(f"{name}: "), problems
    assert "missing" not in problems[0]


@pytest.mark.parametrize("how", ["quantize", "export"])
def test_quantize_and_export_keep_the_chat_templates(tmp_path, how):
    from canvaslm.cli import main
    from canvaslm.testing import make_tiny_checkpoint
    from canvaslm.tokenizer import Tokenizer
    from canvaslm.train.checkpointing import export_checkpoint

    src = make_tiny_checkpoint(tmp_path / "src")
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    template = tok_cfg.pop("chat_template")
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (src / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (src / "additional_chat_templates").mkdir()  # a named template: `tool_use` renders chats with tools
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS{{ tools | length }}")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_dir(src).chat_template == template
    out = tmp_path / "out"
    if how == "quantize":
        assert main(["quantize", str(src), str(out), "--to", "fp8"]) == 0
    else:
        export_checkpoint(src, out)
    assert Tokenizer.from_dir(out).chat_template == template
    assert Tokenizer.from_dir(out).encode_chat(msgs, tools=tools) == Tokenizer.from_dir(src).encode_chat(
        msgs, tools=tools)
