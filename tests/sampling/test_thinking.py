"""Thinking budgets (sampling.thinking): the committed reply's thought channel never holds more than N tokens.
The tracker is checked on hand-made logits (where the close is forced, and where it is not); the whole path
on a tiny model whose logit bias makes it open a channel at every position and never close it, so only the
budget can close it: through `LLM.generate`, the engine's runner (the same tokens) and the server (vLLM's
`thinking_token_budget`, Anthropic's `budget_tokens`)."""

from __future__ import annotations

import pytest
import torch

from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN, ThoughtSplitter
from canvaslm.sampling.thinking import ThinkingBudget, ThinkingBudgetError, ThoughtTracker, answer_seed

OPEN, CLOSE, WORD, V, C = 5, 6, 9, 12, 8


def logits_for(draft):
    """[C, V] logits whose argmax is `draft` (one id per position)."""
    out = torch.zeros(len(draft), V)
    out[torch.arange(len(draft)), torch.tensor(draft)] = 3.0
    return out


def forced(tracker: ThoughtTracker, draft, canvas_start: int = 0) -> list:
    """The argmax after the tracker has had its say on a canvas whose draft is `draft`."""
    lg = logits_for(draft)
    tracker.apply(lg, canvas_start)
    return lg.argmax(-1).tolist()


def test_a_thought_opened_in_the_canvas_is_closed_at_its_budget():
    t = ThinkingBudget(3, OPEN, CLOSE).tracker()
    assert forced(t, [WORD, OPEN] + [WORD] * 6) == [WORD, OPEN, WORD, WORD, WORD, CLOSE, WORD, WORD]
    assert forced(ThinkingBudget(0, OPEN, CLOSE).tracker(), [OPEN] + [WORD] * 7) == [OPEN, CLOSE] + [WORD] * 6
    # a close at or before the budget: nothing forced (the model ended its thought itself)
    for draft in ([OPEN, WORD, CLOSE] + [WORD] * 5, [OPEN, WORD, WORD, WORD, CLOSE] + [WORD] * 3):
        assert forced(ThinkingBudget(3, OPEN, CLOSE).tracker(), draft) == draft
    # no thought in the draft, or one whose budget ends past the canvas: nothing forced
    assert forced(ThinkingBudget(3, OPEN, CLOSE).tracker(), [WORD] * 8) == [WORD] * 8
    assert forced(ThinkingBudget(3, OPEN, CLOSE).tracker(), [WORD] * 5 + [OPEN, WORD, WORD]) == \
        [WORD] * 5 + [OPEN, WORD, WORD]
    assert forced(ThinkingBudget(7, OPEN, CLOSE).tracker(), [OPEN] + [WORD] * 7) == [OPEN] + [WORD] * 7
    # a close before the open does not end it
    assert forced(ThinkingBudget(2, OPEN, CLOSE).tracker(), [CLOSE, OPEN] + [WORD] * 6) == \
        [CLOSE, OPEN, WORD, WORD, CLOSE, WORD, WORD, WORD]


def test_the_budget_carries_across_canvases_and_from_the_prompt():
    t = ThinkingBudget(10, OPEN, CLOSE).tracker()
    first = forced(t, [OPEN] + [WORD] * 7)
    assert first == [OPEN] + [WORD] * 7  # its budget ends in the next canvas
    t.commit(first)
    assert (t.start, t.closed, t.n_out) == (1, False, 8)
    second = forced(t, [WORD] * 8, canvas_start=8)
    assert second.index(CLOSE) == 3  # output index 11: thought = indices 1..10
    t.commit(second)
    assert t.closed and forced(t, [WORD] * 8, canvas_start=16) == [WORD] * 8
    # the prompt ends inside an open channel: its two thought tokens count
    p = ThinkingBudget(4, OPEN, CLOSE).tracker(prompt_ids=[2, OPEN, WORD, WORD])
    assert p.start == -2 and forced(p, [WORD] * 8).index(CLOSE) == 2
    assert ThinkingBudget(4, OPEN, CLOSE).tracker(prompt_ids=[OPEN, WORD, CLOSE]).start is None


