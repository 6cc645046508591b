"""Tests for canvaslm.tokenizer: tiny tokenizers built offline, chat templates checked against transformers."""

import json
from datetime import datetime

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from canvaslm.testing import CHAT_TEMPLATE
from canvaslm.tokenizer import Tokenizer, build_char_tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<unk>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Block diffusion models denoise a whole canvas of tokens at once.",
    "A sudoku grid has nine rows, nine columns and nine boxes.",
    "Hello there! How are you today? I am fine, thank you.",
    "Numbers like 12345 and symbols like {} [] <> should round trip.",
]

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# Exercises what the environment must match HF on: trim_blocks/lstrip_blocks, tojson, namespace,
# loop controls, strftime_now, documents, extra kwargs and the eos/pad variables.
FEATURE_TEMPLATE = """{{ bos_token }}
{% if tools %}
    Tools: {{ tools | tojson }}
{% endif %}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'stop' %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ m.role }}] {{ m.content }}{{ eos_token }}
{% endfor %}
turns={{ ns.n }} year={{ strftime_now('%Y') }} docs={{ documents is none }}
pad={{ pad_token }} flag={{ flag | default('unset') }}
{% if add_generation_prompt %}[assistant]{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you today?"}],
    [
        {"role": "user", "content": "  What is 12345?  "},
        {"role": "assistant", "content": "A number."},
        {"role": "user", "content": "Fine, thank you."},
    ],
    [{"role": "user", "content": "Symbols: {} [] <> \"quotes\" and unicode é ✓"}],
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A small byte-level BPE with Gemma-like specials, a bos-adding post-processor and HF side files."""
    d = tmp_path_factory.mktemp("bpe")
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    backend.save(str(d / "tokenizer.json"))
    _write(d / "tokenizer_config.json", {"bos_token": "<bos>", "eos_token": {"content": "<eos>", "special": True},
                                         "pad_token": "<pad>", "chat_template": GEMMA_TEMPLATE})
    _write(d / "generation_config.json", {"eos_token_id": [1, 4], "bos_token_id": 2})
    return d


def _write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")


def _copy_tokenizer(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    return dst


@pytest.fixture(scope="module")
def hf_tok(bpe_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"), bos_token="<bos>",
                                                eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


# -- loading and special ids --------------------------------------------------------------------------


def test_from_dir_reads_special_ids(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    assert (tok.pad_id, tok.bos_id) == (0, 2)
    assert tok.eos_ids == (1, 4) and tok.eos_id == 1
    assert tok.vocab_size == Backend.from_file(str(bpe_dir / "tokenizer.json")).get_vocab_size()
    assert tok.token_to_id("<end_of_turn>") == 4 and tok.id_to_token(4) == "<end_of_turn>"
    assert tok.chat_template == GEMMA_TEMPLATE


def test_special_ids_from_special_tokens_map(bpe_dir, tmp_path):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "special_tokens_map.json", {"bos_token": {"content": "<bos>"}, "eos_token": "<end_of_turn>",
                                           "pad_token": "<pad>"})
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (2, (4,), 0)
    assert tok.chat_template is None


@pytest.mark.parametrize("config, eos_ids", [
    ({"eos_token": "<eos>"}, (4,)),  # the legacy layout: special_tokens_map.json overrides the config
    ({"eos_token": "<eos>", "added_tokens_decoder": {}}, (1,)),  # then transformers reads the config alone
])
def test_special_tokens_map_overrides_config_as_transformers_does(bpe_dir, tmp_path, config, eos_ids):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "tokenizer_config.json", config)
    _write(d / "special_tokens_map.json", {"eos_token": "<end_of_turn>"})
    assert Tokenizer.from_dir(d).eos_ids == eos_ids
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(d).eos_token_id == eos_ids[0]


@pytest.mark.parametrize("eos", [1, [1, 4], [4, 1, 4]])
def test_generation_config_eos_int_or_list(bpe_dir, tmp_path, eos):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "generation_config.json", {"eos_token_id": eos, "pad_token_id": 0})
    tok = Tokenizer.from_dir(d)
    assert list(tok.eos_ids) == list(dict.fromkeys(eos if isinstance(eos, list) else [eos]))
    assert tok.pad_id == 0 and tok.bos_id is None


