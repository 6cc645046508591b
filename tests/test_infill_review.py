"""Infill review fixes. max_time: a spent budget ends a candidate with the canvas in progress, and one cut
inside its middle came back as whole (gap 40 with a 16-token middle, finish "stop"); now such candidates are
left out, offline and on the server (the first canvas is always committed, so a middle within it always
comes back), and offline gaps whose shortest is longer than a canvas are refused naming max_time, as pins with
max_time are past one canvas. Argument types are checked (`gaps` may be one int)."""

from __future__ import annotations

import httpx
import pytest
import torch

from canvaslm.generate import GenerationError
from canvaslm.llm import LLM, SamplingParams
from canvaslm.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(make_tiny_checkpoint(tmp_path_factory.mktemp("infill_review")), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(llm):
    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.launch import BackgroundServer, build_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = build_state(llm.model_dir, "cpu", "float32", EngineConfig(max_batch=8, max_model_len=256),
                        served_model_name="tiny")
    try:
        with BackgroundServer(state) as srv:
            yield srv
    finally:
        torch.set_num_threads(threads)


def post(srv, body):
    r = httpx.post(srv.base_url + "/v1/completions", json={"model": "tiny", "seed": 0, **body}, timeout=120)
    return r.status_code, r.json()


def test_max_time_with_every_middle_longer_than_a_canvas_is_refused_offline(llm):
    C = llm.cfg.canvas_length
    with pytest.raises(GenerationError, match="max_time"):  # the reviewer's case: a 16-token cut middle came back
        llm.infill("def f():", "return the value", SamplingParams(seed=0, max_time=0.001), gaps=[40])
    with pytest.raises(GenerationError, match="max_time"):
        llm.edit("abc def ghi", 4, 7, SamplingParams(seed=0, max_time=0.001), gaps=[C + 1, 2 * C])


def test_max_time_leaves_out_middles_it_cut_offline(llm):
    C = llm.cfg.canvas_length
    gaps = [2, C, C + 1, 3 * C]  # a spent budget ends each after its first canvas: the last two are cut
    for seed in range(3):
        r = llm.infill("def f():", "x", SamplingParams(seed=seed, max_time=1e-9, max_denoising_steps=8), gaps=gaps)
        assert set(r.scores) == {2, C} and len(r.middle_ids) == r.gap and r.text == r.prefix + r.middle + r.suffix
    # a suffix longer than a canvas: the middles within the first canvas are whole, the suffix is pinned after them
    suffix = "y" * C
    r = llm.infill("def f():", suffix, SamplingParams(seed=0, max_new_tokens=3 * C, max_time=1e-9,
                                                      max_denoising_steps=8))
    assert set(r.scores) == {2, 4, 8, 16} and len(r.middle_ids) == r.gap and r.text.endswith(suffix)
    free = llm.infill("def f():", "x", SamplingParams(seed=0, max_denoising_steps=2), gaps=gaps)
    assert set(free.scores) == set(gaps)  # without a budget every candidate is whole and scored


def test_server_max_time_with_suffix(server, llm):
    for seed in range(3):  # the reviewer's case: gap 48 came back with a 16-token middle and finish "stop"
        for suffix in ("return the value of x and y", "x"):
            c, j = post(server, {"prompt": "def f():", "suffix": suffix, "max_tokens": 48, "max_time": 1e-6,
                                 "seed": seed})
            assert c == 200, j
            ch = j["choices"][0]
            gaps = {int(g) for g in ch["infill"]["scores"]}
            assert gaps == {2, 4, 8, 16} and ch["infill"]["gap"] in gaps, ch  # only whole middles
            assert ch["finish_reason"] == "stop" and j["usage"]["completion_tokens"] == ch["infill"]["gap"]
            assert len(llm.tokenizer.encode(ch["text"], add_special_tokens=False)) == ch["infill"]["gap"]
    c, j = post(server, {"prompt": "def f():", "suffix": "x", "max_tokens": 8, "max_time": 1e-6})
    assert c == 200 and set(j["choices"][0]["infill"]["scores"]) == {"2", "4", "8"}, j


def test_gaps_and_suffix_types(llm):
    sp = SamplingParams(seed=0, max_new_tokens=12, max_denoising_steps=2)
    r = llm.infill("def f():", "x", sp, gaps=5)  # one int: one gap length
    assert r.gap == 5 and set(r.scores) == {5} and len(r.middle_ids) == 5
    assert llm.edit("abc def", 4, 7, sp, gaps=3).gap == 3
    for bad in ("5", 5.0, True, object(), [2, "3"]):
        with pytest.raises(GenerationError, match="gaps"):
            llm.infill("def f():", "x", sp, gaps=bad)
    for kw in ({"suffix": None}, {"suffix": 3}, {"prefix": None}, {"prefix": b"ab"}):
        args = {"prefix": "def f():", "suffix": "x", **kw}
        with pytest.raises(GenerationError, match=next(iter(kw))):
            llm.infill(args["prefix"], args["suffix"], sp)
    with pytest.raises(GenerationError, match="text"):
        llm.edit(None, 0, 0, sp)