def test_a_close_drafted_in_the_same_canvas_as_the_known_start_is_kept():
    t = ThinkingBudget(10, OPEN, CLOSE).tracker()
    t.commit([OPEN] + [WORD] * 7)
    draft = [WORD, CLOSE] + [WORD] * 6  # closes at index 9, inside the budget (11)
    assert forced(t, draft, canvas_start=8) == draft


def test_apply_makes_the_host_wait_for_nothing():
    from canvaslm.testing import SyncRecorder

    for tracker, start in ((ThinkingBudget(3, OPEN, CLOSE).tracker(), 0),  # the open found in the draft
                           (ThinkingBudget(10, OPEN, CLOSE).tracker(prompt_ids=[OPEN]), 8)):  # a known start
        lg = logits_for([OPEN] + [WORD] * 7)
        with SyncRecorder() as rec:
            tracker.apply(lg, start)
        assert rec.found == [] and lg.argmax(-1).tolist().count(CLOSE) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_apply_matches_the_cpu_and_never_syncs():
    """On a GPU (bench/fast_path_gpu.sh tests): the same forced close as on the CPU, and torch's sync debug mode
    (which raises on any host-device synchronisation, copies included) finds none."""
    for budget, prompt, start, draft in ((3, (), 0, [OPEN] + [WORD] * 7), (10, (OPEN,), 8, [WORD] * 8)):
        cpu, gpu = logits_for(draft), logits_for(draft).cuda()
        ThinkingBudget(budget, OPEN, CLOSE).tracker(prompt).apply(cpu, start)
        tracker = ThinkingBudget(budget, OPEN, CLOSE).tracker(prompt)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tracker.apply(gpu, start)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(gpu.cpu(), cpu) and cpu.argmax(-1).tolist().count(CLOSE) == 1


def test_closed_thought():
    from canvaslm.sampling.thinking import closed_thought

    assert closed_thought(OPEN, CLOSE, [WORD, CLOSE], "stop") == [OPEN, WORD, CLOSE]  # closed by the model
    assert closed_thought(OPEN, CLOSE, [WORD, WORD], "length") == [OPEN, WORD, WORD, CLOSE]  # out of room
    assert closed_thought(OPEN, CLOSE, [WORD, 1], "stop") is None  # an EOS ended the reply inside it


def test_budget_values_are_checked():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ThinkingBudgetError, match="thinking_token_budget must be an integer >= 0"):
            ThinkingBudget(bad, OPEN, CLOSE)


# ---------------------------------------------------------------------------------------- a tiny model

PROMPT = "Think about it, then answer."


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("thinking"), extra_specials=(CHANNEL_OPEN, CHANNEL_CLOSE))


@pytest.fixture(scope="module")
def think_llm(think_dir):
    from canvaslm import LLM

    return LLM(think_dir, dtype="float32")


def always_thinking(llm, **kw):
    """SamplingParams under which the model opens a channel at every position (and so never closes one)."""
    from canvaslm.llm import SamplingParams

    open_id = llm.tokenizer.token_to_id(CHANNEL_OPEN)
    return SamplingParams(seed=3, max_new_tokens=40, max_denoising_steps=4, logit_bias={open_id: 100}, **kw)


@pytest.mark.parametrize("n", [0, 6, 14, 30])  # inside the first 16-token canvas, at its edge, two canvases on
def test_generate_closes_the_thought_at_the_budget(think_llm, n):
    split = ThoughtSplitter.for_tokenizer(think_llm.tokenizer)
    free = think_llm.generate(PROMPT, always_thinking(think_llm))[0]
    assert not split.split(free.token_ids).closed and len(free.token_ids) == 40  # thinks to max_tokens
    out = think_llm.generate(PROMPT, always_thinking(think_llm, thinking_token_budget=n))[0]
    s = split.split(out.token_ids)
    assert s.closed and len(s.thought) == n and out.token_ids[n + 1] == split.close_id
    assert len(out.token_ids) == 40


def test_the_engine_enforces_it_as_generate_does(think_llm):
    sps = [always_thinking(think_llm, thinking_token_budget=20), always_thinking(think_llm)]
    want = think_llm.generate([PROMPT] * 2, sps)
    got = think_llm.generate_continuous([PROMPT] * 2, sps, max_batch=2)  # one decoder call, one budget
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    split = ThoughtSplitter.for_tokenizer(think_llm.tokenizer)
    assert len(split.split(got[0].token_ids).thought) == 20 and not split.split(got[1].token_ids).closed