def test_config_json_nested_text_config(bpe_dir, tmp_path):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "config.json", {"model_type": "diffusion_gemma",
                               "text_config": {"bos_token_id": 2, "eos_token_id": [1, 4], "pad_token_id": 0}})
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (2, (1, 4), 0)


def test_generation_config_wins_over_config_json(bpe_dir, tmp_path):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "config.json", {"eos_token_id": 1, "bos_token_id": 3})
    _write(d / "generation_config.json", {"eos_token_id": 4})
    tok = Tokenizer.from_dir(d)
    assert tok.eos_ids == (4,) and tok.bos_id == 3


def test_eos_token_string_comes_first_then_generation_ids(bpe_dir, tmp_path):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "tokenizer_config.json", {"eos_token": "<end_of_turn>"})
    _write(d / "generation_config.json", {"eos_token_id": [1, 4]})
    assert Tokenizer.from_dir(d).eos_ids == (4, 1)


def test_no_side_files_means_no_special_ids(bpe_dir, tmp_path):
    tok = Tokenizer.from_dir(_copy_tokenizer(bpe_dir, tmp_path))
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.eos_id) == (None, (), None, None)


# -- chat template sources ----------------------------------------------------------------------------


def test_chat_template_jinja_file_wins(bpe_dir, tmp_path):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "tokenizer_config.json", {"chat_template": "from config"})
    _write(d / "chat_template.jinja", "from jinja file")
    assert Tokenizer.from_dir(d).chat_template == "from jinja file"


def test_chat_template_list_takes_default(bpe_dir, tmp_path):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "tokenizer_config.json", {"chat_template": [{"name": "tool_use", "template": "tools"},
                                                           {"name": "default", "template": "plain"}]})
    assert Tokenizer.from_dir(d).chat_template == "plain"


TOOL_USE_TEMPLATE = "TOOLS={{ tools | tojson }}{% for m in messages %}{{ m['content'] }}|{% endfor %}"
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


@pytest.mark.parametrize("files", [
    {"tokenizer_config.json": {"chat_template": [{"name": "default", "template": PLAIN_TEMPLATE},
                                                 {"name": "tool_use", "template": TOOL_USE_TEMPLATE}]}},
    {"chat_template.jinja": PLAIN_TEMPLATE, "additional_chat_templates/tool_use.jinja": TOOL_USE_TEMPLATE},
    {"tokenizer_config.json": {"chat_template": [{"name": "default", "template": PLAIN_TEMPLATE},
                                                 {"name": "tool_use", "template": "replaced"}]},
     "additional_chat_templates/tool_use.jinja": TOOL_USE_TEMPLATE},
])
def test_named_tool_use_template_renders_chats_with_tools(bpe_dir, hf_tok, tmp_path, files):
    """transformers' choice among named templates: 'tool_use' when tools are passed, else 'default'; from a
    chat_template list or additional_chat_templates/NAME.jinja."""
    d = _copy_tokenizer(bpe_dir, tmp_path)
    (d / "additional_chat_templates").mkdir()
    for name, content in files.items():
        _write(d / name, content)
    tok = Tokenizer.from_dir(d)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tools=TOOLS) == "TOOLS=" + json.dumps(TOOLS) + "hi|"
    assert tok.apply_chat_template(msgs, tools=TOOLS) == hf_tok.apply_chat_template(
        msgs, chat_template=TOOL_USE_TEMPLATE, tools=TOOLS, tokenize=False)
    assert tok.apply_chat_template(msgs) == "hi|" and tok.chat_template == PLAIN_TEMPLATE


def test_only_a_tool_use_template(bpe_dir, tmp_path):
    """A checkpoint whose only template is 'tool_use' loads; a chat without tools has no template (as in
    transformers), and the error names the templates."""
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "tokenizer_config.json", {"chat_template": [{"name": "tool_use", "template": TOOL_USE_TEMPLATE}]})
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS).startswith("TOOLS=[")
    with pytest.raises(ValueError, match=r"chat templates are named \['tool_use'\] and none is 'default'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


GENERATION_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
    "{% generation %}{% set inner = 1 %}{{ m['content'] }}<end_of_turn>{% endgeneration %}"
    "{%- else %}{{ m['content'] }}<end_of_turn>{% endif %}\n{{ inner | default('-') }}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_generation_block_renders_its_body(bpe_dir, hf_tok, tmp_path):
    """`{% generation %}` (assistant-mask templates: TRL, SmolLM3) loads and renders its body as transformers
    does; a variable set inside stays inside."""
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "chat_template.jinja", GENERATION_TEMPLATE)
    tok = Tokenizer.from_dir(d)
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}]
    text = tok.apply_chat_template(msgs)
    assert "<start_of_turn>assistant\nA<end_of_turn>-" in text
    assert text == hf_tok.apply_chat_template(msgs, chat_template=GENERATION_TEMPLATE, tokenize=False,
                                              add_generation_prompt=True)


