"""Tokenizer behaviour a review found apart from transformers (canvaslm/tokenizer.py), each checked side by side
with AutoTokenizer: the chat template's token variables are transformers' special_tokens_map (every *_token
string of tokenizer_config.json / special_tokens_map.json, not tokens derived from the resolved ids), the
`special` flags of added_tokens_decoder and the additional special tokens decide what decode(skip_special_tokens)
drops, and a text that does not encode names the character that fails."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, processors, trainers

from canvaslm.testing import make_tiny_checkpoint
from canvaslm.tokenizer import Tokenizer, build_char_tokenizer

transformers = pytest.importorskip("transformers")

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<mask>", "<sep>"]
NAMED = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
         "mask_token": "<mask>"}
# renders every variable transformers may pass; one it does not pass renders empty in both
VARIABLES_TEMPLATE = ("{% for m in messages %}{{ m.content }}{% endfor %}" + "".join(
    f"|{name}={{{{ {name} }}}}" for name in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                            "cls_token", "mask_token", "image_token", "boi_token",
                                            "additional_special_tokens", "extra_special_tokens"]))
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A Gemma-like SentencePiece BPE (spaces as ▁, byte fallback, a bos-adding post-processor) whose
    specials are added tokens, with the chat template in tokenizer_config.json."""
    d = tmp_path_factory.mktemp("spm")
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=list("\u2581abcdefghijklmnopqrstuvwxyz"))
    backend.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Hello there, user!"] * 10, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
    backend.save(str(d / "tokenizer.json"))
    _write(d / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **NAMED,
                                         "chat_template": VARIABLES_TEMPLATE})
    return d


def _write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")


def _variant(spm_dir, tmp_path, *edits, files=None):
    """A copy of spm_dir after each edit(config, tok_json) of its tokenizer_config.json and tokenizer.json, with
    side files added."""
    config = json.loads((spm_dir / "tokenizer_config.json").read_text())
    tok_json = json.loads((spm_dir / "tokenizer.json").read_text())
    for edit in edits:
        edit(config, tok_json)
    _write(tmp_path / "tokenizer_config.json", config)
    _write(tmp_path / "tokenizer.json", tok_json)
    for name, obj in (files or {}).items():
        _write(tmp_path / name, obj)
    return tmp_path


def _config(**entries):
    return lambda config, tok_json: config.update(entries)


def _without(*keys):
    def edit(config, tok_json):
        for key in keys:
            del config[key]
    return edit


def _hf_chat(d, messages=MESSAGES):
    return transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)


# -- the chat template's token variables ------------------------------------------------------------------------


@pytest.mark.parametrize("edits, files", [
    ([], None),  # unk_token and mask_token reach the template (they rendered empty here)
    ([_without("bos_token")], {"config.json": {"bos_token_id": 2}}),  # an id alone names no template token
    ([_without("eos_token")], {"generation_config.json": {"eos_token_id": [1, 5]}}),
    ([_without(*NAMED)], {"special_tokens_map.json": {"bos_token": {"content": "<bos>"}, "sep_token": "<sep>"}}),
    ([], {"special_tokens_map.json": {"bos_token": "<eos>", "cls_token": "<sep>"}}),  # it overrides the config
    ([_config(added_tokens_decoder={})], {"special_tokens_map.json": {"bos_token": "<eos>"}}),  # then it is unread
    ([_config(image_token="<mask>", boi_token={"content": "<sep>", "__type": "AddedToken"},
              additional_special_tokens=["<start_of_turn>"])], None),  # model-specific tokens
    ([_config(extra_special_tokens={"image_token": "<mask>"})], None),
    ([_config(sep_token="<not-in-vocab>")], None),  # a variable even so
], ids=["named", "bos-id-only", "eos-id-only", "special-map-only", "special-map-wins", "decoder-ignores-map",
        "model-specific", "extra-dict", "not-in-vocab"])
def test_template_variables_are_transformers_special_tokens_map(spm_dir, tmp_path, edits, files):
    d = _variant(spm_dir, tmp_path, *edits, files=files)
    assert Tokenizer.from_dir(d).apply_chat_template(MESSAGES) == _hf_chat(d)


