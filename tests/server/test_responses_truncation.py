"""/v1/responses `truncation: "auto"`: a conversation longer than the context loses as few of its oldest
turns as leave room for the reply (the instructions and the newest turn stay; a cut starts at a user turn, so
roles still alternate and a tool result keeps its call), checked against chat completions of every cut;
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


def test_no_cut_fits_is_the_usual_400(client):
    with pytest.raises(BadRequestError) as e:  # the newest turn alone is too long
        client.responses.create(model=MODEL, input=[*turns(2), {"role": "user", "content": "y " * 200}],
                                truncation="auto", max_output_tokens=CANVAS)
    assert e.value.code == "context_length_exceeded"


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
