"""Chat review (session 25): a thought the prompt leaves open (a prefilled reply; a Gemma 4 generation prompt that
opens the channel) is the reply's in LLM.chat, the chat CLI and `generate --chat` as on the server; a
thought-first reply goes on with such a thought instead of opening a second channel; a template that loops over
content parts gets text-only part lists as lists (as transformers passes them); and an unfinished call read by
tool_choice="auto" leaves the EOS out of the text."""

from __future__ import annotations

import io
import json

import pytest

from canvaslm.llm import LLM, GenerationResult, SamplingParams
from canvaslm.reasoning import CHANNEL_CLOSE as CLOSE
from canvaslm.reasoning import CHANNEL_OPEN as OPEN
from canvaslm.reasoning import ThoughtSplitter
from canvaslm.tokenizer import Tokenizer
from canvaslm.tool_parser import CALL_CLOSE, CALL_OPEN
from canvaslm.tool_parser import QUOTE as Q

PARTS_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{% if m['content'] is string %}{{ m['content'] }}"
                  "{% else %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<model>{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}


@pytest.fixture(scope="module")
def opening_llm(opening_template_dir):
    return LLM(opening_template_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def think_llm(chat_specials_dir):
    return LLM(chat_specials_dir, device="cpu", dtype="float32")


def _scripted(monkeypatch, llm, text, finish="stop", eos=True):
    """The model answers every prompt with `text`'s ids (then EOS), whichever way LLM.chat runs it."""
    tok = llm.tokenizer
    ids = tok.encode(text, add_special_tokens=False) + ([tok.eos_ids[0]] if eos else [])
    monkeypatch.setattr(llm, "_generate_rows", lambda rows, *a, **kw: [
        GenerationResult(r.prompt_ids, list(ids), tok.decode(ids), finish, 1.0, 1) for r in rows])


def test_thought_first_goes_on_with_a_thought_the_prompt_opened(opening_llm, monkeypatch):
    """A constrained reply with thinking on, after a generation prompt that ends with `<|channel>thought\\n`: the
    thought request's prompt is the chat prompt as rendered (no second `<|channel>`), the answer's is that prompt
    + the thought and its close, and the reply's reasoning is the thought (its text, not the answer's)."""
    llm, tok = opening_llm, opening_llm.tokenizer
    split = ThoughtSplitter.for_tokenizer(tok)
    msgs = [{"role": "user", "content": "q"}]
    prompt = tok.encode_chat(msgs, enable_thinking=True)
    assert tok.decode(prompt, skip_special_tokens=False).endswith("model\n<|channel>thought\n")
    calls = []
    real = llm._generate_rows
    monkeypatch.setattr(llm, "_generate_rows", lambda rows, *a, **k: (calls.append(rows), real(rows, *a, **k))[1])
    x = tok.encode("x", add_special_tokens=False)[0]
    # the label (8 tokens) is in the prompt and counts toward the budget: 4 thought tokens are left after it
    sp = SamplingParams(seed=1, max_new_tokens=64, max_denoising_steps=4, json_schema=SCHEMA, thinking_token_budget=12,
                        logit_bias={x: 50})
    res = llm.chat(msgs, sp, chat_template_kwargs={"enable_thinking": True})
    (thought,), (answer,) = calls
    assert list(thought.prompt_ids) == prompt  # it used to be prompt + [<|channel>]
    head = res.token_ids[:res.token_ids.index(split.close_id) + 1]
    assert split.open_id not in head and list(answer.prompt_ids) == prompt + head
    assert res.reasoning == tok.decode(head[:-1]) == "xxxx"
    assert json.loads(res.text).keys() == {"a"}


def test_a_thought_the_prompt_left_open_is_the_replys(opening_llm, think_llm, monkeypatch):
    """LLM.chat reads a prompt's open thought with the output, as the server's TextTracker does: a prefilled thought
    (continue_final_message) gives the rest of the thought as reasoning and the answer as text; a generation prompt
    that opens the channel gives its thought as reasoning, and tool_choice="auto" reads calls from the answer alone
    (not from the thought)."""
    prefilled = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": f"{OPEN}thought\nLet me"}]
    _scripted(monkeypatch, think_llm, f" think.{CLOSE}It is 4.")
    res = think_llm.chat(prefilled, SamplingParams(max_new_tokens=32), continue_final_message=True)
    assert (res.text, res.reasoning) == ("It is 4.", " think.")  # was (" think.It is 4.", None)

    msgs = [{"role": "user", "content": "weather?"}]
    on = {"enable_thinking": True}
    _scripted(monkeypatch, opening_llm, f"hm{CLOSE}Answer.")
    res = opening_llm.chat(msgs, SamplingParams(max_new_tokens=32), chat_template_kwargs=on)
    assert (res.text, res.reasoning) == ("Answer.", "hm")
    _scripted(monkeypatch, opening_llm, "hm")  # cut inside the thought: no answer yet
    res = opening_llm.chat(msgs, SamplingParams(max_new_tokens=32), chat_template_kwargs=on)
    assert (res.text, res.reasoning) == ("", "hm")
    in_thought = f"{CALL_OPEN}call:get_weather{{city:{Q}Oslo{Q}}}{CALL_CLOSE}{CLOSE}Sunny."
    _scripted(monkeypatch, opening_llm, in_thought)
    res = opening_llm.chat(msgs, SamplingParams(max_new_tokens=64), tools=[WEATHER], tool_choice="auto",
                           chat_template_kwargs=on)
    assert res.tool_calls is None and res.text == "Sunny." and res.reasoning.startswith("call:get_weather")
    called = f"hm{CLOSE}{CALL_OPEN}call:get_weather{{city:{Q}Oslo{Q}}}{CALL_CLOSE}"
    _scripted(monkeypatch, opening_llm, called)
    res = opening_llm.chat(msgs, SamplingParams(max_new_tokens=64), tools=[WEATHER], tool_choice="auto",
                           chat_template_kwargs=on)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in res.tool_calls] == \
        [("get_weather", {"city": "Oslo"})] and (res.text, res.reasoning) == ("", "hm")


