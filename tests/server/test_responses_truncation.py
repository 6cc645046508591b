"""/v1/responses `truncation: "auto"`: a conversation longer than the context loses as few of its oldest
turns as leave room for the reply (the instructions, a system prompt sent as input, the newest user turn and the
newest turn stay; a cut starts at a user turn, so roles still alternate and a tool result keeps its call; an
agent loop loses its oldest call / result pairs), checked against chat completions of every cut;
room for the reply is what the request needs (max_output_tokens, min_tokens, a format's least output);
without it the same request is a 400 naming the context length."""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state

MODEL, CONTEXT, CANVAS = "tiny", 160, 16


@pytest.fixture(scope="module")
def client(tiny_checkpoint, one_thread):
    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=CONTEXT),
                        served_model_name=MODEL)
    assert state.canvas_length == CANVAS
    with BackgroundServer(state) as srv:
        yield OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def turns(n: int) -> list[dict]:
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k} says hello there"}
            for k in range(n)]


def chat_prompt_len(client, messages, max_tokens, **kw) -> int | None:
    """The chat route's prompt length for `messages`, or None when they leave no room for the reply."""
    try:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                           **{"extra_body": {"seed": 1, "max_denoising_steps": 1}, **kw})
    except BadRequestError as e:
        assert e.code == "context_length_exceeded"
        return None
    return r.usage.prompt_tokens


def at_user(m) -> bool:
    return m["role"] == "user"


def fewest_cut(client, system, messages, max_tokens, can_start=at_user, **kw) -> tuple[int, int]:
    """(turns cut, prompt length) of the chat conversation without the fewest oldest turns that fits."""
    for k in range(len(messages)):
        if k and not can_start(messages[k]):
            continue
        n = chat_prompt_len(client, system + messages[k:], max_tokens, **kw)
        if n is not None:
            return k, n
    raise AssertionError("no cut fits")


def test_auto_drops_the_fewest_oldest_turns(client):
    messages, system = turns(15), [{"role": "system", "content": "be brief"}]
    with pytest.raises(BadRequestError) as e:  # disabled (the default): a 400, as OpenAI's
        client.responses.create(model=MODEL, input=messages, instructions="be brief", max_output_tokens=CANVAS)
    assert e.value.code == "context_length_exceeded"
    r = client.responses.create(model=MODEL, input=messages, instructions="be brief", max_output_tokens=CANVAS,
                                truncation="auto", extra_body={"seed": 1, "max_denoising_steps": 1})
    cut, prompt_len = fewest_cut(client, system, messages, CANVAS)
    assert cut > 0 and r.truncation == "auto"
    assert r.usage.input_tokens == prompt_len <= CONTEXT - CANVAS
    # a fitting request is left whole
    short = client.responses.create(model=MODEL, input=messages[-3:], truncation="auto", max_output_tokens=CANVAS,
                                    extra_body={"seed": 1, "max_denoising_steps": 1})
    assert short.usage.input_tokens == chat_prompt_len(client, messages[-3:], CANVAS)


def test_room_for_max_output_tokens_in_whole_canvases(client):
    messages = turns(15)
    for max_out in (1, CANVAS + 1, 3 * CANVAS):
        r = client.responses.create(model=MODEL, input=messages, max_output_tokens=max_out, truncation="auto",
                                    extra_body={"seed": 1, "max_denoising_steps": 1})
        assert r.usage.input_tokens == fewest_cut(client, [], messages, max_out)[1]


def test_a_cut_keeps_each_tool_result_with_its_call(client):
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    out = {"type": "function_call_output", "call_id": "call_1", "output": "x" * 25}
    items = [*turns(4), call, out, *turns(3)]
    chat_messages = [*turns(4), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "x" * 25}, *turns(3)]
    cut, prompt_len = fewest_cut(client, [], chat_messages, CANVAS)
    assert chat_messages[cut]["role"] == "user"
    plain_cut, _ = fewest_cut(client, [], chat_messages, CANVAS, lambda m: True)
    assert plain_cut == 5  # the fewest turns that fit would start at the tool result: the search must pass it
    r = client.responses.create(model=MODEL, input=items, max_output_tokens=CANVAS, truncation="auto",
                                extra_body={"seed": 1, "max_denoising_steps": 1})
    assert r.usage.input_tokens == prompt_len


