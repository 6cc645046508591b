"""Training data: malformed rows are errors naming their row; JSON array files; held-out rows."""

from __future__ import annotations

import json

import pytest

from canvaslm.train.data import DataError, load_examples, load_sourced, split_holdout


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_text_fields_must_be_strings_naming_the_row(tmp_path, tiny_checkpoint):
    from canvaslm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_checkpoint)
    good = {"prompt": "ab", "response": "cd"}
    for row, msg in (({"prompt": "hi", "response": None}, "'response' must be a string, got null"),
                     ({"prompt": 5, "response": "x"}, "'prompt' must be a string, got 5"),
                     ({"prompt": "hi", "completion": None}, "'completion' must be a string, got null"),
                     ({"prompt": ["a"], "completion": "x"}, "'prompt' must be a string, got ['a']")):
        path = _rows(tmp_path / "t.jsonl", [good, good, row])
        with pytest.raises(DataError) as e:
            load_examples(path, tok)
        assert str(e.value).startswith(f"{path}:3: ") and msg in str(e.value), str(e.value)


def test_token_ids_must_be_lists_of_integers(tmp_path, monkeypatch):
    for ids, msg in (([2, 5.7], "'prompt_ids' must be a list of integer token ids, got 5.7 in it"),
                     ("256", "'prompt_ids' must be a list of integer token ids, got \"256\""),
                     ([2, True], "got true in it"),
                     (7, "got 7"),
                     (None, "got null")):
        path = _rows(tmp_path / "ids.jsonl", [{"prompt_ids": [2], "response_ids": [6]},
                                               {"prompt_ids": ids, "response_ids": [6]}])
        with pytest.raises(DataError) as e:
            load_examples(path)
        assert str(e.value).startswith(f"{path}:2: ") and msg in str(e.value), str(e.value)
    path = _rows(tmp_path / "r.jsonl", [{"prompt_ids": [2], "response_ids": [6.0]}])
    with pytest.raises(DataError, match=r"r.jsonl:1: 'response_ids' must be a list of integer token ids, got 6.0"):
        load_examples(path)
    (tmp_path / "float_pairs.py").write_text("def make():\n    return [([2, 5], [6]), ([2, 5.0], [6])]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError, match=r"float_pairs:make\[1\]: 'prompt ids' must be a list of integer token ids, "
                                        r"got 5.0 in it"):
        load_examples("float_pairs:make")  # a callable's pairs too
    assert load_examples(_rows(tmp_path / "ok.jsonl", [{"prompt_ids": [2, 5], "response_ids": []}])) == [([2, 5], [])]


def test_a_json_array_file_is_read_as_rows(tmp_path):
    rows = [{"prompt_ids": [2, 5], "response_ids": [6]}, {"prompt_ids": [2, 7], "response_ids": [8, 9]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2))
    assert load_examples(str(path)) == [([2, 5], [6]), ([2, 7], [8, 9])]
    assert [w for w, _ in load_sourced(str(path))] == [f"{path}: row 0", f"{path}: row 1"]
    path.write_text(json.dumps(rows + [{"prompt_ids": [2], "response_ids": [40]}]))
    with pytest.raises(DataError, match=r"d.json: row 2: token ids \[40\] outside the vocabulary \[0, 32\)"):
        load_examples(str(path), vocab_size=32)
    path.write_text("[" + json.dumps(rows[0]) + ",\n")
    with pytest.raises(DataError, match=r"d.json: not valid JSON"):
        load_examples(str(path))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # a .json file of JSON lines still reads
    assert load_examples(str(path)) == [([2, 5], [6]), ([2, 7], [8, 9])]


def test_out_of_vocabulary_ids_name_the_line(tmp_path):
    path = _rows(tmp_path / "v.jsonl", [{"prompt_ids": [2], "response_ids": [6]}] * 4 +
                 [{"prompt_ids": [2, 5], "response_ids": [7, 99]}])
    with pytest.raises(DataError, match=r"v.jsonl:5: token ids \[99\] outside the vocabulary \[0, 32\)"):
        load_examples(path, vocab_size=32)


def test_eval_size_holds_out_whole_conversations(tmp_path, tiny_checkpoint):
    """A conversation's assistant turns are all trained on or all held out (before: turns were held out one
    by one, so the eval set held turns of conversations the run trained on)."""
    from canvaslm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_checkpoint)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                          {"role": "user", "content": "more"}, {"role": "assistant", "content": f"b{i}"}]}
            for i in range(20)]
    examples = load_sourced(_rows(tmp_path / "chat.jsonl", rows), tok)
    assert len(examples) == 40
    train, held = split_holdout(examples, 8, seed=0)
    assert len(held) == 16 and len(train) == 24  # 8 conversations of 2 turns
    assert not {w for w, _ in train} & {w for w, _ in held}
    assert sorted(train + held) == sorted(examples)
    with pytest.raises(DataError, match=r"eval_size=20 leaves no training examples \(only 20 rows"):
        split_holdout(examples, 20, seed=0)