def test_template_syntax_error_breaks_chat_not_loading(bpe_dir, tmp_path):
    """A template that does not compile: the checkpoint loads and encodes text; a chat names the error."""
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "chat_template.jinja", "{% for m in messages %}")
    tok = Tokenizer.from_dir(d)
    assert tok.decode(tok.encode("The quick", add_special_tokens=False)) == "The quick"
    with pytest.raises(ValueError, match="chat template has a syntax error at line 1"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_json_file(bpe_dir, tmp_path):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "chat_template.json", {"chat_template": "processor style"})
    assert Tokenizer.from_dir(d).chat_template == "processor style"


# -- encode / decode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS + ["unseen words: zebra quokka ✓", "", "  spaces\n\nand newlines\t"])
def test_bpe_round_trip_and_matches_hf(bpe_dir, hf_tok, text):
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert ids == hf_tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


def test_decode_keeps_or_skips_specials(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode("Hello<end_of_turn>", add_special_tokens=False)
    assert ids[-1] == 4
    assert tok.decode(ids) == "Hello"
    assert tok.decode(ids, skip_special_tokens=False) == "Hello<end_of_turn>"


def test_char_tokenizer_ids_and_round_trip(tmp_path):
    tok = build_char_tokenizer("0123456789.| \n", ["<pad>", "<eos>", "<bos>"], tmp_path / "char")
    assert (tok.pad_id, tok.eos_ids, tok.bos_id) == (0, (1,), 2)
    assert tok.vocab_size == 3 + 14
    assert tok.token_to_id("0") == 3 and tok.id_to_token(16) == "\n"
    text = "12.|3 4\n56"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.encode("7<eos>") == [10, 1]
    assert tok.decode([10, 1, 0, 0]) == "7"
    assert tok.decode([10, 1], skip_special_tokens=False) == "7<eos>"
    # The files on disk load on their own, as a recipe would ship them.
    again = Tokenizer.from_dir(tmp_path / "char")
    assert again.encode(text) == ids and again.eos_ids == (1,)


def test_char_tokenizer_matches_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = build_char_tokenizer("abc ", ["<pad>", "<eos>", "<bos>"], tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.encode("ab c<eos>") == tok.encode("ab c<eos>")
    assert hf.decode(tok.encode("ab ca"), skip_special_tokens=True) == "ab ca"


def test_char_tokenizer_roles_and_unk(tmp_path):
    tok = build_char_tokenizer("ab", ["<unk>", "[END]", "<pad>"], tmp_path, eos_token="[END]")
    assert (tok.eos_ids, tok.pad_id, tok.bos_id) == ((1,), 2, None)
    assert tok.encode("azb") == [3, 0, 4]


def test_char_tokenizer_with_chat_template(tmp_path):
    template = "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    tok = build_char_tokenizer("xy", ["<pad>", "<eos>"], tmp_path, chat_template=template)
    assert tok.encode_chat([{"role": "user", "content": "xy"}]) == [2, 3, 1]


def test_char_tokenizer_extra_tokens_match_whole(tmp_path):
    tok = build_char_tokenizer("ab<", ["<pad>", "<eos>"], tmp_path, extra_tokens=["<r1c1:5>", "<ab>"])
    assert tok.vocab_size == 2 + 3 + 2
    assert tok.token_to_id("<r1c1:5>") == 5 and tok.token_to_id("<ab>") == 6
    assert tok.encode("a<r1c1:5>b<ab><", add_special_tokens=False) == [2, 5, 3, 6, 4]
    with pytest.raises(ValueError, match="duplicate.*'<ab>'"):
        build_char_tokenizer("a", ["<pad>"], tmp_path, extra_tokens=["<ab>", "<ab>"])


def test_char_tokenizer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="one character"):
        build_char_tokenizer(["ab"], ["<pad>"], tmp_path)
    with pytest.raises(ValueError, match="duplicate.*'a'"):
        build_char_tokenizer("aa", ["<pad>"], tmp_path)
    with pytest.raises(ValueError, match="duplicate.*'<pad>'"):
        build_char_tokenizer("a", ["<pad>", "<pad>"], tmp_path)
    with pytest.raises(ValueError, match="eos_token '</s>' is not in special_tokens"):
        build_char_tokenizer("a", ["<pad>"], tmp_path, eos_token="</s>")


def test_unknown_char_without_unk_raises(tmp_path):
    tok = build_char_tokenizer("ab", ["<pad>"], tmp_path)
    with pytest.raises(ValueError, match=r"cannot encode character 'c' \(U\+0063\) at index 2 of the text, in 'abc'"):
        tok.encode("abc")


# -- chat templates vs transformers -------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_template_matches_hf(bpe_dir, hf_tok, messages, add_generation_prompt):
    tok = Tokenizer.from_dir(bpe_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_tok.apply_chat_template(messages, chat_template=GEMMA_TEMPLATE, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert text.startswith("<bos><start_of_turn>user\n")
    assert text.endswith("<start_of_turn>model\n") == add_generation_prompt
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    expected_ids = hf_tok.apply_chat_template(messages, chat_template=GEMMA_TEMPLATE, tokenize=True,
                                              return_dict=False, add_generation_prompt=add_generation_prompt)
    assert ids == list(expected_ids)
    assert ids.count(tok.bos_id) == 1  # the template's bos, no second one from the post-processor


def test_gemma_template_exact_text(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    text = tok.apply_chat_template([{"role": "system", "content": "Sys."}, {"role": "user", "content": " Hi "},
                                    {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"}])
    assert text == ("<bos><start_of_turn>user\nSys.\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
                    "<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("tools", [None, [{"type": "function", "function": {"name": "add", "description": "a<b & c"}}]])
@pytest.mark.parametrize("extra", [{}, {"flag": "on"}])
def test_feature_template_matches_hf(bpe_dir, hf_tok, tmp_path, tools, extra):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "tokenizer_config.json", {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})
    _write(d / "chat_template.jinja", FEATURE_TEMPLATE)
    tok = Tokenizer.from_dir(d)
    messages = [{"role": "user", "content": "é ✓"}, {"role": "assistant", "content": "ok"},
                {"role": "stop", "content": "hidden"}, {"role": "user", "content": "never"}]
    text = tok.apply_chat_template(messages, tools=tools, **extra)
    expected = hf_tok.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tools=tools, tokenize=False,
                                          add_generation_prompt=True, **extra)
    assert text == expected
    assert f"turns=2 year={datetime.now().year}" in text and "hidden" not in text
    if tools:
        assert '"a<b & c"' in text  # plain json.dumps, not HTML-escaped


def test_list_content_parts_are_joined(bpe_dir, hf_tok):
    tok = Tokenizer.from_dir(bpe_dir)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(joined)
    assert tok.apply_chat_template(joined) == hf_tok.apply_chat_template(joined, chat_template=GEMMA_TEMPLATE,
                                                                         tokenize=False, add_generation_prompt=True)


def test_messages_are_not_mutated(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}], "name": None}]
    snapshot = json.dumps(messages)
    tok.apply_chat_template(messages)
    assert json.dumps(messages) == snapshot


def test_tool_call_only_assistant_message_allowed(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
                                   add_generation_prompt=False)
    assert text.endswith("<start_of_turn>model\n<end_of_turn>\n")


# -- errors -------------------------------------------------------------------------------------------


def test_missing_tokenizer_json_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in {tmp_path}"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_json(tmp_path):
    _write(tmp_path / "tokenizer.json", "{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    _write(tmp_path / "tokenizer.json", {"version": "1.0", "model": {"type": "Nope"}})
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("fname", ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                                   "config.json", "chat_template.json"])
def test_malformed_side_file_names_the_file(bpe_dir, tmp_path, fname):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / fname, '{"eos_token_id": [1,')
    with pytest.raises(ValueError, match=f"{fname}: malformed JSON"):
        Tokenizer.from_dir(d)
    _write(d / fname, "[1, 2]")
    with pytest.raises(ValueError, match=f"{fname}: expected a JSON object"):
        Tokenizer.from_dir(d)


@pytest.mark.parametrize("files, match", [
    ({"tokenizer_config.json": {"eos_token": "<nope>"}}, "tokenizer_config.json: eos_token '<nope>' is not in"),
    ({"special_tokens_map.json": {"bos_token": "<nope>"}}, "special_tokens_map.json: bos_token '<nope>' is not in"),
    ({"generation_config.json": {"eos_token_id": "1"}}, "generation_config.json: eos_token_id must be an int"),
    ({"config.json": {"text_config": {"eos_token_id": [1, 2.5]}}}, "config.json: eos_token_id must be an int"),
    ({"generation_config.json": {"eos_token_id": 99999}}, "eos id 99999 is outside the vocabulary"),
    ({"tokenizer_config.json": {"chat_template": 3}}, "chat_template must be a string or a non-empty list"),
    ({"tokenizer_config.json": {"chat_template": []}}, "chat_template must be a string or a non-empty list"),
    ({"tokenizer_config.json": {"chat_template": [{"name": "default"}]}},
     r"tokenizer_config.json: chat_template\[0\] must be \{'name': str, 'template': str\}"),
])
def test_bad_side_file_content(bpe_dir, tmp_path, files, match):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    for name, content in files.items():
        _write(d / name, content)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_dir(d)


def test_no_chat_template_error(bpe_dir, tmp_path):
    tok = Tokenizer.from_dir(_copy_tokenizer(bpe_dir, tmp_path))
    with pytest.raises(ValueError, match="this checkpoint has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ({"role": "user", "content": "hi"}, "non-empty list"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\]\.role must be a string"),
    ([{"role": "user"}], r"messages\[0\]\.content must be a string or a list of text parts"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be"),
    ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], r"messages\[0\]\.content\[0\] must be"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"messages\[0\]\.content\[0\] must be"),
])
def test_invalid_messages(bpe_dir, messages, match):
    tok = Tokenizer.from_dir(bpe_dir)
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_template_raise_exception_becomes_value_error(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    with pytest.raises(ValueError, match="chat template rejected the messages: Conversation roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "first"}])


def test_template_is_sandboxed(bpe_dir, tmp_path):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "chat_template.jinja", "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="rejected"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])
    _write(d / "chat_template.jinja", "{{ messages.append(1) }}")
    with pytest.raises(ValueError, match="rejected"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])


def test_vocab_lookup_errors(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    with pytest.raises(KeyError, match="<nope>"):
        tok.token_to_id("<nope>")
    with pytest.raises(KeyError, match="id 99999"):
        tok.id_to_token(99999)
    with pytest.raises(ValueError, match=r"ids \[99999\] are outside"):
        tok.decode([5, 99999])
    with pytest.raises(TypeError, match="encode expects a str"):
        tok.encode([1, 2])


@pytest.mark.parametrize("final", ["Sure, the answer is", "  padded reply  "])
def test_continue_final_message_matches_hf(bpe_dir, hf_tok, final):
    """A prefilled assistant reply: the text stops right after its content, as transformers cuts it (the
    Gemma template strips content, so the padded case continues after the stripped text)."""
    tok = Tokenizer.from_dir(bpe_dir)
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": final}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    expected = hf_tok.apply_chat_template(messages, chat_template=GEMMA_TEMPLATE, tokenize=False,
                                          add_generation_prompt=False, continue_final_message=True)
    assert text == expected and text.endswith(final.strip())
    with pytest.raises(ValueError, match="cannot be combined with add_generation_prompt"):
        tok.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)


