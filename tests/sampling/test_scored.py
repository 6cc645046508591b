"""echo / logprobs on /v1/completions (the format lm-evaluation-harness reads): every log-prob is the encoder's
causal log p(token | before), computed in blocks of positions, and equals a direct full-vocabulary computation."""

from __future__ import annotations

import pytest
import torch

from canvaslm.scoring import encode_rows, token_logprobs
from canvaslm.testing import SPECIALS


def _direct(model, ids):
    hidden = encode_rows(model, [ids])[0]
    logp = torch.log_softmax(model.logits(hidden[:-1]), dim=-1)
    return logp, logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_token_logprobs_match_a_direct_computation(tiny_llm, monkeypatch):
    import canvaslm.scoring as scoring

    ids = tiny_llm.tokenizer.encode("the quick brown fox", add_special_tokens=False)
    logp, want = _direct(tiny_llm.model, ids)
    monkeypatch.setattr(scoring, "ROWS_PER_BLOCK", 3)  # several blocks
    got, tops = token_logprobs(tiny_llm.model, ids, 1, top_k=2)
    assert got == pytest.approx(want, abs=1e-5)
    best = logp.topk(2, dim=-1)
    assert [[t for t, _ in alts] for alts in tops] == best.indices.tolist()
    assert token_logprobs(tiny_llm.model, ids, 5)[0] == pytest.approx(want[4:], abs=1e-5)
    assert token_logprobs(tiny_llm.model, ids, len(ids)) == ([], [])
    with pytest.raises(ValueError, match="start"):
        token_logprobs(tiny_llm.model, ids, 0)


def test_batched_token_logprobs_equal_one_at_a_time(tiny_llm):
    """The server scores every choice of a request in one engine call, `batch_size` rows per encoder
    pass (padding changes only the last bits)."""
    from canvaslm.scoring import batch_token_logprobs

    seqs = [tiny_llm.tokenizer.encode(t, add_special_tokens=False) for t in ("the quick brown fox", "ab", "xyz w")]
    starts = [1, 2, 3]
    got = batch_token_logprobs(tiny_llm.model, seqs, starts, top_k=2, batch_size=2)
    for (lp, tops), ids, start in zip(got, seqs, starts):
        want_lp, want_tops = token_logprobs(tiny_llm.model, ids, start, top_k=2)
        assert lp == pytest.approx(want_lp, abs=1e-5)
        assert [[t for t, _ in a] for a in tops] == [[t for t, _ in a] for a in want_tops]
    assert got[1] == ([], [])  # start == len: nothing to score
    with pytest.raises(ValueError, match="start"):
        batch_token_logprobs(tiny_llm.model, seqs, [0, 1, 1])


def test_echo_with_max_tokens_0_scores_the_prompt(client, tiny_llm):
    c, model = client
    tok = tiny_llm.tokenizer
    r = c.completions.create(model=model, prompt=["hello there", "abc"], max_tokens=0, echo=True, logprobs=2)
    for ch, text in zip(r.choices, ["hello there", "abc"]):
        ids = tok.encode(text)
        lp = ch.logprobs
        assert ch.text == text and lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(_direct(tiny_llm.model, ids)[1], abs=1e-4)
        assert all(len(top) <= 3 and max(top.values()) >= v - 1e-6  # the top 2 and the token taken
                   for top, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        assert lp.text_offset == list(range(len(text)))  # one character per token here
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(tok.encode("hello there")) + 3


def test_prompt_only_scoring_keeps_the_context_and_choice_limits(client):
    """echo with max_tokens=0 runs no generation, but its prompts must still fit the context and its choices the
    limit, as a generating request's must (a 400 naming the field, before any encoder pass)."""
    openai = pytest.importorskip("openai")
    c, model = client
    limit = c.models.list().data[0].model_extra["max_model_len"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=model, prompt=[5] * (limit + 1), max_tokens=0, echo=True, logprobs=0)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "prompt"
    assert f"The prompt has {limit + 1} tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=model, prompt=["ab"] * 33, n=2, max_tokens=0, echo=True)
    assert e.value.body["param"] == "n" and "over the limit of 64" in e.value.message


def test_logprobs_of_a_completion_and_echo(client, tiny_llm):
    c, model = client
    tok = tiny_llm.tokenizer
    plain = c.completions.create(model=model, prompt="hello", max_tokens=8, seed=3)
    r = c.completions.create(model=model, prompt="hello", max_tokens=8, seed=3, logprobs=1)
    ch = r.choices[0]
    specials = set(SPECIALS)  # a random model may write special tokens: listed, not in the text
    assert ch.text == plain.choices[0].text and "".join(t for t in ch.logprobs.tokens if t not in specials) == ch.text
    out = [tok.token_to_id(t) if t in specials else tok.encode(t, add_special_tokens=False)[0]
           for t in ch.logprobs.tokens]
    assert len(out) == r.usage.completion_tokens  # a final EOS is listed too (not in the text)
    seq = tok.encode("hello") + out
    assert ch.logprobs.token_logprobs == pytest.approx(_direct(tiny_llm.model, seq)[1][4:], abs=1e-4)
    echoed = c.completions.create(model=model, prompt="hello", max_tokens=8, seed=3, echo=True)
    assert echoed.choices[0].text == "hello" + ch.text and echoed.choices[0].logprobs is None
    lm_eval = c.completions.create(model=model, prompt=["hi a", "hi b"], max_tokens=1, echo=True, logprobs=1,
                                   temperature=0, seed=1)  # what lm-evaluation-harness sends
    assert all(ch.logprobs.token_logprobs[0] is None for ch in lm_eval.choices)
    # every prompt token and every generated one (an EOS too) is listed: the harness drops the last entry
    assert sum(len(ch.logprobs.tokens) for ch in lm_eval.choices) == \
        lm_eval.usage.prompt_tokens + lm_eval.usage.completion_tokens


def test_chat_logprobs(client, tiny_llm):
    c, model = client
    tok = tiny_llm.tokenizer
    msgs = [{"role": "user", "content": "hi"}]
    plain = c.chat.completions.create(model=model, messages=msgs, max_tokens=12, seed=4)
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=12, seed=4, logprobs=True, top_logprobs=2)
    ch = r.choices[0]
    assert ch.message.content == plain.choices[0].message.content
    entries = ch.logprobs.content
    ids = [tok.token_to_id(e.token) if e.token in SPECIALS else tok.encode(e.token, add_special_tokens=False)[0]
           for e in entries]
    prompt = tok.encode_chat(msgs)
    assert ids and r.usage.prompt_tokens == len(prompt)
    want = _direct(tiny_llm.model, prompt + ids)[1][len(prompt) - 1:]
    assert [e.logprob for e in entries] == pytest.approx(want, abs=1e-4)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    assert all(bytes(e.bytes).decode() == e.token for e in entries)
    assert c.chat.completions.create(model=model, messages=msgs, max_tokens=4).choices[0].logprobs is None
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}
    call = c.chat.completions.create(model=model, messages=msgs, tools=[tool], tool_choice="required", seed=2,
                                     logprobs=True).choices[0]
    tokens = "".join(e.token for e in call.logprobs.content if e.token not in SPECIALS)
    assert tokens == call.message.tool_calls[0].function.arguments  # the call was read from these tokens