def test_the_chat_cli_and_generate_chat_read_a_thought_the_prompt_opened(opening_template_dir, monkeypatch, capsys):
    """`canvaslm chat --think` and `canvaslm generate --chat --think` on a template whose generation prompt opens
    the channel: the reply's thought goes to [thinking], its answer alone is the text."""
    from canvaslm.cli import main
    from canvaslm.engine.engine import Finish

    tok = Tokenizer.from_dir(opening_template_dir)
    ids = tok.encode(f"hmm{CLOSE}Fine.", add_special_tokens=False) + [tok.eos_ids[0]]

    async def run(self, request, on_draft=None):
        return ids, Finish(request.request_id, "stop", len(ids), 1)

    monkeypatch.setattr("canvaslm.engine.engine.Engine.run", run)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(opening_template_dir), "--think"]) == 0
    out, err = capsys.readouterr()
    assert out == "Fine.\n" and "[thinking] hmm" in err  # was "hmmFine." and no thought

    monkeypatch.setattr(LLM, "generate", lambda self, prompts, params=None, **kw: [
        GenerationResult(prompts[0], list(ids), tok.decode(ids), "stop", 1.0, 1)])
    assert main(["generate", str(opening_template_dir), "--prompt", "hi", "--chat", "--think", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["text"], got["reasoning"]) == ("Fine.", "hmm")


def test_an_unfinished_call_after_a_whole_one_leaves_the_eos_out(think_llm, monkeypatch):
    """tool_choice="auto": the text keeps an unfinished call as written, without the EOS that ended the reply (the
    parser decodes calls with their special tokens, so the EOS used to show as "<eos>")."""
    out = f"{CALL_OPEN}call:get_weather{{city:{Q}Oslo{Q}}}{CALL_CLOSE}{CALL_OPEN}call:get_weather{{city:{Q}Ro"
    _scripted(monkeypatch, think_llm, out)
    res = think_llm.chat([{"role": "user", "content": "weather?"}], SamplingParams(max_new_tokens=64),
                         tools=[WEATHER], tool_choice="auto")
    assert res.text == f"{CALL_OPEN}call:get_weather{{city:{Q}Ro"
    assert [json.loads(c["function"]["arguments"]) for c in res.tool_calls] == [{"city": "Oslo"}]
    assert res.token_ids[-1] == think_llm.tokenizer.eos_ids[0]  # the id stays in token_ids (vLLM's way)
    _scripted(monkeypatch, think_llm, out, finish="length", eos=False)  # cut by max_new_tokens: nothing to drop
    res = think_llm.chat([{"role": "user", "content": "weather?"}], SamplingParams(max_new_tokens=64),
                         tools=[WEATHER], tool_choice="auto")
    assert res.text == f"{CALL_OPEN}call:get_weather{{city:{Q}Ro"


def test_a_template_that_loops_over_parts_gets_text_parts_as_a_list(chat_specials_dir, tmp_path):
    """A template that renders content parts itself gets a text-only part list as the list (transformers and
    vLLM pass it as it is), not the parts joined by "\\n"; a template that takes a string still gets them joined.
    continue_final_message goes on after the last text part."""
    tok = Tokenizer.from_dir(chat_specials_dir)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]}]
    assert not tok.renders_parts
    assert tok.apply_chat_template(msgs).count("Hello\nWorld") == 1
    tok.set_chat_template(PARTS_TEMPLATE)
    assert tok.renders_parts
    assert tok.apply_chat_template(msgs) == "<user>[Hello][World]<model>"  # was "<user>Hello\nWorld<model>"
    going_on = msgs + [{"role": "assistant", "content": [{"type": "text", "text": "Hi"},
                                                         {"type": "text", "text": "there"}]}]
    assert tok.apply_chat_template(going_on, add_generation_prompt=False, continue_final_message=True) == \
        "<user>[Hello][World]<assistant>[Hi][there"
    assert tok.apply_chat_template([{"role": "user", "content": "plain"}]) == "<user>plain<model>"


def test_parts_render_as_transformers_renders_them(chat_specials_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    import shutil

    d = tmp_path / "parts"
    shutil.copytree(chat_specials_dir, d)
    (d / "chat_template.jinja").write_text(PARTS_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_dir(d)
    for content in ([{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}],
                    [{"type": "text", "text": "one"}], "text"):
        msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": content}]
        assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False,
                                                                        add_generation_prompt=True)
    llm = LLM(d, device="cpu", dtype="float32")
    res = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]}],
                   SamplingParams(max_new_tokens=4, max_denoising_steps=2, seed=0))
    assert llm.tokenizer.decode(res.prompt_ids, skip_special_tokens=False) == "<user>[Hello][World]<model>"
