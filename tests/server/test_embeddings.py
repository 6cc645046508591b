"""/v1/embeddings and LLM.embed: the encoder's hidden states pooled (mean or last token) and normalised,
equal to a direct computation, independent of the batch, through the official openai client (float
and base64), with errors that name the field."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from canvaslm.engine.engine import EngineConfig
from canvaslm.kv_cache import KVCache
from canvaslm.llm import LLM
from canvaslm.server.launch import BackgroundServer, build_state

openai = pytest.importorskip("openai")
TEXTS = ["the cat sat on the mat", "a completely different sentence, longer than the first one", "x"]


def _direct(model, ids, pooling):
    """Hidden states of one sequence alone, by the model's own encode, pooled by hand."""
    cache = KVCache(model.cfg, 1, len(ids))
    with torch.no_grad():
        h = model.encode(torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([0]), cache)[0].float()
    v = h.mean(0) if pooling == "mean" else h[-1]
    return v / v.norm()


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_llm_embed_pools_the_encoder_hidden_states(llm, pooling):
    emb = llm.embed(TEXTS, pooling=pooling)
    assert emb.shape == (3, llm.cfg.hidden_size) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(emb[i], _direct(llm.model, llm.encode_prompt(text), pooling), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(llm.embed(TEXTS[1], pooling=pooling)[0], emb[1], rtol=1e-5, atol=1e-5)
    raw = llm.embed(TEXTS[:1], pooling=pooling, normalize=False)
    assert not torch.allclose(raw.norm(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="pooling must be one of"):
        llm.embed(TEXTS, pooling="cls")


def test_openai_client_embeddings(llm, tiny_checkpoint):
    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=64),
                        served_model_name="tiny")
    with BackgroundServer(state) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        r = c.embeddings.create(model="tiny", input=TEXTS)
        want = llm.embed(TEXTS)
        assert [d.index for d in r.data] == [0, 1, 2] and r.model == "tiny"
        got = torch.tensor([d.embedding for d in r.data])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert r.usage.prompt_tokens == sum(len(llm.encode_prompt(t)) for t in TEXTS) == r.usage.total_tokens
        # the client asks for base64 by default when numpy is there; both decode to the same floats
        b = c.embeddings.create(model="tiny", input=TEXTS[0], encoding_format="base64")
        vec = b.data[0].embedding
        vec = np.frombuffer(base64.b64decode(vec), dtype="<f4") if isinstance(vec, str) else np.array(vec)
        np.testing.assert_allclose(vec, want[0].numpy(), rtol=1e-5, atol=1e-6)
        ids = llm.encode_prompt(TEXTS[2])
        torch.testing.assert_close(torch.tensor(c.embeddings.create(model="tiny", input=[ids]).data[0].embedding),
                                   want[2], rtol=1e-5, atol=1e-5)
        for kw, param, words in ((dict(input=[]), "input", "empty"), (dict(input="x" * 100), "input", "max_model_len"),
                                 (dict(input=TEXTS, dimensions=8), "dimensions", "dimensions"),
                                 (dict(input=[[10**6]]), "input", "outside the vocabulary")):
            with pytest.raises(openai.BadRequestError) as e:
                c.embeddings.create(model="tiny", **kw)
            assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
        with pytest.raises(openai.NotFoundError):
            c.embeddings.create(model="other", input="hi")
