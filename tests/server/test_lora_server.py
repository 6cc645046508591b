"""Serving LoRA adapters over HTTP (`--lora-modules`), with the official openai client: a LoRA run's
adapters (`canvaslm export --adapter`) score exactly what its merged export scores, a request's adapter
output does not depend on what it is batched with, /v1/models lists the adapters, and bad adapters stop
`canvaslm serve` before the model loads."""

from __future__ import annotations

import concurrent.futures
import json
import shutil

import pytest
import torch

from canvaslm.engine.engine import EngineConfig
from canvaslm.lora_serving import write_adapter
from canvaslm.server.launch import BackgroundServer, build_state
from canvaslm.testing import make_tiny_checkpoint

openai = pytest.importorskip("openai")
BASE = "tiny"
ENGINE = dict(max_batch=4, max_model_len=64, prefill_chunk=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from canvaslm.cli import main
    from canvaslm.train.trainer import TrainConfig, Trainer

    from train.helpers import tiny_config  # tests/train (pytest puts tests/ on the path)

    root = tmp_path_factory.mktemp("lora_server")
    base = make_tiny_checkpoint(root / "base")
    cfg = tiny_config(root / "train", model=str(base), max_steps=2, save_every=2, lr=5e-2,
                      lora={"rank": 4, "alpha": 8})
    Trainer(TrainConfig.from_dict(cfg)).train()
    run = root / "train" / "run"
    assert main(["export", str(run), str(root / "trained"), "--adapter"]) == 0
    g = torch.Generator().manual_seed(3)
    from canvaslm.checkpoint import load_model

    model = load_model(base)
    mods = dict(model.named_modules())
    strong = {}
    for i in range(model.cfg.num_layers):
        for m in (f"model.decoder.layers.{i}.self_attn.q_proj", f"model.decoder.layers.{i}.mlp.up_proj"):
            lin = mods[m]
            strong[m] = (torch.randn(4, lin.in_features, generator=g), torch.randn(lin.out_features, 4, generator=g))
    write_adapter(root / "strong", strong, rank=4, alpha=4.0)
    return root, base, run


@pytest.fixture(scope="module")
def servers(setup):
    root, base, run = setup
    a = build_state(base, "cpu", "float32", EngineConfig(**ENGINE), served_model_name=BASE,
                    lora_modules=[("trained", root / "trained"), ("strong", root / "strong")])
    merged = build_state(run / "final", "cpu", "float32", EngineConfig(**ENGINE), served_model_name="merged")
    with BackgroundServer(a) as sa, BackgroundServer(merged) as sm:
        yield (openai.OpenAI(base_url=sa.base_url + "/v1", api_key="x", max_retries=0),
               openai.OpenAI(base_url=sm.base_url + "/v1", api_key="x", max_retries=0))


def test_models_lists_the_adapters(servers, setup):
    root = setup[0]
    c, _ = servers
    cards = {m.id: m for m in c.models.list().data}
    assert set(cards) == {BASE, "trained", "strong"}
    assert cards["strong"].parent == BASE and cards["strong"].root == str(root / "strong")
    assert c.models.retrieve("trained").parent == BASE
    with pytest.raises(openai.NotFoundError, match="'trained', 'strong'"):
        c.completions.create(model="nope", prompt="hi", max_tokens=4)


def test_trained_adapter_scores_what_its_merged_export_scores(servers):
    """echo logprobs run on the engine thread with the request's adapter on every row."""
    c, m = servers
    prompts = ["hello there", "abc def"]
    got = c.completions.create(model="trained", prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    want = m.completions.create(model="merged", prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    base = c.completions.create(model=BASE, prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    for g, w, b in zip(got.choices, want.choices, base.choices):
        lg, lw, lb = (x.logprobs.token_logprobs[1:] for x in (g, w, b))
        assert lg == pytest.approx(lw, abs=1e-4)
        assert max(abs(x - y) for x, y in zip(lg, lb)) > 1e-3  # training moved them


def _chat(c, model, seed):
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "say something"}],
                                  max_tokens=24, seed=seed)
    return r.choices[0].message.content


def test_adapter_rows_are_independent_of_their_batch_mates(servers):
    c, _ = servers
    alone = {(model, s): _chat(c, model, s) for model in (BASE, "strong", "trained") for s in (1, 2)}
    assert alone[("strong", 1)] != alone[(BASE, 1)]  # the adapter changes the output
    jobs = [(model, s) for _ in range(2) for model in (BASE, "strong", "trained") for s in (1, 2)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _chat(c, *job), jobs))
    assert together == [alone[j] for j in jobs]
    import httpx  # every request let go of its adapter: the per-adapter gauge is back at zero

    text = httpx.get(str(c.base_url).removesuffix("/v1/") + "/metrics").text
    for name in ("strong", "trained"):
        assert f'canvaslm_lora_requests{{adapter="{name}"}} 0.0' in text, text