def test_chat_logprobs_of_several_choices(client, tiny_llm):
    """n choices are scored in one engine call; each gets the log-probs of its own tokens."""
    c, model = client
    tok = tiny_llm.tokenizer
    msgs = [{"role": "user", "content": "hey"}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=10, seed=2, n=3, logprobs=True)
    prompt = tok.encode_chat(msgs)
    texts = set()
    for ch in r.choices:
        entries = ch.logprobs.content
        ids = [tok.token_to_id(e.token) if e.token in SPECIALS else tok.encode(e.token, add_special_tokens=False)[0]
               for e in entries]
        assert "".join(e.token for e in entries if e.token not in SPECIALS) == ch.message.content
        want = _direct(tiny_llm.model, prompt + ids)[1][len(prompt) - 1:]
        assert [e.logprob for e in entries] == pytest.approx(want, abs=1e-4)
        texts.add(ch.message.content)
    assert len(texts) > 1  # different choices, different entries


@pytest.mark.parametrize("tools", [None, "required"])
def test_streamed_chat_logprobs_equal_the_whole_reply(client, tools):
    """With stream, each chunk a commit produces carries the log-probs of the tokens committed since the
    last: together they are the non-streamed reply's entries, text replies and tool calls alike."""
    c, model = client
    msgs = [{"role": "user", "content": "hi"}]
    kw = dict(model=model, messages=msgs, max_tokens=40, seed=7, logprobs=True, top_logprobs=1)
    if tools:
        kw.update(tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}}}}], tool_choice="required")
    whole = c.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = [ch for ch in c.chat.completions.create(**kw, stream=True) if ch.choices]
    carrying = [ch.choices[0].logprobs.content for ch in chunks if ch.choices[0].logprobs is not None]
    streamed = [e for part in carrying for e in part]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [[t.token for t in e.top_logprobs] for e in whole]
    if not tools:
        assert sum(1 for part in carrying if part) >= 2  # 40 tokens on 16-token canvases: several commits


def test_streamed_completion_logprobs_equal_the_whole_completion(client):
    """Completions' legacy logprobs with stream: each chunk's tokens, log-probs, alternatives and text
    offsets continue the previous chunk's, and together they are the non-streamed completion's."""
    c, model = client
    kw = dict(model=model, prompt="hello", max_tokens=40, seed=5, logprobs=2)
    whole = c.completions.create(**kw).choices[0]
    chunks = [ch.choices[0] for ch in c.completions.create(**kw, stream=True) if ch.choices]
    parts = [ch.logprobs for ch in chunks if ch.logprobs is not None]
    assert sum(1 for p in parts if p.tokens) >= 2  # several commits carried entries
    for key in ("tokens", "text_offset"):
        assert [x for p in parts for x in getattr(p, key)] == getattr(whole.logprobs, key), key
    # scored over the text so far, not the whole: the same values to float rounding
    assert [x for p in parts for x in p.token_logprobs] == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    tops = [x for p in parts for x in p.top_logprobs]
    assert [list(t) for t in tops] == [list(t) for t in whole.logprobs.top_logprobs]
    assert [v for t in tops for v in t.values()] == pytest.approx(
        [v for t in whole.logprobs.top_logprobs for v in t.values()], abs=1e-5)
    assert "".join(ch.text for ch in chunks) == whole.text


