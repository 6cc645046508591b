"""Served LoRA adapters (canvaslm/lora_serving.py): PEFT files round-trip, rows of different adapters in
one encoder / decoder call each equal their own merged model, base rows are bit for bit the base model,
bad adapters are refused by file and key, and the scheduler never shares KV across adapters."""

from __future__ import annotations

import json
import re

import pytest
import torch

from canvaslm.checkpoint import load_model
from canvaslm.engine.request import RequestState
from canvaslm.kv_cache import KVCache
from canvaslm.lora_serving import AdapterError, both_modes, install, read_adapter, target, write_adapter
from canvaslm.testing import make_tiny_checkpoint

MODULES = ("model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.1.self_attn.v_proj",
           "model.decoder.layers.0.mlp.down_proj", "model.decoder.self_conditioning.gate_proj")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lora_base"))


def _weights(model, modules, rank, seed):
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for m in modules:
        lin = mods[m]
        out[m] = (torch.randn(rank, lin.in_features, generator=g) * 0.3,
                  torch.randn(lin.out_features, rank, generator=g) * 0.3)
    return out


def _merged(ckpt, weights, scale):
    model = load_model(ckpt)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for m, (a, b) in weights.items():
            mods[m].weight += scale * (b @ a)
    return model


def _run(model, rows, slots, num_slots):
    """Encode one prompt per row and denoise one canvas: -> (encoder hidden [B, T, d], logits [B, C, V])."""
    cfg = model.cfg
    cache = KVCache(cfg, num_slots + 1, 64)
    g = torch.Generator().manual_seed(0)
    T, C = 7, cfg.canvas_length
    tokens = torch.randint(3, cfg.vocab_size, (rows, T), generator=g)
    canvas = torch.randint(3, cfg.vocab_size, (rows, C), generator=g)
    slots = torch.tensor(slots)
    pos = torch.arange(T).expand(rows, T)
    h = model.encode(tokens, pos, slots, cache, fresh=True)
    sc = torch.randn(rows, C, cfg.vocab_size, generator=g)
    return h, model.denoise(canvas, slots, cache, sc_logits=sc)


@pytest.fixture(scope="module")
def adapters(ckpt, tmp_path_factory):
    base = load_model(ckpt)
    d = tmp_path_factory.mktemp("adapters")
    w1 = _weights(base, MODULES, 4, 1)
    w2 = _weights(base, MODULES[1:3], 2, 2)
    write_adapter(d / "one", w1, rank=4, alpha=8.0)  # scale 2
    write_adapter(d / "two", w2, rank=2, alpha=1.0)  # scale 0.5
    return d, (w1, 2.0), (w2, 0.5)


