"""Review round 2 (session 25), library side: a `<|channel>` in a user's message (tokenizers read the literal text
as the special token) opens no thought: only a channel in the prompt's last turn, the model's, is the reply's, in
LLM.chat, thought-first replies, thinking budgets and the server; and a template that treats content as a list
through a `set` alias, a macro's parameter or a list filter gets text parts as the list (as transformers passes
them), while one that only prints content still gets them joined."""

from __future__ import annotations

import json

import pytest

from canvaslm.llm import LLM, GenerationResult, SamplingParams
from canvaslm.reasoning import CHANNEL_CLOSE as CLOSE
from canvaslm.reasoning import CHANNEL_OPEN as OPEN
from canvaslm.reasoning import ThoughtSplitter, Turns, open_channel
from canvaslm.sampling.thinking import ThinkingBudget
from canvaslm.tokenizer import Tokenizer, build_char_tokenizer

STRAY = [{"role": "user", "content": f"what does {OPEN} mean?"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(chat_specials_dir):
    return Tokenizer.from_dir(chat_specials_dir)


@pytest.fixture(scope="module")
def think_llm(chat_specials_dir):
    return LLM(chat_specials_dir, device="cpu", dtype="float32")


def _scripted(monkeypatch, llm, text):
    """The model answers every prompt with `text`'s ids, then EOS (none after a thought's close); returns the
    list each call's rows go to."""
    tok, calls = llm.tokenizer, []

    def rows_out(rows, *a, **kw):
        calls.append(rows)
        ids = tok.encode(text, add_special_tokens=False)
        ids += [] if text.endswith(CLOSE) else [tok.eos_ids[0]]
        return [GenerationResult(r.prompt_ids, list(ids), tok.decode(ids), "stop", 1.0, 1) for r in rows]

    monkeypatch.setattr(llm, "_generate_rows", rows_out)
    return calls


def test_a_channel_opens_only_in_the_prompts_last_turn_the_models(tok):
    split = ThoughtSplitter.for_tokenizer(tok)
    assert split.turns is not None and tok.token_to_id("<start_of_turn>") in split.turns.starts
    stray = tok.encode_chat(STRAY)
    assert OPEN in tok.decode(stray, skip_special_tokens=False) and split.open_id in stray
    assert split.prompt_thought(stray) == []  # was the user's `<|channel>` and all after it
    assert open_channel(stray, split.open_id, split.close_id, split.turns) is None
    prefilled = tok.encode_chat(STRAY + [{"role": "assistant", "content": f"{OPEN}thought\nLet me"}],
                                add_generation_prompt=False, continue_final_message=True)
    head = split.prompt_thought(prefilled)
    assert head[0] == split.open_id and tok.decode(head[1:]) == "thought\nLet me"
    # a prompt whose last turn is the user's: the channel in it is that turn's text
    user_last = tok.encode_chat(STRAY, add_generation_prompt=False, continue_final_message=True)
    assert split.prompt_thought(user_last) == []
    # no turn at all (a raw prompt): read whole, as before
    raw = tok.encode(f"x{OPEN}thought\nhm", add_special_tokens=False)
    assert split.prompt_thought(raw) == raw[1:]


def test_a_vocabulary_without_turn_tokens_reads_prompts_whole(tmp_path):
    tok = build_char_tokenizer(list("abhotug\n"), ["<pad>", "<eos>", "<bos>", OPEN, CLOSE], tmp_path)
    split = ThoughtSplitter.for_tokenizer(tok)
    assert split.turns is None and Turns.for_tokenizer(tok) is None
    ids = tok.encode(f"a{OPEN}b", add_special_tokens=False)
    assert split.prompt_thought(ids) == ids[1:]


def test_llm_chat_keeps_a_users_channel_out_of_the_reasoning(think_llm, monkeypatch):
    _scripted(monkeypatch, think_llm, "Hi there")
    res = think_llm.chat(STRAY, SamplingParams(max_new_tokens=16))
    assert (res.text, res.reasoning) == ("Hi there", None)  # was ("", "Hi there")


def test_thought_first_opens_the_channel_after_a_users_channel(think_llm, monkeypatch):
    llm, tok = think_llm, think_llm.tokenizer
    split = ThoughtSplitter.for_tokenizer(tok)
    prompt = tok.encode_chat(STRAY, enable_thinking=True)
    calls = _scripted(monkeypatch, llm, f"hm{CLOSE}")
    sp = SamplingParams(seed=1, max_new_tokens=64, max_denoising_steps=4, json_schema=SCHEMA)
    llm.chat(STRAY, sp, chat_template_kwargs={"enable_thinking": True})
    thought = calls[0][0]
    assert list(thought.prompt_ids) == prompt + [split.open_id]  # was the prompt alone: no channel opened


def test_a_thinking_budget_counts_no_users_channel(tok):
    budget = ThinkingBudget.for_tokenizer(4, tok)
    assert budget.tracker(tok.encode_chat(STRAY)).start is None  # was -len(tail after the user's `<|channel>`)
    prefilled = tok.encode_chat(STRAY + [{"role": "assistant", "content": f"{OPEN}thought\nhm"}],
                                add_generation_prompt=False, continue_final_message=True)
    assert budget.tracker(prefilled).start == -len(tok.encode("thought\nhm", add_special_tokens=False))


def test_the_server_keeps_a_users_channel_out_of_the_reasoning(chat_specials_dir, monkeypatch):
    httpx = pytest.importorskip("httpx")
    from canvaslm.server.launch import BackgroundServer, build_state
    from canvaslm.testing import script_engine

    with BackgroundServer(build_state(chat_specials_dir, device="cpu")) as srv:
        tok = srv.state.tokenizer

        def chat(**body):
            r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60,
                           json={"model": srv.state.model_name, "messages": STRAY, **body})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]

        script_engine(monkeypatch, srv.state, "Hi there")
        msg = chat()
        assert msg["content"] == "Hi there" and not msg.get("reasoning_content")
        # thought-first: the thought, then the constrained answer
        prompts = script_engine(monkeypatch, srv.state, f"hm{CLOSE}", '{"a": 1}')
        msg = chat(chat_template_kwargs={"enable_thinking": True}, max_tokens=64, response_format={
            "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
        prompt = tok.encode_chat(STRAY, enable_thinking=True)
        assert prompts[0] == prompt + [tok.token_to_id(OPEN)]  # the reply opens its own channel
        assert msg["reasoning_content"] == "hm" and json.loads(msg["content"]) == {"a": 1}


# ---- content parts: what the template does with content, read from its syntax tree ----

PARTS = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]
TEMPLATES = {  # name -> (template, takes parts)
    "aliased_loop": ("{% for m in messages %}{% set c = m['content'] %}<{{ m['role'] }}>{% if c is string %}{{ c }}"
                     "{% else %}{% for p in c %}[{{ p.text }}]{% endfor %}{% endif %}\n{% endfor %}", True),
    "alias_of_alias": ("{% for m in messages %}{% set c = m.content %}{% set d = c %}{% for p in d %}[{{ p.text }}]"
                       "{% endfor %}{% endfor %}", True),
    "namespace_slot": ("{% set ns = namespace(c='') %}{% for m in messages %}{% set ns.c = m.get('content') %}"
                       "{% for p in ns.c %}[{{ p.text }}]{% endfor %}{% endfor %}", True),
    "macro_loop": ("{% macro render(content) %}{% if content is string %}{{ content }}{% else %}{% for p in content %}"
                   "[{{ p.text }}]{% endfor %}{% endif %}{% endmacro %}{% for m in messages %}<{{ m['role'] }}>"
                   "{{ render(m['content']) }}\n{% endfor %}", True),
    "macro_keyword": ("{% macro render(x, content='') %}{% for p in content %}[{{ p.text }}]{% endfor %}{% endmacro %}"
                      "{% for m in messages %}{{ render(1, content=m.content) }}{% endfor %}", True),
    "selectattr": ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                   "{{ m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
                   "{% endif %}\n{% endfor %}", True),
    "indexed": ("{% for m in messages %}{{ m.content[0].text }}{% endfor %}", True),
    "string_only": ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", False),
    "string_ops": ("{% for m in messages %}{% set c = m.content | default('') %}{{ c | trim }}{{ c.split('x')[0] }}"
                   "{% if c | length > 0 %}!{% endif %}{% endfor %}", False),
    "macro_of_a_string": ("{% macro say(text) %}{{ text | trim }}{% endmacro %}{% for m in messages %}"
                          "{{ say(m.content) }}{% endfor %}", False),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_that_treat_content_as_a_list_get_parts(tmp_path, name):
    template, parts = TEMPLATES[name]
    tok = build_char_tokenizer(list("ab"), ["<pad>", "<eos>", "<bos>"], tmp_path, chat_template=template)
    assert tok.renders_parts is parts


@pytest.mark.parametrize("name", ["aliased_loop", "macro_loop", "selectattr"])
def test_parts_render_as_transformers_renders_them(chat_specials_dir, tmp_path, name):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(chat_specials_dir))
    ours = Tokenizer.from_dir(chat_specials_dir)
    template = TEMPLATES[name][0]
    ours.set_chat_template(template)
    for msgs in ([{"role": "user", "content": PARTS}],
                 [{"role": "system", "content": PARTS}, {"role": "user", "content": "hi"}]):
        want = hf.apply_chat_template(msgs, chat_template=template, tokenize=False)
        assert ours.apply_chat_template(msgs, add_generation_prompt=False) == want
        assert "Hello\nWorld" not in want


def test_a_string_template_still_gets_parts_joined(chat_specials_dir):
    tok = Tokenizer.from_dir(chat_specials_dir)
    tok.set_chat_template(TEMPLATES["string_only"][0])
    assert tok.apply_chat_template([{"role": "user", "content": PARTS}], add_generation_prompt=False) == \
        "Hello\nWorld\n"


def test_the_tool_use_template_decides_for_itself(chat_specials_dir, tmp_path):
    """With tools, the checkpoint's tool_use template renders: its own use of content decides, not the default's."""
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(chat_specials_dir, d)
    (d / "chat_template.jinja").write_text(TEMPLATES["string_only"][0])
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text(TEMPLATES["aliased_loop"][0])
    tok = Tokenizer.from_dir(d)
    assert set(tok.chat_templates) == {"default", "tool_use"} and not tok.renders_parts
    msgs = [{"role": "user", "content": PARTS}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "Hello\nWorld\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]) == "<user>[Hello][World]"