@pytest.mark.parametrize("final", ["n", "turn", "of", "\n", "", "Sure ", " x\n\n"])
@pytest.mark.parametrize("template", [CHAT_TEMPLATE, GEMMA_TEMPLATE], ids=["plain", "trim"])
def test_continue_final_message_cuts_after_the_content(bpe_dir, hf_tok, template, final):
    """The cut is where the content ends, even when the content is also a piece of the turn's closing
    marker ('n', 'turn' in '<end_of_turn>'), only space or empty; a trimming template (Gemma's) loses the
    trailing space as in transformers."""
    tok = Tokenizer.from_dir(bpe_dir)
    tok.set_chat_template(template)
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": final}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text == hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              continue_final_message=True)
    assert "<end_of_turn>" not in text.split("<start_of_turn>model")[-1]


def test_continue_final_message_goes_on_with_any_role(bpe_dir, hf_tok):
    """As transformers 5: the last message may be the user's (the model completes the user's text)."""
    messages = [{"role": "user", "content": "Complete this: once upon"}]
    text = Tokenizer.from_dir(bpe_dir).apply_chat_template(messages, add_generation_prompt=False,
                                                           continue_final_message=True)
    assert text.endswith("once upon") and text == hf_tok.apply_chat_template(
        messages, chat_template=GEMMA_TEMPLATE, tokenize=False, continue_final_message=True)