def test_no_channel_tokens_or_a_constraint_leave_the_budget_out(tiny_llm, think_llm):
    from canvaslm.llm import SamplingParams

    assert ThinkingBudget.for_tokenizer(5, tiny_llm.tokenizer) is None  # its vocabulary has no channel
    assert ThinkingBudget.for_tokenizer(None, think_llm.tokenizer) is None
    sp = dict(seed=1, max_new_tokens=16)
    assert tiny_llm.generate(PROMPT, SamplingParams(**sp, thinking_token_budget=2))[0].token_ids == \
        tiny_llm.generate(PROMPT, SamplingParams(**sp))[0].token_ids
    row = think_llm.rows([PROMPT], [SamplingParams(**sp, choice=("yes", "no"), thinking_token_budget=2)])[0]
    assert row.thinking is None
    with pytest.raises(ValueError, match="thinking_token_budget must be an integer >= 0"):
        SamplingParams(thinking_token_budget=-3)


def test_server_thinking_budgets(think_dir, think_llm, monkeypatch):
    """vLLM's `thinking_token_budget` on chat and completions (enforced: usage counts the thought), and
    Anthropic's `thinking.budget_tokens` (the request the engine gets carries it)."""
    anthropic = pytest.importorskip("anthropic")
    openai = pytest.importorskip("openai")
    from canvaslm.server.launch import BackgroundServer, build_state

    open_id = think_llm.tokenizer.token_to_id(CHANNEL_OPEN)
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        kw = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "q"}], max_tokens=30, seed=2)
        bias = {"logit_bias": {str(open_id): 100}, "max_denoising_steps": 4}
        free = c.chat.completions.create(**kw, extra_body=bias)
        assert free.usage.completion_tokens_details.reasoning_tokens == 30  # never closed
        for n in (0, 9, 20):
            r = c.chat.completions.create(**kw, extra_body={**bias, "thinking_token_budget": n})
            assert r.usage.completion_tokens_details.reasoning_tokens == n + 2  # the two markers count
            assert r.usage.completion_tokens == 30
        done = c.completions.create(model=srv.state.model_name, prompt="q", max_tokens=30, seed=2,
                                    extra_body={**bias, "thinking_token_budget": 4, "skip_special_tokens": False})
        assert done.choices[0].text == CHANNEL_OPEN * 5 + CHANNEL_CLOSE + CHANNEL_OPEN * 24
        resp = c.responses.create(model=srv.state.model_name, input="q", max_output_tokens=30,
                                  extra_body={**bias, "seed": 2, "thinking_token_budget": 7})
        assert resp.usage.output_tokens_details.reasoning_tokens == 9 and resp.usage.output_tokens == 30
        srv.state.thinking_token_budget = 9  # --reasoning-budget 9: for requests that set none
        assert c.chat.completions.create(**kw, extra_body=bias).usage.completion_tokens_details.reasoning_tokens == 11
        r = c.chat.completions.create(**kw, extra_body={**bias, "thinking_token_budget": 3})
        assert r.usage.completion_tokens_details.reasoning_tokens == 5
        srv.state.thinking_token_budget = None
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**kw, extra_body={"thinking_token_budget": -1})
        assert e.value.body["param"] == "thinking_token_budget"

        seen = []
        submit = srv.state.engine.submit
        monkeypatch.setattr(srv.state.engine, "submit", lambda request, *a: (seen.append(request), submit(request, *a)))
        a = anthropic.Anthropic(base_url=srv.base_url, api_key="x", max_retries=0)
        q = dict(model=srv.state.model_name, max_tokens=24, messages=[{"role": "user", "content": "q"}])
        a.messages.create(**q, thinking={"type": "enabled", "budget_tokens": 12})
        a.messages.create(**q, thinking={"type": "adaptive"})
        a.messages.create(**q)
        assert [None if r.thinking is None else r.thinking.tokens for r in seen] == [12, None, None]
        with pytest.raises(anthropic.BadRequestError, match="budget_tokens must be an integer"):
            a.messages.create(**q, thinking={"type": "enabled", "budget_tokens": "many"})


