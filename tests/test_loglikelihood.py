"""LLM.loglikelihood / loglikelihood_rolling (lm-evaluation-harness's interface): sums of the encoder's
causal log-probs, checked against a direct full-vocabulary computation, greedy flags against an argmax
chain, and independent of batch size."""

from __future__ import annotations

import pytest
import torch

from canvaslm.generate import GenerationError
from canvaslm.llm import LLM
from canvaslm.scoring import encode_rows


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu")


def direct(llm, ctx_ids, cont_ids):
    ids = list(ctx_ids) + list(cont_ids)
    hidden = encode_rows(llm.model, [ids])[0]
    logp = torch.log_softmax(llm.model.logits(hidden).float(), dim=-1)
    P = len(ctx_ids)
    return sum(logp[P - 1 + i, t].item() for i, t in enumerate(cont_ids))


def greedy_chain(llm, ctx_ids, n):
    ids = list(ctx_ids)
    for _ in range(n):
        hidden = encode_rows(llm.model, [ids])[0]
        ids.append(int(llm.model.logits(hidden[-1:]).argmax()))
    return ids[len(ctx_ids):]


def test_loglikelihood_matches_a_direct_computation_and_flags_greedy(llm):
    ctx = llm.encode_prompt("The capital of France is")
    greedy = greedy_chain(llm, ctx, 3)
    other = greedy[:2] + [(greedy[2] + 1) % llm.cfg.vocab_size]
    text_cont = " Paris"
    got = llm.loglikelihood([("The capital of France is", greedy), (ctx, other),
                             ("The capital of France is", text_cont)], batch_size=2)
    text_ids = llm.tokenizer.encode(text_cont, add_special_tokens=False)
    for (lp, _), cont in zip(got, [greedy, other, text_ids]):
        assert lp == pytest.approx(direct(llm, ctx, cont), abs=1e-4)
    assert [g for _, g in got[:2]] == [True, False]
    alone = llm.loglikelihood([(ctx, other)], batch_size=1)
    assert alone[0][0] == pytest.approx(got[1][0], abs=1e-4) and alone[0][1] is False


def test_loglikelihood_rolling_is_the_whole_text(llm):
    text = "a quick test of rolling likelihood"
    ids = llm.encode_prompt(text)
    (lp,) = llm.loglikelihood_rolling([text])
    assert lp == pytest.approx(direct(llm, ids[:1], ids[1:]), abs=1e-4) and lp < 0


def test_bad_requests_name_the_problem(llm):
    with pytest.raises(GenerationError, match=r"requests\[0\] must be a \(context, continuation\) pair"):
        llm.loglikelihood(["just text"])
    with pytest.raises(GenerationError, match="need a token each"):
        llm.loglikelihood([("abc", "")])
    with pytest.raises(GenerationError, match="over the model's max_position_embeddings"):
        llm.loglikelihood_rolling(["x" * 5000])


def test_loglikelihood_rolling_takes_a_lone_text(llm):
    """A lone text (or token id list) is one text, as `embed` takes it (a string was read as its characters)."""
    text = "hello world"
    assert llm.loglikelihood_rolling(text) == llm.loglikelihood_rolling([text])
    ids = llm.encode_prompt(text)
    assert llm.loglikelihood_rolling(ids) == pytest.approx(llm.loglikelihood_rolling([text]), abs=1e-6)


@pytest.fixture(scope="module")
def padded_copy(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with zero embedding rows past its tokenizer's ids (a Gemma-style padded vocabulary):
    the same model, whose padded ids are never sampled."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("padded") / "model"
    shutil.copytree(tiny_checkpoint, out)
    cfg = json.loads((out / "config.json").read_text())
    vocab = cfg["text_config"]["vocab_size"]
    weights = load_file(out / "model.safetensors")
    for name, w in weights.items():
        if w.dim() and w.shape[0] == vocab:
            weights[name] = torch.cat([w, torch.zeros(27, *w.shape[1:], dtype=w.dtype)])
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    cfg["text_config"]["vocab_size"] = vocab + 27
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_padded_rows_take_no_probability(llm, padded_copy):
    """Log-probs, greedy flags and top-k are over the ids the model may output: a padded copy scores exactly as the
    model it pads (the padded rows' mass was in every log-softmax), and never names a padded id."""
    from canvaslm.scoring import batch_token_logprobs

    padded = LLM(padded_copy, device="cpu")
    assert padded.cfg.vocab_size == llm.cfg.vocab_size + 27
    pairs = [("The capital of France is", " Paris"), ("abc", "def")]
    assert padded.loglikelihood(pairs) == [(pytest.approx(lp, abs=1e-5), g) for lp, g in llm.loglikelihood(pairs)]
    assert padded.loglikelihood_rolling(["hello world"]) == pytest.approx(llm.loglikelihood_rolling(["hello world"]),
                                                                         abs=1e-5)
    ids = padded.encode_prompt("hello world")
    (_, tops, ranks), = batch_token_logprobs(padded.model, [ids], [1], top_k=llm.cfg.vocab_size + 27, ranks=True)
    assert all(t < llm.cfg.vocab_size for row in tops for t, _ in row) and max(ranks) <= llm.cfg.vocab_size
    with pytest.raises(GenerationError, match=rf"outside the vocabulary \[0, {llm.cfg.vocab_size}\)"):
        padded.loglikelihood([(ids, [llm.cfg.vocab_size + 3])])