def test_continue_final_message_needs_the_content_in_the_chat(bpe_dir, tmp_path):
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "chat_template.jinja", "{% for m in messages %}[{{ m['role'] }}]{% endfor %}")
    with pytest.raises(ValueError, match="^continue_final_message: the chat template left the last message's"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "Q"}], add_generation_prompt=False,
                                                  continue_final_message=True)


REASONING_TEMPLATE = ("{% for m in messages %}{{ m.role }}:[{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.reasoning }}]"
                      "{{ m.content }}\n{% endfor %}")


@pytest.mark.parametrize("fields", [{"reasoning": "r"}, {"thinking": "t"}, {"reasoning_content": "c"},
                                    {"reasoning_content": "c", "thinking": "t"}, {"reasoning": "r", "thinking": "t"},
                                    {"reasoning_content": None, "reasoning": "r"}])
def test_thought_reaches_the_template_under_each_name(bpe_dir, hf_tok, tmp_path, fields):
    """A thought sent as `reasoning` or `thinking` is `reasoning_content` (and `thinking`) in the template,
    as transformers 5.23 renders it."""
    d = _copy_tokenizer(bpe_dir, tmp_path)
    _write(d / "chat_template.jinja", REASONING_TEMPLATE)
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", **fields}]
    text = Tokenizer.from_dir(d).apply_chat_template(messages, add_generation_prompt=False)
    assert text == hf_tok.apply_chat_template(messages, chat_template=REASONING_TEMPLATE, tokenize=False)
    assert "assistant:[|" not in text