def test_cli_flag():
    import argparse

    from canvaslm.llm import SamplingParams
    from canvaslm.sampling.cli_args import add_sampling_args, sampling_params

    p = argparse.ArgumentParser()
    add_sampling_args(p)
    assert SamplingParams(**sampling_params(p.parse_args(["--thinking-budget", "6"]))).thinking_token_budget == 6
    assert sampling_params(p.parse_args([]))["thinking_token_budget"] is None


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["a", "ok"], "additionalProperties": False}


def test_a_thought_then_a_constrained_answer(think_dir, think_llm):
    """Thinking on + an output constraint: the reply thinks (unconstrained, under its budget), then answers under
    the constraint, as vLLM runs structured outputs on a reasoning model. Thinking off: the constrained answer
    alone, as before."""
    import json

    import jsonschema

    anthropic = pytest.importorskip("anthropic")
    openai = pytest.importorskip("openai")
    from canvaslm.server.launch import BackgroundServer, build_state

    open_id = think_llm.tokenizer.token_to_id(CHANNEL_OPEN)
    think = {"chat_template_kwargs": {"enable_thinking": True}, "logit_bias": {str(open_id): 100},
             "max_denoising_steps": 4}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        kw = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "q"}], max_tokens=80, seed=4,
                  response_format=fmt)
        for extra, thought in (({**think, "thinking_token_budget": 6}, 6 + 2),
                               (think, None)):  # no budget: the thought takes the room the answer leaves
            r = c.chat.completions.create(**kw, extra_body=extra)
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
            got = r.usage.completion_tokens_details.reasoning_tokens
            assert got == thought if thought else got > 8
            assert r.usage.completion_tokens > got and r.choices[0].finish_reason == "stop"
        from canvaslm.sampling.json_schema import JsonSchemaConstraint

        need = JsonSchemaConstraint(SCHEMA, think_llm.tokenizer).min_new_tokens(think_llm.cfg.canvas_length)
        tight = c.chat.completions.create(**{**kw, "max_tokens": need + 2}, extra_body=think)  # no room to think
        jsonschema.validate(json.loads(tight.choices[0].message.content), SCHEMA)
        assert tight.usage.completion_tokens_details is None
        ended = c.chat.completions.create(**kw, extra_body={**think, "logit_bias": {str(think_llm.eos_ids[0]): 100}})
        assert ended.choices[0].finish_reason == "stop" and ended.choices[0].message.content == ""  # EOS in thought
        plain = c.chat.completions.create(**kw, extra_body={"logit_bias": {str(open_id): 100}})
        jsonschema.validate(json.loads(plain.choices[0].message.content), SCHEMA)
        assert plain.usage.completion_tokens_details is None  # thinking off: no thought

        reasoning, content = "", ""  # streamed: the thought's events, then the answer's
        stream = c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True},
                                           extra_body={**think, "thinking_token_budget": 4})
        for ch in stream:
            if ch.usage is not None:
                assert ch.usage.completion_tokens_details.reasoning_tokens == 6
            if ch.choices:
                extra = ch.choices[0].delta.model_extra or {}
                assert not (content and extra.get("reasoning_content"))
                reasoning += extra.get("reasoning_content") or ""
                content += ch.choices[0].delta.content or ""
        jsonschema.validate(json.loads(content), SCHEMA)

        mode = dict(kw, response_format={"type": "json_object"})  # as wide as max_tokens: the thought gets room
        for budget, thought in ((5, 7), (None, 80 // 2)):
            r = c.chat.completions.create(**mode, extra_body={**think, "thinking_token_budget": budget})
            assert isinstance(json.loads(r.choices[0].message.content), dict)
            assert r.usage.completion_tokens_details.reasoning_tokens == thought

        tool = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
        call = c.chat.completions.create(model=srv.state.model_name, messages=[{"role": "user", "content": "q"}],
                                         max_tokens=80, seed=1, tools=[tool],
                                         tool_choice={"type": "function", "function": {"name": "f"}},
                                         extra_body={**think, "thinking_token_budget": 3})
        msg = call.choices[0].message
        jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), SCHEMA)
        assert call.usage.completion_tokens_details.reasoning_tokens == 5

        a = anthropic.Anthropic(base_url=srv.base_url, api_key="x", max_retries=0)
        m = a.messages.create(model=srv.state.model_name, max_tokens=80, messages=[{"role": "user", "content": "q"}],
                              thinking={"type": "enabled", "budget_tokens": 5},
                              output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
                              extra_body={"seed": 2, "logit_bias": {str(open_id): 100}})
        assert [b.type for b in m.content][-1] == "text"
        jsonschema.validate(json.loads(m.content[-1].text), SCHEMA)