def test_bad_lora_modules_stop_serve_before_the_model_loads(setup, tmp_path, capsys):
    from canvaslm.cli import main

    root, base, _ = setup
    assert main(["serve", str(base), "--lora-modules", "oops"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing-model"), "--lora-modules", f"x={tmp_path}"]) == 2
    assert "needs adapter_config.json" in capsys.readouterr().err
    shutil.copytree(root / "strong", tmp_path / "s")
    (tmp_path / "s" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match="lora_alpha"):
        build_state(base, "cpu", "float32", EngineConfig(**ENGINE), lora_modules=[("s", tmp_path / "s")])
    assert main(["serve", str(tmp_path / "missing-model"), "--lora-modules", f"a={root / 'strong'}",
                 f"b={root / 'trained'}", "--max-loras", "1"]) == 2
    assert "over --max-loras=1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing-model"), "--lora-modules", f"a={root / 'strong'}",
                 "--max-lora-rank", "2"]) == 2
    assert "'a' has rank 4, over --max-lora-rank=2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="base model's served name"):
        build_state(base, "cpu", "float32", EngineConfig(**ENGINE), served_model_name="t",
                    lora_modules=[("t", root / "trained")])


def _post(url, path, body):
    import httpx

    return httpx.post(url + path, json=body, timeout=60)


def test_adapters_load_and_unload_while_serving(setup, servers):
    """--enable-lora-updates: an adapter loaded over HTTP answers what the same adapter given at start-up
    answers; unloading stops new requests naming it; errors name the field."""
    root, base, _ = setup
    c, _ = servers
    state = build_state(base, "cpu", "float32", EngineConfig(**ENGINE), served_model_name=BASE, lora_updates=True)
    state.aliases = ("base-alias",)  # --served-model-name BASE base-alias
    with BackgroundServer(state) as srv:
        d = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in d.models.list().data] == [BASE, "base-alias"]
        r = _post(srv.base_url, "/v1/load_lora_adapter", {"lora_name": "strong", "lora_path": str(root / "strong")})
        assert r.status_code == 200 and "added" in r.text
        assert [m.id for m in d.models.list().data] == [BASE, "base-alias", "strong"]
        assert _chat(d, "strong", 1) == _chat(c, "strong", 1)  # as the adapter served from the start
        assert _chat(d, BASE, 1) == _chat(c, BASE, 1)
        for body, status, needle in (
                ({"lora_name": "strong", "lora_path": str(root / "strong")}, 400, "already served"),
                ({"lora_name": BASE, "lora_path": str(root / "strong")}, 400, "already served"),
                ({"lora_name": "base-alias", "lora_path": str(root / "strong")}, 400, "already served"),
                ({"lora_name": "x", "lora_path": str(root / "nowhere")}, 400, "needs adapter_config.json"),
                ({"lora_name": "x"}, 400, "lora_path")):
            r = _post(srv.base_url, "/v1/load_lora_adapter", body)
            assert r.status_code == status and needle in r.json()["error"]["message"], r.text
        r = _post(srv.base_url, "/v1/unload_lora_adapter", {"lora_name": "strong"})
        assert r.status_code == 200 and "removed" in r.text
        with pytest.raises(openai.NotFoundError):
            _chat(d, "strong", 1)
        r = _post(srv.base_url, "/v1/unload_lora_adapter", {"lora_name": "strong"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
        # takes the freed weights entry but a new id, so the prefix cache does not hand it the KV that
        # "strong" left for this very prompt
        r = _post(srv.base_url, "/v1/load_lora_adapter", {"lora_name": "again", "lora_path": str(root / "trained")})
        assert r.status_code == 200 and _chat(d, "again", 2) == _chat(c, "trained", 2)
        submit = srv.state.engine.submit

        def unload_first(request, queue, loop):  # an unload that wins the race with an admitted request
            srv.state.engine.call(lambda m: m.lora_serving.unload("again")).result()
            srv.state.loras.pop("again")
            submit(request, queue, loop)

        srv.state.engine.submit = unload_first
        with pytest.raises(openai.NotFoundError, match="was unloaded before its generation could run"):
            _chat(d, "again", 3)
        del srv.state.engine.submit
    small = build_state(base, "cpu", "float32", EngineConfig(**ENGINE), served_model_name=BASE, lora_updates=True,
                        lora_modules=[("trained", root / "trained")], max_loras=1)
    with BackgroundServer(small) as srv:
        r = _post(srv.base_url, "/v1/load_lora_adapter", {"lora_name": "s", "lora_path": str(root / "strong")})
        assert r.status_code == 400 and "max_loras=1" in r.json()["error"]["message"]
    c_base = build_state(base, "cpu", "float32", EngineConfig(**ENGINE), served_model_name=BASE)
    with BackgroundServer(c_base) as srv:  # without the flag the routes do not exist
        assert _post(srv.base_url, "/v1/load_lora_adapter", {"lora_name": "s", "lora_path": "x"}).status_code == 404