@pytest.mark.parametrize("template,parts", [
    ("{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endfor %}", True),
    ('{% for m in messages %}{% for p in m["content"] %}{{ p.text }}{% endfor %}{% endfor %}', True),
    ("{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}", True),
    ("{% for m in messages %}{{ m['content'] }}{% for c in m.get('tool_calls', []) %}{% endfor %}{% endfor %}", False),
    ("{% for m in messages %}{{ m.content_type }}{% for x in m.contents %}{% endfor %}{% endfor %}", False),
])
def test_templates_that_loop_over_content_get_parts(tmp_path, template, parts):
    """vLLM's content-format detection: a template looping over a message's content takes image parts as parts."""
    tok = build_char_tokenizer(list("ab"), ["<pad>", "<eos>", "<bos>"], tmp_path, chat_template=template)
    assert tok.renders_parts is parts


# -- the bytes of one token ----------------------------------------------------------------------------

def test_token_bytes_of_a_byte_level_bpe_join_to_the_text(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    text = "Symbols: é ✓ € 漢字"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold part of a character
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(tok.eos_id) == b"<eos>"  # an added token is its text


def test_token_bytes_of_byte_fallback_tokens_are_their_byte(tmp_path):
    tok = build_char_tokenizer("ab hi", ["<pad>", "<eos>", "<bos>"], tmp_path, byte_fallback=True)
    ids = tok.encode("hi €", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["h", "i", "\u2581", "<0xE2>", "<0x82>", "<0xAC>"]
    assert [tok.token_bytes(i) for i in ids] == [b"h", b"i", b" ", b"\xe2", b"\x82", b"\xac"]
    assert tok.decode(ids) == "hi €" and tok.decode(ids[3:4]) == "\ufffd"
    assert tok.token_bytes(tok.token_to_id("<0x41>")) == b"A" and tok.token_bytes(1) == b"<eos>"


def test_token_bytes_of_a_char_tokenizer_are_its_text(tmp_path):
    tok = build_char_tokenizer("ab é", ["<pad>", "<eos>"], tmp_path)
    assert [tok.token_bytes(i) for i in range(tok.vocab_size)] == [
        tok.decode([i], skip_special_tokens=False).encode() for i in range(tok.vocab_size)]