def test_room_for_a_format_and_min_tokens(client):
    """With no max_output_tokens, the reply's room is what the request asks at least: a JSON schema's least
    output (several canvases here), or min_tokens; not one canvas."""
    messages = turns(15)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 40}},
              "required": ["answer"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "a", "schema": schema}
    r = client.responses.create(model=MODEL, input=messages, text={"format": fmt}, truncation="auto",
                                extra_body={"seed": 1, "max_denoising_steps": 1})
    want = fewest_cut(client, [], messages, None, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert r.usage.input_tokens == want[1] and want[1] + 3 * CANVAS <= CONTEXT  # the least output: > 2 canvases
    assert r.usage.input_tokens < fewest_cut(client, [], messages, CANVAS)[1]
    r = client.responses.create(model=MODEL, input=messages, truncation="auto",
                                extra_body={"seed": 1, "max_denoising_steps": 1, "min_tokens": 40})
    assert r.usage.input_tokens == fewest_cut(client, [], messages, None,
                                              extra_body={"seed": 1, "max_denoising_steps": 1, "min_tokens": 40})[1]


def test_a_template_that_wants_alternating_roles(tiny_checkpoint, tmp_path, one_thread):
    """Gemma 3's template refuses a conversation that starts with an assistant turn: cuts start at user turns."""
    import shutil

    from test_tokenizer import GEMMA_TEMPLATE

    d = tmp_path / "alternating"
    shutil.copytree(tiny_checkpoint, d)
    (d / "chat_template.jinja").write_text(GEMMA_TEMPLATE)
    state = build_state(d, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=CONTEXT), served_model_name=MODEL)
    with BackgroundServer(state) as srv:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = turns(15)
        r = client.responses.create(model=MODEL, input=messages, max_output_tokens=CANVAS, truncation="auto",
                                    extra_body={"seed": 1, "max_denoising_steps": 1})
        assert r.usage.input_tokens == fewest_cut(client, [], messages, CANVAS)[1]


def test_stored_turns_are_kept_whole(client):
    messages = turns(15)
    first = client.responses.create(model=MODEL, input=messages, max_output_tokens=CANVAS, truncation="auto",
                                    extra_body={"seed": 1, "max_denoising_steps": 1})
    with pytest.raises(BadRequestError):  # the stored conversation is the whole one: too long again
        client.responses.create(model=MODEL, input="and?", previous_response_id=first.id, max_output_tokens=CANVAS)
    again = client.responses.create(model=MODEL, input="and?", previous_response_id=first.id,
                                    max_output_tokens=CANVAS, truncation="auto",
                                    extra_body={"seed": 1, "max_denoising_steps": 1})
    assert again.usage.input_tokens <= CONTEXT - CANVAS


def test_no_cut_fits_is_the_400_of_the_shortest_try(client):
    newest = {"role": "user", "content": "y " * 200}
    with pytest.raises(BadRequestError) as alone:
        client.responses.create(model=MODEL, input=[newest], max_output_tokens=CANVAS)
    with pytest.raises(BadRequestError) as e:  # the newest turn alone is too long
        client.responses.create(model=MODEL, input=[*turns(20), newest], truncation="auto", max_output_tokens=CANVAS)
    assert e.value.code == "context_length_exceeded"
    assert e.value.message == alone.value.message  # what could not fit: that turn, not the whole conversation


@pytest.mark.parametrize("role", ["system", "developer"])
def test_a_system_prompt_sent_as_input_stays(client, role):
    """The Agents SDK and Codex send their system prompt as the first input item: a cut keeps it, as it keeps
    `instructions`, and drops the oldest turns after it."""
    messages, system = turns(15), [{"role": role, "content": "RULES: be brief"}]
    r = client.responses.create(model=MODEL, input=system + messages, max_output_tokens=CANVAS, truncation="auto",
                                extra_body={"seed": 1, "max_denoising_steps": 1})
    cut, prompt_len = fewest_cut(client, system, messages, CANVAS)
    assert cut > 0 and r.usage.input_tokens == prompt_len


def test_an_agent_loop_keeps_its_user_turn_and_drops_its_oldest_calls(client):
    """One user request, then calls and their results: the request stays, and whole call / result pairs after it
    go, oldest first (a result never without its call); the newest result stays."""
    items, chat_messages = [{"role": "user", "content": "TASK: fix the bug"}], []
    for k in range(8):
        items += [{"type": "function_call", "call_id": f"c{k}", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": f"c{k}", "output": f"result {k} " + "x" * 10}]
        chat_messages += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{k}", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": f"c{k}", "content": f"result {k} " + "x" * 10}]
    r = client.responses.create(model=MODEL, input=items, max_output_tokens=CANVAS, truncation="auto",
                                extra_body={"seed": 1, "max_denoising_steps": 1})
    cut, prompt_len = fewest_cut(client, [items[0]], chat_messages, CANVAS, lambda m: m["role"] == "assistant")
    assert cut > 0 and r.usage.input_tokens == prompt_len