def test_bytes_that_are_not_utf8_are_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt_ids": [2], "response_ids": [6]}\n\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError) as e:
        load_examples(str(path))
    assert str(e.value) == f"{path}:3: not valid UTF-8 (byte 0xe9 at byte 16 of the line); save the file as UTF-8"
    array = tmp_path / "latin1.json"
    array.write_bytes(b'[{"prompt_ids": [2],\n "response_ids": [6], "x": "\xe9"}]')
    with pytest.raises(DataError, match=r"latin1.json:2: not valid UTF-8 \(byte 0xe9"):
        load_examples(str(array))


def test_gzipped_data_files_are_read(tmp_path):
    import gzip

    rows = [{"prompt_ids": [2, 5], "response_ids": [6]}, {"prompt_ids": [2, 7], "response_ids": [8]}]
    lines = tmp_path / "d.jsonl.gz"
    lines.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert load_sourced(str(lines)) == [(f"{lines}:1", ([2, 5], [6])), (f"{lines}:2", ([2, 7], [8]))]
    array = tmp_path / "d.json.gz"
    array.write_bytes(gzip.compress(json.dumps(rows).encode()))
    assert [w for w, _ in load_sourced(str(array))] == [f"{array}: row 0", f"{array}: row 1"]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(DataError, match=r"bad.jsonl.gz: cannot be read \(Not a gzipped file"):
        load_examples(str(tmp_path / "bad.jsonl.gz"))
    with pytest.raises(DataError, match=r"data file .*nope.jsonl.gz does not exist"):
        load_examples(str(tmp_path / "nope.jsonl.gz"))


def test_data_review_s26_repeated_keys_bom_and_unwritable_characters(tmp_path):
    """A key given twice in one JSONL object is refused by line (json kept the last: an empty response trained);
    a UTF-8 BOM is read as `datasets` reads it; a character the vocabulary cannot write names the file and line."""
    from canvaslm.testing import make_tiny_checkpoint
    from canvaslm.tokenizer import Tokenizer
    from canvaslm.train.data import DataError, load_examples

    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"prompt_ids": [2, 3], "response_ids": [5, 6, 7], "response_ids": []}\n')
    with pytest.raises(DataError, match=r"twice.jsonl:1: key 'response_ids' appears twice in one object"):
        load_examples(str(twice))
    for name in ("bom.jsonl", "bom.json"):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + b'{"prompt_ids": [2, 3], "response_ids": [5]}\n')
        assert load_examples(str(tmp_path / name)) == [([2, 3], [5])]
    tok = Tokenizer.from_dir(make_tiny_checkpoint(tmp_path / "m"))
    try:
        tok.encode("caf\u00e9")
    except ValueError:
        pass
    else:
        pytest.skip("this tokenizer writes every character")
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "caf\\u00e9"}\n')
    with pytest.raises(DataError, match=r"odd.jsonl:2: .*cannot encode character"):
        load_examples(str(odd), tok)
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "caf\\u00e9"}]}\n')
    with pytest.raises(DataError, match=r"chat.jsonl:1: messages\[1\]: .*cannot encode character"):
        load_examples(str(chat), tok)


def test_a_thinking_row_under_a_template_whose_prompt_opens_the_thought(tmp_path):
    """Gemma 4's shape: with thinking on, the generation prompt ends in `<|channel>thought\\n` itself. The row trains
    (was refused by the prefix check): the prompt keeps the opening, as inference sees it, and the response is the
    thought, the close and the answer, with no second opening."""
    import json

    from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN
    from canvaslm.testing import make_tiny_checkpoint
    from canvaslm.tokenizer import Tokenizer
    from canvaslm.train.data import load_examples

    d = make_tiny_checkpoint(tmp_path / "m", extra_specials=(CHANNEL_OPEN, CHANNEL_CLOSE))
    (d / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "<start_of_turn>{{ role }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% if enable_thinking %}<|channel>thought\n{% endif %}"
        "{% endif %}")
    tok = Tokenizer.from_dir(d)
    rows = tmp_path / "chat.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {
        "role": "assistant", "content": "4", "reasoning_content": "two and two"}]}) + "\n")
    [(prompt, response)] = load_examples(str(rows), tok)
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<start_of_turn>model\n<|channel>thought\n")
    assert tok.decode(response, skip_special_tokens=False) == "two and two<channel|>4<end_of_turn>"
