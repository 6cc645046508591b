"""Ops review (session 25): work the server runs on the engine thread (`Engine.call`: embeddings, echo /
logprobs scoring, adapter loads) answers 503 "the server is shutting down" once the engine has stopped, as
generation does (a stream in-band, then [DONE]), not a 500; LoRA adapters with a non-finite lora_alpha or
non-finite weights are refused by name; /v1/embeddings honours vLLM's truncate_prompt_tokens; and embedding /
scoring encoder passes hold at most one slot's context of positions whatever a request sends."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil

import httpx
import pytest
import torch

from canvaslm.engine.engine import SHUTTING_DOWN, Engine, EngineClosed, EngineConfig
from canvaslm.lora_serving import Adapter, AdapterError, MultiLoRA, read_adapter, write_adapter
from canvaslm.server.launch import BackgroundServer, build_state
from canvaslm.server.serving import APIError, engine_future, position_groups

MODEL = "tiny"
MAX_MODEL_LEN = 80


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint, tmp_path_factory):
    from canvaslm.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(3)
    weights = {}
    for i in range(model.cfg.num_layers):
        lin = mods[f"model.decoder.layers.{i}.self_attn.q_proj"]
        weights[f"model.decoder.layers.{i}.self_attn.q_proj"] = (torch.randn(4, lin.in_features, generator=g),
                                                                 torch.randn(lin.out_features, 4, generator=g))
    return write_adapter(tmp_path_factory.mktemp("adapter") / "ad", weights, rank=4, alpha=4.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest's: one intra-op thread for this module, restored after it
    yield


def _state(tiny_checkpoint, **kw):
    return build_state(tiny_checkpoint, "cpu", "float32",
                       EngineConfig(max_batch=4, max_model_len=kw.pop("max_model_len", MAX_MODEL_LEN),
                                    prefill_chunk=64), served_model_name=MODEL, **kw)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with BackgroundServer(_state(tiny_checkpoint, lora_updates=True)) as srv:
        yield srv


def _post(srv, path, body):
    return httpx.post(srv.base_url + path, json=body, timeout=60, headers={"Connection": "close"})


# --- 1. an engine that has stopped: 503, not 500 ------------------------------------------------------------

def test_engine_call_after_shutdown_raises_engine_closed(tiny_checkpoint):
    """Engine.call refuses with EngineClosed (still a RuntimeError) at once, and a call queued before the
    thread's end fails with it too (the thread never ran it)."""
    from canvaslm.checkpoint import load_model

    engine = Engine(load_model(tiny_checkpoint), EngineConfig(max_batch=2, max_model_len=48, prefill_chunk=16))
    queued = engine.call(lambda m: 1)  # the thread has not started: it waits in the inbox
    engine.shutdown()
    engine.start()  # stopping already: the thread ends at once, failing what is queued
    with pytest.raises(EngineClosed) as late:
        queued.result(30)
    assert late.value.reason == SHUTTING_DOWN
    with pytest.raises(EngineClosed, match="the server is shutting down") as now:
        engine.call(lambda m: 1)
    assert isinstance(now.value, RuntimeError) and now.value.reason == SHUTTING_DOWN


class _FakeEngine:
    def __init__(self):
        self.future = concurrent.futures.Future()

    def call(self, fn):
        return self.future


def test_engine_future_relays_results_and_turns_engine_closed_into_a_503():
    fake = _FakeEngine()
    out = engine_future(fake, None)
    fake.future.set_result(7)
    assert out.result(1) == 7
    fake = _FakeEngine()
    out = engine_future(fake, None)
    fake.future.set_exception(EngineClosed("the engine thread is not running"))  # a call dropped at the end
    with pytest.raises(APIError) as e:
        out.result(1)
    assert (e.value.status, e.value.type, e.value.message) == (503, "server_error", "the engine thread is not running")
    fake = _FakeEngine()
    out = engine_future(fake, None)
    fake.future.set_exception(ZeroDivisionError("x"))  # the work's own error is the caller's, as before
    with pytest.raises(ZeroDivisionError):
        out.result(1)
    fake = _FakeEngine()
    out = engine_future(fake, None)
    assert out.cancel() and fake.future.cancelled()  # an abandoned request does not run its call