def test_streamed_echo_sends_the_prompt_first(client):
    """echo with stream: each choice's first chunk is its prompt's text, and the whole stream is the
    non-streamed echoed text."""
    c, model = client
    kw = dict(model=model, prompt="hello", max_tokens=24, seed=8, echo=True, n=2)
    whole = c.completions.create(**kw).choices
    chunks = [ch.choices[0] for ch in c.completions.create(**kw, stream=True) if ch.choices]
    for i in range(2):
        mine = [ch.text for ch in chunks if ch.index == i]
        assert mine[0] == "hello" and "".join(mine) == whole[i].text


def test_best_of_returns_the_most_likely_completions(client):
    """best_of=4, n=2: the two returned are the two with the highest mean log-prob per token among the four that
    n=4 gives for the same seed (their per-token log-probs, from the logprobs path, give the same scores)."""
    c, model = client
    four = c.completions.create(model=model, prompt="hello", max_tokens=8, seed=9, n=4, logprobs=0)
    best = c.completions.create(model=model, prompt="hello", max_tokens=8, seed=9, n=2, best_of=4)
    scores = [sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs) for ch in four.choices]
    ranked = sorted(range(4), key=lambda k: -scores[k])[:2]
    assert [ch.text for ch in best.choices] == [four.choices[k].text for k in ranked]
    assert [ch.model_extra["score"] for ch in best.choices] == pytest.approx([scores[k] for k in ranked], abs=1e-4)
    assert best.usage.completion_tokens == four.usage.completion_tokens  # all four were made


def _check_prompt_logprobs(model, ids, rows, k):
    """vLLM's prompt_logprobs rows of prompt `ids`: None first, then each token (log-prob, rank) + top-k."""
    logp, want = _direct(model, ids)
    assert len(rows) == len(ids) and rows[0] is None
    for pos, (row, t) in enumerate(zip(rows[1:], ids[1:])):
        own = row[str(t)]
        assert own["logprob"] == pytest.approx(want[pos], abs=1e-4)
        assert own["rank"] == 1 + int((logp[pos] > logp[pos, t] + 1e-5).sum())
        best = logp[pos].topk(k).indices.tolist() if k else []
        assert set(row) == {str(t), *map(str, best)}
        assert all(row[str(a)]["rank"] == r for r, a in enumerate(best, 1) if a != t)


@pytest.mark.parametrize("k", [0, 2])
def test_prompt_logprobs_vllm_extension(client, tiny_llm, k):
    """vLLM's prompt_logprobs on completions (each choice, from its own prompt; generated, echo-scored and
    best_of paths) and on chat (the response, the templated prompt), with the token's rank among the vocab."""
    import openai

    c, model = client
    tok = tiny_llm.tokenizer
    texts = ["hello there", "abc"]
    r = c.completions.create(model=model, prompt=texts, max_tokens=4, n=2, seed=1, extra_body={"prompt_logprobs": k})
    assert len(r.choices) == 4
    for ch in r.choices:
        _check_prompt_logprobs(tiny_llm.model, tok.encode(texts[ch.index // 2]), ch.prompt_logprobs, k)
    scored = c.completions.create(model=model, prompt="abc", max_tokens=0, echo=True, logprobs=1,
                                  extra_body={"prompt_logprobs": k}).choices[0]
    _check_prompt_logprobs(tiny_llm.model, tok.encode("abc"), scored.prompt_logprobs, k)
    ranked = c.completions.create(model=model, prompt="abc", max_tokens=3, n=1, best_of=2, seed=2,
                                  extra_body={"prompt_logprobs": k}).choices[0]
    _check_prompt_logprobs(tiny_llm.model, tok.encode("abc"), ranked.prompt_logprobs, k)
    msgs = [{"role": "user", "content": "hi"}]
    chat = c.chat.completions.create(model=model, messages=msgs, max_tokens=4, seed=1, extra_body={"prompt_logprobs": k})
    _check_prompt_logprobs(tiny_llm.model, tok.encode_chat(msgs), chat.prompt_logprobs, k)
    assert getattr(c.completions.create(model=model, prompt="abc", max_tokens=2).choices[0], "prompt_logprobs",
                   None) is None
    for kw, param in (({"stream": True}, "prompt_logprobs"), ({"suffix": "x"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=model, prompt="abc", max_tokens=2, extra_body={"prompt_logprobs": 1}, **kw)
        assert e.value.body["param"] == param