def test_llm_chat_thinks_before_a_constrained_answer(think_llm):
    import dataclasses
    import json

    import jsonschema

    from canvaslm.llm import SamplingParams

    split = ThoughtSplitter.for_tokenizer(think_llm.tokenizer)
    msgs = [{"role": "user", "content": "q"}]
    sp = dataclasses.replace(always_thinking(think_llm, json_schema=SCHEMA, thinking_token_budget=5), max_new_tokens=80)
    res = think_llm.chat(msgs, sp, chat_template_kwargs={"enable_thinking": True})
    jsonschema.validate(json.loads(res.text), SCHEMA)
    assert res.token_ids[:7] == [split.open_id] * 6 + [split.close_id] and res.reasoning == ""
    for budget, thought in ((4, 4 + 2), (None, 80 // 2)):  # JSON mode is as wide as max_new_tokens: room made
        mode = dataclasses.replace(always_thinking(think_llm, json_object=True, thinking_token_budget=budget),
                                   max_new_tokens=80)
        got = think_llm.chat(msgs, mode, chat_template_kwargs={"enable_thinking": True})
        assert isinstance(json.loads(got.text), dict) and got.token_ids[thought - 1] == split.close_id
        assert split.close_id not in got.token_ids[:thought - 1]
    plain = think_llm.chat(msgs, sp)  # thinking off: the constrained answer alone
    jsonschema.validate(json.loads(plain.text), SCHEMA)
    assert split.open_id not in plain.token_ids and plain.reasoning is None
    tool = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
    call = think_llm.chat(msgs, always_thinking(think_llm, thinking_token_budget=5), tools=[tool],
                          tool_choice="required", chat_template_kwargs={"enable_thinking": True})
    jsonschema.validate(json.loads(call.tool_calls[0]["function"]["arguments"]), SCHEMA)
    assert call.token_ids[:7] == [split.open_id] * 6 + [split.close_id]
    both = think_llm.chat([msgs, msgs], [sp, SamplingParams(seed=3, max_new_tokens=20)],
                          chat_template_kwargs={"enable_thinking": True})  # a free row runs as it is
    assert both[0].token_ids[:7] == res.token_ids[:7] and both[1].token_ids[0] != split.open_id
    assert len(both[1].token_ids) <= 20


def test_a_thought_leaves_the_answer_room_in_a_full_context(think_dir, think_llm):
    """max_tokens filling the context: the thought's room is cut so that the answer, rounded up to whole canvases
    after prompt + thought, still fits (it used to end with `length` and no answer)."""
    import json

    import jsonschema

    openai = pytest.importorskip("openai")
    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.launch import BackgroundServer, build_state

    open_id = think_llm.tokenizer.token_to_id(CHANNEL_OPEN)
    state = build_state(think_dir, device="cpu", config=EngineConfig(max_batch=2, max_model_len=81))
    with BackgroundServer(state) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "q"}]
        room = 81 - len(srv.state.tokenizer.encode_chat(msgs))
        for budget in (None, room):
            r = c.chat.completions.create(
                model=srv.state.model_name, messages=msgs, max_tokens=room // 16 * 16, seed=4,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
                extra_body={"chat_template_kwargs": {"enable_thinking": True}, "logit_bias": {str(open_id): 100},
                            "max_denoising_steps": 4, "thinking_token_budget": budget})
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
            assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens_details.reasoning_tokens > 2