def test_bos_id_from_config_json_still_resolves_without_a_template_bos(spm_dir, tmp_path):
    d = _variant(spm_dir, tmp_path, _without("bos_token"), files={"config.json": {"bos_token_id": 2}})
    tok = Tokenizer.from_dir(d)
    assert tok.bos_id == 2 and "|bos_token=|" in tok.apply_chat_template(MESSAGES)


def test_project_checkpoints_render_as_before_and_as_transformers(tmp_path):
    """make_tiny_checkpoint's and build_char_tokenizer's configs name bos/eos/pad: the rendering keeps them."""
    d = make_tiny_checkpoint(tmp_path / "tiny")
    tok = Tokenizer.from_dir(d)
    assert tok.special_tokens == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    rendered = tok.apply_chat_template(MESSAGES)
    assert rendered == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n" == _hf_chat(d)
    char = build_char_tokenizer("hi", ["<pad>", "<eos>", "<bos>", "<unk>"], tmp_path / "char",
                                chat_template=VARIABLES_TEMPLATE)
    assert char.apply_chat_template(MESSAGES) == _hf_chat(tmp_path / "char")


def test_a_tokenizer_built_in_memory_names_its_template_tokens_by_id(spm_dir):
    backend = Backend.from_file(str(spm_dir / "tokenizer.json"))
    tok = Tokenizer(backend, bos_id=2, eos_ids=[5, 1], pad_id=0, chat_template=VARIABLES_TEMPLATE)
    assert tok.special_tokens == {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>"}


# -- which tokens decode(skip_special_tokens) drops --------------------------------------------------------------


def _set_special(contents, special):
    """tokenizer.json's added tokens `contents` flagged `special`."""
    def edit(config, tok_json):
        for t in tok_json["added_tokens"]:
            if t["content"] in contents:
                t["special"] = special
    return edit


def _decoder_flags(contents, special):
    """tokenizer_config.json's added_tokens_decoder as transformers saves it (tokenizer.json's added tokens),
    with `contents` flagged `special`."""
    def edit(config, tok_json):
        config["added_tokens_decoder"] = {
            str(t["id"]): {**{k: v for k, v in t.items() if k != "id"},
                           "special": special if t["content"] in contents else t["special"]}
            for t in tok_json["added_tokens"]}
    return edit


TURNS = {"<start_of_turn>", "<end_of_turn>"}


@pytest.mark.parametrize("edits", [
    [_set_special(TURNS, False), _decoder_flags(TURNS, True)],  # the config makes them special
    [_decoder_flags(TURNS, False)],  # the config unflags them
    [_set_special(TURNS, False), _config(additional_special_tokens=sorted(TURNS))],
    [_set_special({"<mask>", "<sep>"}, False)],  # mask_token is special; <sep> is named by nothing
    [_set_special({"<unk>"}, False), _without("unk_token")],
], ids=["decoder-flags-special", "decoder-unflags", "additional-special", "named-special", "unnamed-unk"])
def test_skip_special_tokens_drops_what_transformers_drops(spm_dir, tmp_path, edits):
    d = _variant(spm_dir, tmp_path, *edits)
    ours, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    text = "<start_of_turn>user\nHi <mask> there<sep><unk><end_of_turn>"
    ids = hf.encode(text)
    assert ours.encode(text) == ids
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert ours.vocab_size == len(hf)


def test_added_tokens_decoder_must_hold_tokens(spm_dir, tmp_path):
    d = _variant(spm_dir, tmp_path, _config(added_tokens_decoder={"4": "<start_of_turn>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: added_tokens_decoder\['4'\] must be an object "
                                         r"with a string 'content', got '<start_of_turn>'"):
        Tokenizer.from_dir(d)


# -- an unencodable character is named ---------------------------------------------------------------------------


def test_encode_error_names_the_character_not_the_template_header(tmp_path):
    tok = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz5 \n", ["<pad>", "<eos>", "<bos>"], tmp_path,
                               chat_template="{{ bos_token }}{% for m in messages %}<bos>user\n{{ m.content }}"
                                             "<eos>{% endfor %}")
    messages = [{"role": "user", "content": "a fairly long first message to push the text"},
                {"role": "user", "content": "the price is 5\u20ac"}]
    expected = ("cannot encode character '\u20ac' (U+20AC) at index 88 of the text, "
                "in 't<eos><bos>user\\nthe price is 5\u20ac<eos>'")
    with pytest.raises(ValueError, match=re.escape(expected)):
        tok.encode_chat(messages)