def test_routes_on_the_engine_thread_answer_503_once_the_engine_stopped(tiny_checkpoint, adapter_dir):
    with BackgroundServer(_state(tiny_checkpoint, lora_updates=True)) as srv:
        srv.state.engine.shutdown()  # what SIGTERM's handler and BackgroundServer.stop do first
        for path, body in [("/v1/embeddings", {"model": MODEL, "input": "hi"}),
                           ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0, "echo": True,
                                                "logprobs": 1}),
                           ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0, "echo": True,
                                                "prompt_logprobs": 1}),
                           ("/v1/load_lora_adapter", {"lora_name": "ad", "lora_path": str(adapter_dir)})]:
            r = _post(srv, path, body)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"] == {"message": "the server is shutting down", "type": "server_error",
                                         "param": None, "code": None}, path
        r = _post(srv, "/api/embed", {"model": MODEL, "input": "hi"})  # Ollama's dialect
        assert r.status_code == 503 and "shutting down" in r.json()["error"], r.text


def test_a_logprobs_stream_ends_in_band_when_the_engine_stops_under_it(tiny_checkpoint):
    """The engine stops between a stream's commit and the scoring of its new tokens: the stream gets the
    in-band 503 and [DONE] (it was cut off, the connection reset)."""
    with BackgroundServer(_state(tiny_checkpoint)) as srv:
        engine = srv.state.engine
        call = engine.call

        def stop_first(fn):  # the shutdown lands just before the first scoring call
            engine.shutdown()
            return call(fn)

        engine.call = stop_first
        lines = []
        body = {"model": MODEL, "prompt": "a", "max_tokens": 32, "ignore_eos": True, "stream": True,
                "logprobs": 1, "seed": 1}
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line.removeprefix("data: "))
    assert lines[-1] == "[DONE]", lines[-3:]
    assert json.loads(lines[-2])["error"]["message"] == "the server is shutting down", lines[-3:]


# --- 2. LoRA adapters: a finite positive lora_alpha, an int r, finite weights --------------------------------

def _variant(src, dst, config_text=None, tensors=None):
    shutil.copytree(src, dst)
    if config_text is not None:
        (dst / "adapter_config.json").write_text(config_text(json.loads((src / "adapter_config.json").read_text())))
    if tensors is not None:
        from safetensors.torch import load_file, save_file

        t = load_file(str(dst / "adapter_model.safetensors"))
        save_file(tensors(t), str(dst / "adapter_model.safetensors"))
    return dst


def _with(**kw):
    return lambda cfg: json.dumps({**cfg, **kw})  # json.dumps writes NaN / Infinity, as Python's json reads them