def test_the_answer_gets_what_the_thought_left_of_max_time(think_llm):
    from types import SimpleNamespace

    from canvaslm.config import DiffusionParams
    from canvaslm.engine.engine import GenerationRequest
    from canvaslm.server.serving import Choice, TextTracker, ThoughtFirst

    split = ThoughtSplitter.for_tokenizer(think_llm.tokenizer)
    params = DiffusionParams(max_new_tokens=40, max_time=2.0)
    state = SimpleNamespace(max_model_len=4096, canvas_length=16)
    first = GenerationRequest("t", (2, 3), params, 7, (1,))
    tracker = TextTracker(think_llm.tokenizer, [], thoughts=split)
    tracker.add([split.open_id, WORD, WORD])
    c = Choice(0, first, 0, tracker, finish_reason="length", seconds=0.9, prompt_seconds=0.4)  # 0.5 s denoising
    nxt = ThoughtFirst((2, 3), params, 7, (1,), None, split.close_id, 1).request(state, c)
    assert nxt.prompt_ids == (2, 3, split.open_id, WORD, WORD, split.close_id)  # closed: it ran out of room
    assert nxt.params.max_time == pytest.approx(1.5) and nxt.params.max_new_tokens == 40 - 4 and nxt.seed == answer_seed(7)
    c.seconds = 5.4
    assert ThoughtFirst((2, 3), params, 7, (1,), None, split.close_id, 1).request(state, c).params.max_time == 1e-3


