"""The context a server runs with: by default the model's whole context (what agent frameworks check
before they start), shortened only to what the KV cache for every slot fits in memory; a given
max_model_len that cannot fit is refused with the one that would."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from canvaslm.engine.engine import AGENT_CONTEXT, Engine, EngineConfig, plan_max_model_len, prefix_store_len
from canvaslm.kv_cache import KVCache
from canvaslm.shapes import model_config

GIB = 1 << 30
BF16 = torch.bfloat16


def cache_bytes(cfg, slots, n, with_store=False):
    cache, store = KVCache.planned_bytes(cfg, slots + 1, n, BF16,
                                         prefix_store_len(cfg, EngineConfig(max_batch=slots, max_model_len=None)))
    return cache + (store if with_store else 0)


def test_the_whole_context_where_it_fits_else_the_longest_that_does():
    cfg = model_config("26b-a4b")
    limit, C = cfg.max_position_embeddings, cfg.canvas_length
    auto = EngineConfig(max_batch=8, max_model_len=None)
    length, why = plan_max_model_len(cfg, auto, "cuda", BF16, free_total=(130 * GIB, 141 * GIB))
    assert length == limit and "whole context" in why
    # bf16 weights on an 80 GB GPU: 28 GiB left, 8 GiB of it kept for activations. With prefix caching's
    # store the context still passes the 64k agents need, so both fit
    length, why = plan_max_model_len(cfg, auto, "cuda", BF16, free_total=(28 * GIB, 80 * GIB))
    budget = 28 * GIB - 8 * GIB
    assert AGENT_CONTEXT <= length < limit and length % C == 0 and f"{length} fit with prefix caching" in why
    assert cache_bytes(cfg, 8, length, True) <= budget < cache_bytes(cfg, 8, length + C, True)
    # without prefix caching the cache alone gets the memory: a longer context
    longer, why = plan_max_model_len(cfg, EngineConfig(max_batch=8, max_model_len=None, prefix_caching=False),
                                     "cuda", BF16, free_total=(28 * GIB, 80 * GIB))
    assert length < longer < limit and f"{longer} fit (lower --max-batch" in why
    assert cache_bytes(cfg, 8, longer) <= budget < cache_bytes(cfg, 8, longer + C)
    # where the store would cut the context under 64k, the context wins (prefix caching then stays off)
    short, why = plan_max_model_len(cfg, auto, "cuda", BF16, free_total=(20 * GIB, 80 * GIB))
    assert short < AGENT_CONTEXT and "prefix caching" not in why
    assert cache_bytes(cfg, 8, short) <= 12 * GIB < cache_bytes(cfg, 8, short + C)
    fewer, _ = plan_max_model_len(cfg, EngineConfig(max_batch=2, max_model_len=None), "cuda", BF16,
                                  free_total=(28 * GIB, 80 * GIB))
    assert fewer == limit  # fewer slots: the whole context again
    with pytest.raises(ValueError, match="lower --max-batch"):  # not even the sliding rings fit
        plan_max_model_len(cfg, auto, "cuda", BF16, free_total=(3 * GIB, 24 * GIB))
    assert plan_max_model_len(cfg, auto, "meta", BF16) == (limit, "memory not checked")


def test_a_given_length_is_kept_or_refused_with_one_that_fits():
    cfg = model_config("26b-a4b")
    free_total = (28 * GIB, 80 * GIB)
    assert plan_max_model_len(cfg, EngineConfig(max_batch=8, max_model_len=4096), "cuda", BF16, free_total)[0] == 4096
    with pytest.raises(ValueError) as e:
        plan_max_model_len(cfg, EngineConfig(max_batch=8, max_model_len=cfg.max_position_embeddings), "cuda", BF16,
                           free_total)
    fits = int(re.search(r"at most (\d+) fits", str(e.value)).group(1))
    assert "--max-model-len or --max-batch" in str(e.value)
    assert cache_bytes(cfg, 8, fits) <= 20 * GIB < cache_bytes(cfg, 8, fits + cfg.canvas_length)
    with pytest.raises(ValueError, match="over the model's max_position_embeddings"):
        plan_max_model_len(cfg, EngineConfig(max_model_len=cfg.max_position_embeddings + 1), "cuda", BF16, free_total)


def test_engine_and_server_default_to_the_model_context(tiny_checkpoint, capsys):
    from canvaslm.checkpoint import load_model
    from canvaslm.cli import main
    from canvaslm.server.launch import BackgroundServer, build_state

    model = load_model(tiny_checkpoint, device="cpu")
    limit = model.cfg.max_position_embeddings
    engine = Engine(model, EngineConfig(max_batch=2, max_model_len=None))
    assert engine.config.max_model_len == limit and engine.runner.max_model_len == limit
    assert any(n.startswith(f"max_model_len {limit}: the model's whole context") for n in engine.notes)
    with BackgroundServer(build_state(tiny_checkpoint, "cpu", served_model_name="tiny")) as srv:
        card = httpx.get(srv.base_url + "/v1/models").json()["data"][0]
        assert card["max_model_len"] == card["context_length"] == limit
    assert main(["serve", str(tiny_checkpoint), "--max-model-len", str(limit + 1)]) == 2  # before loading
    assert f"--max-model-len {limit + 1} must be in [" in (err := capsys.readouterr().err) and f", {limit}]" in err
    assert main(["serve", str(tiny_checkpoint), "--prefix-store-len", "0"]) == 2
    assert "prefix_store_len=0" in capsys.readouterr().err