def test_a_format_without_max_output_tokens_takes_a_logarithmic_search(tiny_checkpoint, one_thread, monkeypatch):
    """Each try of the search is a real `prepare` (a format's least output included): on a long conversation
    they are O(log turns), not one per turn between an estimate and the fit."""
    from canvaslm.server import responses

    calls, real = [], responses.prepare_translated

    async def counted(*a, **kw):
        calls.append(1)
        return await real(*a, **kw)

    monkeypatch.setattr(responses, "prepare_translated", counted)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 600}},
              "required": ["answer"], "additionalProperties": False}
    messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"t{k}"} for k in range(401)]
    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=1024),
                        served_model_name=MODEL)
    with BackgroundServer(state) as srv:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.responses.create(model=MODEL, input=messages, truncation="auto", max_output_tokens=None,
                                    text={"format": {"type": "json_schema", "name": "a", "schema": schema}},
                                    extra_body={"seed": 1, "max_denoising_steps": 1})
    assert 1024 - 40 * CANVAS < r.usage.input_tokens <= 1024 - 38 * CANVAS  # room for the format's 600+ tokens
    assert len(calls) <= 2 + 8  # the whole body, then a binary search over 200 cuts (was one try per cut)


@pytest.fixture(scope="module")
def vision_client(tmp_path_factory, one_thread):
    from conftest import build_vision_chat_checkpoint

    out = tmp_path_factory.mktemp("vision_chat")
    build_vision_chat_checkpoint(out)
    state = build_state(out, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=512), served_model_name=MODEL)
    with BackgroundServer(state) as srv:
        yield OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_images_count_at_their_largest_budget(vision_client):
    from conftest import data_url, png

    def image_turn(seed):
        return {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                            {"type": "input_image", "image_url": data_url(png(50, 70, seed))}]}

    long_turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k} " + "words " * 12}
                  for k in range(14)]
    # an old image turn is cut with the turns after it that do not fit; the image is not loaded
    r = vision_client.responses.create(model=MODEL, input=[image_turn(1), *long_turns], max_output_tokens=CANVAS,
                                       truncation="auto", extra_body={"seed": 1, "max_denoising_steps": 1})
    assert r.usage.input_tokens <= 512 - CANVAS
    # the newest turn's image stays; the text before it leaves room for its soft tokens
    r = vision_client.responses.create(model=MODEL, input=[*long_turns, image_turn(2)], max_output_tokens=CANVAS,
                                       truncation="auto", extra_body={"seed": 1, "max_denoising_steps": 1})
    assert r.usage.input_tokens <= 512 - CANVAS
    with pytest.raises(BadRequestError) as e:
        vision_client.responses.create(model=MODEL, input=[*long_turns, image_turn(2)], max_output_tokens=CANVAS)
    assert e.value.code == "context_length_exceeded"


@pytest.fixture(scope="module")
def budget_280_client(tmp_path_factory, one_thread):
    """A vision checkpoint whose processor gives images 280 soft tokens (Gemma 4's default); "low" gives 70."""
    import json

    from conftest import build_vision_chat_checkpoint

    out = tmp_path_factory.mktemp("vision_280")
    build_vision_chat_checkpoint(out)
    cfg = json.loads((out / "processor_config.json").read_text())
    cfg["image_processor"]["max_soft_tokens"] = 280
    (out / "processor_config.json").write_text(json.dumps(cfg))
    state = build_state(out, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=512), served_model_name=MODEL)
    with BackgroundServer(state) as srv:
        yield OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_low_detail_image_counts_at_its_own_size(budget_280_client):
    """A conversation that fits whole with a `detail: "low"` image is not cut (it was, with every image counted at
    the largest budget), and an over-long one loses only the fewest turns."""
    from conftest import data_url, png

    vision_client = budget_280_client
    low = {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                       {"type": "input_image", "image_url": data_url(png(50, 70, 2)), "detail": "low"}]}
    text = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k} " + "words " * 12} for k in range(4)]
    kw = dict(model=MODEL, max_output_tokens=CANVAS, extra_body={"seed": 1, "max_denoising_steps": 1})
    whole = vision_client.responses.create(input=[*text, low], **kw)
    auto = vision_client.responses.create(input=[*text, low], truncation="auto", **kw)
    assert auto.usage.input_tokens == whole.usage.input_tokens
    text = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k} " + "words " * 12} for k in range(14)]
    auto = vision_client.responses.create(input=[*text, low], truncation="auto", **kw)
    fits = [vision_client.responses.create(input=[*text[k:], low], **kw).usage.input_tokens
            for k in range(0, 14, 2) if _fits(vision_client, [*text[k:], low], kw)]
    assert auto.usage.input_tokens == fits[0]


def _fits(client, items, kw) -> bool:
    try:
        client.responses.create(input=items, **kw)
    except BadRequestError:
        return False
    return True