def test_llm_chat_gives_the_answer_what_the_thought_left_of_max_time(think_llm, monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    import canvaslm.llm as llm_module

    clock = iter([100.0, 103.0])  # the thought pass takes 3 s
    monkeypatch.setattr(llm_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    real = think_llm._generate_rows
    monkeypatch.setattr(think_llm, "_generate_rows", lambda rows, *a, **k: (calls.append(rows), real(rows, *a, **k))[1])
    # with a constraint, max_time needs the reply within one canvas (as the server asks): a choice fits
    sp = dataclasses.replace(always_thinking(think_llm, choice=["yes", "no"], thinking_token_budget=3),
                             max_new_tokens=16, max_time=5.0)
    think_llm.chat([{"role": "user", "content": "q"}], sp, chat_template_kwargs={"enable_thinking": True})
    (thought,), (answer,) = calls
    assert thought.params.max_time == 5.0 and answer.params.max_time == pytest.approx(2.0)


def test_a_thought_first_reply_is_one_reply_to_drafts_and_metrics(think_dir, think_llm):
    """The two engine requests behind a thought-first reply look like one: the answer's draft canvases number on
    from the thought's, and /metrics counts one finished request, the client's prompt tokens once and one time to
    first token."""
    import json
    import re

    import httpx
    import jsonschema

    openai = pytest.importorskip("openai")
    from canvaslm.server.launch import BackgroundServer, build_state

    def counters(base_url):
        text = httpx.get(base_url + "/metrics").text

        def total(name):
            return sum(float(v) for v in re.findall(rf"^canvaslm_{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
        return (total("requests_finished_total"), total("prompt_tokens_total"),
                total("time_to_first_token_seconds_count"))

    open_id = think_llm.tokenizer.token_to_id(CHANNEL_OPEN)
    msgs = [{"role": "user", "content": "q"}]
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        before = counters(srv.base_url)
        stream = c.chat.completions.create(
            model=srv.state.model_name, messages=msgs, max_tokens=80, seed=4, stream=True,
            stream_options={"include_usage": True},
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
            extra_body={"chat_template_kwargs": {"enable_thinking": True}, "logit_bias": {str(open_id): 100},
                        "max_denoising_steps": 4, "thinking_token_budget": 20, "stream_drafts": True})
        drafts, content, usage = [], "", None
        for ch in stream:
            extra = ch.model_extra or {}
            if extra.get("draft"):
                drafts.append(extra["draft"]["canvas_index"])
            if ch.usage is not None:
                usage = ch.usage
            if ch.choices:
                content += ch.choices[0].delta.content or ""
        jsonschema.validate(json.loads(content), SCHEMA)
        after = counters(srv.base_url)
        prompt = usage.prompt_tokens
    C = think_llm.cfg.canvas_length
    thought = usage.completion_tokens_details.reasoning_tokens
    assert thought == 20 + 2
    answer = usage.completion_tokens - thought
    assert drafts == sorted(drafts)  # the answer's canvases never restart at 0
    assert set(drafts) == set(range(-(-thought // C) + -(-answer // C)))  # they number on from the thought's
    # the engine's one prompt: the client's and the reply's opening `<|channel>`
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (1, prompt + 1, 1)


def test_an_output_as_wide_as_max_tokens_keeps_its_shortest_answer(think_dir, think_llm):
    """JSON mode and regex outputs are narrowed to leave a thought its budget, but never below their shortest
    answer: a budget that would leave too little is cut (the request is not refused for its thought), and a
    request without max_tokens thinks too (the reserve comes out of the default width). A repeated request
    reports no more cached tokens than its prompt has."""
    import json
    import re

    openai = pytest.importorskip("openai")
    from canvaslm.server.launch import BackgroundServer, build_state

    open_id = think_llm.tokenizer.token_to_id(CHANNEL_OPEN)
    think = {"chat_template_kwargs": {"enable_thinking": True}, "logit_bias": {str(open_id): 100},
             "max_denoising_steps": 4}
    msgs = [{"role": "user", "content": "q"}]
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        kw = dict(model=srv.state.model_name, messages=msgs, seed=4)
        for budget in (15, 16, 17, 30):  # 16 used to leave the object 1 token: a 400
            r = c.chat.completions.create(**kw, max_tokens=20, response_format={"type": "json_object"},
                                          extra_body={**think, "thinking_token_budget": budget})
            assert isinstance(json.loads(r.choices[0].message.content), dict)
            thought = r.usage.completion_tokens_details.reasoning_tokens
            assert 2 <= thought <= 20 - 2 and r.usage.completion_tokens <= 20
        for budget in (12, 20):  # ten letters need ten tokens (one a letter here): never refused
            r = c.chat.completions.create(**kw, max_tokens=24, extra_body={**think, "thinking_token_budget": budget,
                                                                          "guided_regex": "[a-z]{10}"})
            assert re.fullmatch("[a-z]{10}", r.choices[0].message.content)
        r = c.chat.completions.create(**kw, response_format={"type": "json_object"},  # no max_tokens
                                      extra_body={**think, "thinking_token_budget": 5})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        assert r.usage.completion_tokens_details.reasoning_tokens == 5 + 2
        again = c.chat.completions.create(**kw, response_format={"type": "json_object"},
                                          extra_body={**think, "thinking_token_budget": 5})
        assert again.usage.prompt_tokens_details.cached_tokens <= again.usage.prompt_tokens
    from canvaslm.llm import SamplingParams

    offline = think_llm.chat(msgs, SamplingParams(seed=4, max_new_tokens=20, json_object=True, thinking_token_budget=16,
                                                  logit_bias={open_id: 100}, max_denoising_steps=4),
                             chat_template_kwargs={"enable_thinking": True})
    assert isinstance(json.loads(offline.text), dict) and offline.reasoning is not None


def test_pins_count_from_the_reply_start_and_answers_draw_their_own_seeds(think_dir, think_llm):
    """A pinned reply writes no thought before its pins, thinking or not (a pin's offset is the client's
    count from the reply's first token), on the server and offline; a thought-first reply's answer draws
    from a seed far from the seeds of the choices beside it."""
    openai = pytest.importorskip("openai")
    from canvaslm.llm import SamplingParams
    from canvaslm.sampling.constraints import PinnedConstraint
    from canvaslm.server.launch import BackgroundServer, build_state

    open_id = think_llm.tokenizer.token_to_id(CHANNEL_OPEN)
    x = think_llm.tokenizer.encode("xyz", add_special_tokens=False)
    msgs = [{"role": "user", "content": "q"}]
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model=srv.state.model_name, messages=msgs, max_tokens=16, seed=1,
                                      logprobs=True, extra_body={
                                          "pins": {"4": x}, "chat_template_kwargs": {"enable_thinking": True},
                                          "logit_bias": {str(open_id): -100}, "thinking_token_budget": 3})
        assert r.usage.completion_tokens_details is None  # no thought (a thought-first reply opens one itself)
    out = think_llm.chat(msgs, SamplingParams(seed=1, max_new_tokens=16, constraint=PinnedConstraint({4: x}),
                                              logit_bias={open_id: -100}, thinking_token_budget=3),
                         chat_template_kwargs={"enable_thinking": True})
    assert out.token_ids[4:7] == x and out.reasoning is None
    seeds = [answer_seed(s) for s in range(4)]
    assert not set(seeds) & set(range(8)) and answer_seed(2**63 - 1) < 2**63