NOT_FINITE = "lora_alpha must be a finite positive number, got "
BAD_ADAPTERS = {  # case: (how the good adapter is changed, what the error says)
    "nan_alpha": (dict(config_text=_with(lora_alpha=float("nan"))), NOT_FINITE + "nan"),
    "inf_alpha": (dict(config_text=_with(lora_alpha=float("inf"))), NOT_FINITE + "inf"),
    "bool_alpha": (dict(config_text=_with(lora_alpha=True)), NOT_FINITE + "True"),
    "bool_r": (dict(config_text=_with(r=True)), "r must be a positive integer, got True"),
    "nan_weights": (dict(tensors=lambda t: {k: torch.full_like(v, float("nan")) if "layers.1." in k and "lora_B" in k
                                            else v for k, v in t.items()}),
                    "base_model.model.model.decoder.layers.1.self_attn.q_proj.lora_B.weight holds non-finite values"),
    "fp16_overflow": (dict(tensors=lambda t: {k: (v * 1e5).to(torch.float16) for k, v in t.items()}),
                      "lora_A.weight holds non-finite values"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_adapters_with_non_finite_scale_or_weights_are_refused(adapter_dir, tmp_path, case):
    edit, message = BAD_ADAPTERS[case]
    d = _variant(adapter_dir, tmp_path / case, **edit)
    with pytest.raises(AdapterError, match="^" + re.escape(str(d)) + ".*" + re.escape(message)):
        read_adapter(d)


def test_non_finite_adapter_is_a_400_on_load_and_stops_serve(server, adapter_dir, tmp_path, capsys):
    from canvaslm.cli import main

    d = _variant(adapter_dir, tmp_path / "nan", config_text=_with(lora_alpha=float("nan")))
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "nan", "lora_path": str(d)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    assert "lora_alpha must be a finite positive number, got nan" in r.json()["error"]["message"]
    assert "nan" not in [m["id"] for m in httpx.get(server.base_url + "/v1/models").json()["data"]]
    # --lora-modules: read before the model loads (none here), a clear error and exit status 2
    assert main(["serve", str(tmp_path / "missing-model"), "--lora-modules", f"nan={d}"]) == 2
    assert "lora_alpha must be a finite positive number, got nan" in capsys.readouterr().err


def test_a_scale_that_overflows_the_served_dtype_is_refused(tiny_checkpoint, adapter_dir):
    """Finite in the file, but lora_B x lora_alpha / r overflows float16, the stacks' dtype."""
    from canvaslm.checkpoint import load_model

    model = load_model(tiny_checkpoint).to(torch.float16)
    ad = read_adapter(adapter_dir)
    big = Adapter("big", None, ad.rank, 1e6, ad.weights)
    served = MultiLoRA(model, 2)
    with pytest.raises(AdapterError, match=r"q_proj's lora_B x lora_alpha / r is not finite in float16"):
        served.load(big)
    assert served.load(ad) == 1  # nothing changed by the refusal


# --- 3. truncate_prompt_tokens on /v1/embeddings -----------------------------------------------------------------

def _embed(srv, **kw):
    r = _post(srv, "/v1/embeddings", {"model": MODEL, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_embeddings_truncate_prompt_tokens_keeps_the_last_tokens(server):
    cut = _embed(server, input=[[5, 6, 7, 8], [9, 10, 11]], truncate_prompt_tokens=2)
    last = _embed(server, input=[[7, 8], [10, 11]])
    assert [d["embedding"] for d in cut["data"]] == [d["embedding"] for d in last["data"]]
    assert cut["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    short = _embed(server, input=[[5, 6]], truncate_prompt_tokens=10)  # shorter inputs stay whole
    assert short["data"][0]["embedding"] == _embed(server, input=[[5, 6]])["data"][0]["embedding"]
    # an input over max_model_len fits once cut, as on /v1/completions
    long = _embed(server, input="a" * (2 * MAX_MODEL_LEN), truncate_prompt_tokens=50)
    assert long["usage"]["prompt_tokens"] == 50
    r = _post(server, "/v1/embeddings", {"model": MODEL, "input": "hi", "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and "truncate_prompt_tokens" in r.text, r.text


# --- 4. encoder passes of bounded positions ----------------------------------------------------------------------

def test_position_groups_bound_rows_times_longest():
    lengths = [80, 3, 40, 41, 1, 20, 20, 20, 20, 79]
    groups = position_groups(lengths, 80, most=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) <= 3 and (len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 80), g
    assert position_groups([], 80) == [] and position_groups([200], 80) == [[0]]


@pytest.fixture
def encode_shapes(monkeypatch):
    """The [rows, positions] of every scoring / embedding encoder pass (scoring.encode_rows)."""
    import canvaslm.scoring as scoring

    shapes, real = [], scoring.encode_rows

    def recording(model, rows, images=None):
        shapes.append((len(rows), max(len(r) for r in rows)))
        return real(model, rows, images)

    monkeypatch.setattr(scoring, "encode_rows", recording)
    return shapes


def test_embeddings_encode_in_passes_of_one_slots_positions(server, encode_shapes):
    """16 inputs near max_model_len were one pass of 16 x max_model_len positions (a temporary KV cache of 16
    slots beside the engine's); now no pass holds more than max_model_len, and each vector is the one its
    input gets alone, in input order."""
    inputs = [[5 + (i * 7 + k) % 50 for k in range(MAX_MODEL_LEN - 2 * i)] for i in range(16)]
    got = _embed(server, input=inputs)
    assert encode_shapes and all(rows * length <= MAX_MODEL_LEN for rows, length in encode_shapes), encode_shapes
    assert [d["index"] for d in got["data"]] == list(range(16))
    for ids, d in zip(inputs, got["data"]):
        alone = _embed(server, input=[ids])["data"][0]["embedding"]
        torch.testing.assert_close(torch.tensor(d["embedding"]), torch.tensor(alone), rtol=1e-5, atol=1e-5)
    small = [[5, 6, 7]] * 16  # short inputs still share one pass
    encode_shapes.clear()
    _embed(server, input=small)
    assert encode_shapes == [(16, 3)]


def test_echo_logprobs_score_in_passes_of_one_slots_positions(server, encode_shapes):
    prompts = [[5 + (i * 3 + k) % 40 for k in range(60 - i)] for i in range(6)]
    body = {"model": MODEL, "max_tokens": 0, "echo": True, "logprobs": 2}
    got = _post(server, "/v1/completions", {**body, "prompt": prompts}).json()
    assert encode_shapes and all(rows * length <= MAX_MODEL_LEN for rows, length in encode_shapes), encode_shapes
    for p, choice in zip(prompts, got["choices"]):
        alone = _post(server, "/v1/completions", {**body, "prompt": p}).json()["choices"][0]["logprobs"]
        assert choice["logprobs"]["tokens"] == alone["tokens"]
        torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"][1:]),
                                   torch.tensor(alone["token_logprobs"][1:]), rtol=1e-5, atol=1e-5)