def test_peft_files_round_trip(adapters):
    d, (w1, scale), _ = adapters
    cfg = json.loads((d / "one" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert re.fullmatch(cfg["target_modules"], MODULES[0]) and not re.fullmatch(cfg["target_modules"], "x.q_proj")
    ad = read_adapter(d / "one", "one")
    both = both_modes(w1)  # the layers' projections once per mode, the self-conditioning MLP once
    assert ad.rank == 4 and ad.scale == scale and ad.modules == sorted(both) and len(both) == 2 * len(MODULES) - 1
    assert {target(m) for m in ad.modules} == {(m, mode) for m in MODULES for mode in ("encode", "decode")
                                               if mode == "decode" or ".layers." in m}
    for m, (a, b) in both.items():
        assert torch.equal(ad.weights[m][0], a) and torch.equal(ad.weights[m][1], b)


def test_mixed_rows_equal_their_merged_models(ckpt, adapters):
    d, (w1, s1), (w2, s2) = adapters
    served = load_model(ckpt)
    lora = install(served, [read_adapter(d / "one", "one"), read_adapter(d / "two", "two")], num_slots=4)
    assert lora.ids == {"one": 1, "two": 2}
    for slot, ad in ((0, 2), (1, 0), (2, 1), (3, 2)):
        lora.assign(slot, ad)
    with lora.by_slot():  # as in the engine's steps: each row's slot decides
        h, logits = _run(served, 4, [1, 2, 0, 3], 4)  # rows: base, one, two, two
    base_h, base_logits = _run(load_model(ckpt), 4, [1, 2, 0, 3], 4)
    assert torch.equal(h[0], base_h[0]) and torch.equal(logits[0], base_logits[0])  # adds exact zeros
    for row, (w, s) in ((1, (w1, s1)), (2, (w2, s2)), (3, (w2, s2))):
        ref_h, ref_logits = _run(_merged(ckpt, w, s), 4, [1, 2, 0, 3], 4)
        assert torch.allclose(h[row], ref_h[row], atol=1e-4), row
        assert torch.allclose(logits[row], ref_logits[row], atol=1e-3), row
        assert not torch.allclose(logits[row], base_logits[row], atol=1e-2)  # the adapter does something
    # outside the engine's steps every row is the base, whatever the table says, unless `using` names them
    h0, logits0 = _run(served, 4, [1, 2, 0, 3], 4)
    assert torch.equal(logits0, base_logits) and torch.equal(h0, base_h)
    with lora.using([0, 1, 2, 2]):
        assert torch.equal(_run(served, 4, [1, 2, 0, 3], 4)[1], logits)
    with pytest.raises(AdapterError, match="not served"), lora.using(3):
        pass


def test_bad_adapters_are_named(ckpt, adapters, tmp_path):
    d, (w1, _), _ = adapters
    with pytest.raises(AdapterError, match="needs adapter_config.json"):
        read_adapter(tmp_path)
    bad = tmp_path / "bad"
    write_adapter(bad, w1, rank=4, alpha=8.0)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="adapter_config.json: use_dora"):
        read_adapter(bad)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3}))
    with pytest.raises(AdapterError, match=r"_proj has rank 4 x 4, but adapter_config.json says r=3"):
        read_adapter(bad)
    for key, value in (("alpha_pattern", {"q_proj": 32}), ("rank_pattern", {"q_proj": 2}),  # peft features that
                       ("alora_invocation_tokens", [5, 6]), ("target_parameters", ["experts.gate_up_proj"])):
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))  # would be served wrong
        with pytest.raises(AdapterError, match=f"adapter_config.json: {key} .* is not served"):
            read_adapter(bad)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    write_adapter(tmp_path / "experts", {"model.decoder.layers.0.experts.base_layer": (torch.ones(4, 16),
                                                                                         torch.ones(16, 4))},
                  rank=4, alpha=8.0, shared=False)
    with pytest.raises(AdapterError, match="experts take no served adapter"):
        read_adapter(tmp_path / "experts")
    assert json.loads((write_adapter(tmp_path / "dropped", w1, rank=4, alpha=8.0, dropout=0.1)
                       / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    wrong = {"model.decoder.layers.0.self_attn.nope": w1[MODULES[0]]}
    write_adapter(tmp_path / "wrong", wrong, rank=4, alpha=8.0)
    with pytest.raises(AdapterError, match="self_attn.nope is not a linear projection"):
        install(load_model(ckpt), [read_adapter(tmp_path / "wrong")], 2)
    shape = {MODULES[1]: w1[MODULES[0]]}  # q_proj's shape on v_proj
    write_adapter(tmp_path / "shape", shape, rank=4, alpha=8.0)
    with pytest.raises(AdapterError, match=r"v_proj is \[32 x 32\] but the model's projection is \[16 x 32\]"):
        install(load_model(ckpt), [read_adapter(tmp_path / "shape")], 2)
    write_adapter(tmp_path / "router", {"model.decoder.layers.0.router.proj": (torch.ones(4, 32), torch.ones(4, 4))},
                  rank=4, alpha=8.0)
    with pytest.raises(AdapterError, match="router.proj takes no served adapter"):
        install(load_model(ckpt), [read_adapter(tmp_path / "router")], 2)
    with pytest.raises(AdapterError, match="names must be distinct"):
        install(load_model(ckpt), [read_adapter(bad, "x"), read_adapter(d / "two", "x")], 2)


def test_scheduler_shares_kv_only_within_an_adapter():
    """Same prompt, other adapter: no reuse (its KV came from other weights), from a freed slot or from a
    running request; same adapter: reuse, as without LoRA."""
    from .test_prefix_cache import KVSim, drive, make_sched, run_one

    for first_lora, lora, want in ((0, 1, 0), (0, 0, 8), (2, 2, 8), (2, 0, 0)):
        sched = make_sched()
        sim = KVSim(sched)
        a = run_one(sched, sim, RequestState("a", tuple(range(1, 11)), 10, 4, 2, lora=first_lora))
        b = run_one(sched, sim, RequestState("b", a.prompt_ids + (99,), 4, 4, 2, lora=lora))
        assert b.cached_len == want, (first_lora, lora)
        assert sched.reusable(0, b.prompt_ids, lora=lora) == 11 and sched.reusable(0, b.prompt_ids, lora=7) == 0
    sched = make_sched(slots=2)  # two at once: the second may not copy the first's prefix
    sim = KVSim(sched)
    x = RequestState("x", tuple(range(1, 11)), 4, 4, 2, lora=1)
    y = RequestState("y", tuple(range(1, 11)), 4, 4, 2, lora=2)
    z = RequestState("z", tuple(range(1, 11)), 4, 4, 2, lora=1)
    for r in (x, y, z):
        sched.add(r)
    drive(sched, sim)
    assert y.cached_len == 0 and z.cached_len > 0


def test_llm_rows_pick_their_adapters(ckpt, adapters):
    """LLM(lora_modules=...): SamplingParams(lora=name) per prompt, mixed in one generate batch; a base row
    is what the base model gives in the same batch geometry, and generate_continuous (the engine) agrees
    with generate for a lone prompt."""
    from canvaslm.generate import GenerationError
    from canvaslm.llm import LLM, SamplingParams

    d = adapters[0]
    llm = LLM(ckpt, device="cpu", lora_modules={"one": d / "one", "two": d / "two"})
    plain = LLM(ckpt, device="cpu")
    prompt = "a prompt of sixteen+ characters"
    sp = [SamplingParams(seed=1, max_new_tokens=16), SamplingParams(seed=1, max_new_tokens=16, lora="one")]
    mixed = llm.generate([prompt, prompt], sp)
    assert mixed[0].token_ids == plain.generate([prompt, prompt], [sp[0], sp[0]])[0].token_ids
    assert mixed[1].token_ids != mixed[0].token_ids
    alone = llm.generate(prompt, sp[1])[0]
    assert llm.generate_continuous(prompt, sp[1])[0].token_ids == alone.token_ids
    # rows that end at different canvases leave the batch as they end: each keeps its own adapter (a forward
    # of the live rows raised "2 row adapters were given for a forward of 1 rows")
    eos = llm.eos_ids[0]
    short = SamplingParams(seed=1, max_new_tokens=48, lora="one", logit_bias={eos: 100})
    long = SamplingParams(seed=2, max_new_tokens=48, lora="two", min_tokens=48)
    both = llm.generate([prompt, prompt], [short, long])
    assert len(both[0].token_ids) < 16 < len(both[1].token_ids) == 48
    assert both[1].token_ids == llm.generate([prompt, prompt], [long, long])[1].token_ids
    assert llm.generate([prompt, prompt], [sp[0], long])[1].token_ids == both[1].token_ids
    with pytest.raises(GenerationError, match="lora='three' is not loaded; this LLM has \\['one', 'two'\\]"):
        llm.generate(prompt, SamplingParams(lora="three"))
    with pytest.raises(GenerationError, match="needs adapter_config.json"):
        LLM(ckpt, device="cpu", lora_modules={"x": d})


def test_unload_waits_for_the_requests_using_it_and_load_reuses_the_entry(ckpt, adapters):
    d, (w1, s1), (w2, s2) = adapters
    model = load_model(ckpt)
    lora = install(model, [], num_slots=2)
    one = lora.load(read_adapter(d / "one", "one"))
    lora.started(one)  # an admitted request uses it
    assert lora.unload("one") == one and "one" not in lora.ids
    q = lora.layers[MODULES[0]]
    assert q.decode_a[lora.entry[one]].abs().sum() > 0  # still there for that request
    with pytest.raises(AdapterError, match="not loaded"):
        lora.started(one)  # no new request may use it
    entry = lora.entry[one]
    lora.finished(one)
    assert q.decode_a[entry].abs().sum() == 0 and lora.free == [entry]
    two = lora.load(read_adapter(d / "two", "two"))
    assert lora.entry[two] == entry and two != one and lora.ids == {"two": two}  # a new id: prefix keys stay apart
    with lora.using(two):  # the reused entry holds "two" alone: as a model that only ever had it
        got = _run(model, 2, [0, 1], 2)[1]
    fresh = load_model(ckpt)
    ref = install(fresh, [read_adapter(d / "two", "two")], 2)
    with ref.using(1):  # (ranks padded to 4 here, to 2 there: BLAS may sum in another order)
        torch.testing.assert_close(got, _run(fresh, 2, [0, 1], 2)[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="already loaded"):
        lora.load(read_adapter(d / "two", "two"))
    with pytest.raises(AdapterError, match="no LoRA adapter named 'one'"):
        lora.unload("one")


def test_limits_on_held_adapters_and_rank(ckpt, adapters):
    """max_loras counts adapters unloaded but still in use; max_rank refuses bigger adapters; nothing
    changes on a refusal."""
    d = adapters[0]
    lora = install(load_model(ckpt), [read_adapter(d / "two", "two")], 2, max_loras=2, max_rank=3)
    with pytest.raises(AdapterError, match="rank 4, over max_lora_rank=3"):
        lora.load(read_adapter(d / "one", "one"))
    i = lora.load(read_adapter(d / "two", "two-b"))
    with pytest.raises(AdapterError, match=r"2 LoRA adapters are held, the limit \(max_loras=2\)"):
        lora.load(read_adapter(d / "two", "two-c"))
    lora.started(i)
    lora.unload("two-b")  # still in use: still held
    with pytest.raises(AdapterError, match="max_loras=2"):
        lora.load(read_adapter(d / "two", "two-c"))
    lora.finished(i)
    lora.load(read_adapter(d / "two", "two-c"))
    assert sorted(lora.ids) == ["two", "two-c"] and lora.capacity == 3
    with pytest.raises(AdapterError, match="max_loras=1"):
        install(load_model(ckpt), [read_adapter(d / "two", "a"), read_adapter(d / "two", "b")], 2, max_loras=1)


def test_cli_generate_with_an_adapter_and_infill_ranks_with_it(ckpt, adapters, capsys):
    """`canvaslm generate --lora DIR` is LLM(lora_modules) + SamplingParams(lora); infilling with an adapter
    generates and ranks its candidates with it."""
    from canvaslm.cli import main
    from canvaslm.llm import LLM, SamplingParams

    d = adapters[0]
    llm = LLM(ckpt, device="cpu", lora_modules={"one": d / "one"})
    prompt = "a prompt of sixteen+ characters"
    assert main(["generate", str(ckpt), "--prompt", prompt, "--lora", str(d / "one"), "--seed", "1",
                 "--max-new-tokens", "16", "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["token_ids"]
    assert got == llm.generate(prompt, SamplingParams(seed=1, max_new_tokens=16, lora="one"))[0].token_ids
    assert got != llm.generate(prompt, SamplingParams(seed=1, max_new_tokens=16))[0].token_ids
    fill = llm.infill("def f(x):\n    ", "\n    return y", SamplingParams(seed=2, max_new_tokens=24, lora="one"),
                      gaps=[4, 8])
    with llm.model.lora_serving.using(llm.loras["one"]):  # its scores are the adapter's
        from canvaslm.scoring import score_continuations

        suffix = llm.tokenizer.encode("\n    return y", add_special_tokens=False)
        want = score_continuations(llm.model, llm.encode_prompt("def f(x):\n    "),
                                   [llm.tokenizer.encode(fill.middle, add_special_tokens=False) + suffix])
    assert fill.scores[fill.gap] == pytest.approx(want[0], abs=1e-4)


def test_cli_chat_with_an_adapter(ckpt, adapters, monkeypatch, capsys):
    """`canvaslm chat --lora DIR`: each turn runs with SamplingParams(lora=...) on the chat's engine."""
    import io

    from canvaslm.cli import main
    from canvaslm.llm import LLM, SamplingParams

    d = adapters[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(ckpt), "--lora", str(d / "one"), "--seed", "2", "--max-new-tokens", "16",
                 "--device", "cpu"]) == 0
    llm = LLM(ckpt, device="cpu", lora_modules={"lora": d / "one"})
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}])

    def reply(**kw):  # an engine of the chat's shape: one slot, the model's whole context, 128-token chunks
        return llm.generate_continuous([ids], SamplingParams(max_new_tokens=16, seed=2, **kw), max_batch=1,
                                       max_model_len=llm.cfg.max_position_embeddings, prefill_chunk=128,
                                       use_tqdm=False)[0].text
    want = reply(lora="lora")
    assert capsys.readouterr().out == want + "\n"
    assert want != reply()
