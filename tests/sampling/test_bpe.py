"""Canvas control with a byte-level BPE vocabulary (multi-character tokens: digit runs, quoted words,
': "' style skeleton pieces), on a random model whose vocabulary is larger than the tokenizer's."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from canvaslm.checkpoint import load_model
from canvaslm.generate import RowRequest, generate_rows
from canvaslm.sampling.constraints import PinnedConstraint
from canvaslm.sampling.json_schema import JsonSchemaConstraint
from canvaslm.sampling.token_dfa import Vocab
from canvaslm.testing import make_tiny_checkpoint
from canvaslm.tokenizer import Tokenizer

CORPUS = [json.dumps({"name": w, "age": n, "ok": b, "tags": [w[:3], "abc"], "kind": "abd"})
          for w, n, b in [("alice", 123, True), ("bob", 4567, False), ("carol", 89, True), ("dave", 1000, False)]] * 20
CORPUS += ["hello world, the quick brown fox jumps over 12 lazy dogs 345 times"] * 20


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    tok = Tokenizer(backend, bos_id=2, eos_ids=[1], pad_id=0, name="bpe")
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("bpe"), vocab_size=tok.vocab_size + 3,
                             eos_token_id=[1], pad_token_id=0, bos_token_id=2)
    return tok, load_model(d, device="cpu", dtype=torch.float32)


def test_vocab_has_multi_character_tokens(bpe):
    tok, _ = bpe
    v = Vocab.of(tok)
    assert max(len(s) for s in v.strings) >= 4
    assert any(len(s) > 1 and s.isdigit() for s in v.strings)
    assert v.strings[1] == "" and v.pad_id is not None  # specials never enter value slots


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 2, "maxLength": 8}, "age": {"type": "integer", "minimum": 0},
    "ok": {"type": "boolean"}, "kind": {"enum": ["ab", "abc", "abd"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    "x": {"type": "number", "minimum": -5, "maximum": 50}}, "required": ["name", "age"]}


def _run(model, tok, constraint, seeds, max_new):
    params = model_params(model, max_new)
    rows = [RowRequest(tok.encode("{"), params, (1,), 0, constraint) for _ in seeds]
    return generate_rows(model, rows, [torch.Generator().manual_seed(s) for s in seeds])


def model_params(model, max_new):
    from canvaslm.config import DiffusionParams
    return DiffusionParams(max_new_tokens=max_new, max_denoising_steps=4, eos_token_ids=(1,), pad_token_id=0)


def test_json_schema_output_validates_with_bpe(bpe):
    tok, model = bpe
    c = JsonSchemaConstraint(SCHEMA, tok)
    outs = _run(model, tok, c, range(8), c.min_new_tokens(model.cfg.canvas_length))
    for o in outs:
        assert o.finish_reason == "stop"
        value = json.loads(tok.decode(o.token_ids))
        jsonschema.validate(value, SCHEMA)


def test_pins_with_bpe_text(bpe):
    tok, model = bpe
    ids = tok.encode(" the quick", add_special_tokens=False)
    assert len(ids) < len(" the quick")  # merged tokens
    outs = _run(model, tok, PinnedConstraint({10: ids}, ban_ids=(1,), ban_until=10), range(3), 24)
    for o in outs:
        assert o.token_ids[10:10 + len(ids)] == ids


def test_vocab_decoded_in_one_batch_equals_token_by_token(bpe, tiny_llm):
    """Vocab decodes the whole vocabulary with one decode_batch call; the table is what decoding each token
    after the anchor gives (a tokenizer without decode_batch takes that path)."""

    class OneByOne:  # the same tokenizer without decode_batch
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            if name == "decode_batch":
                raise AttributeError(name)
            return getattr(self.tok, name)

    for tok in (bpe[0], tiny_llm.tokenizer):
        fast, slow = Vocab(tok), Vocab(OneByOne(tok))
        assert (fast.strings, fast.special_ids, fast.ws_ids, fast.pad_id) == \
            (slow.strings, slow.special_ids, slow.ws_ids, slow.pad_id)
        assert any(len(s) > 1 for s in fast.strings) or tok is tiny_llm.tokenizer


def test_server_builds_the_vocab_table_at_start(tmp_path):
    """The constraint compilers' token table is built in the background when the server starts, so the first
    constrained request does not pay for it."""
    import time

    from canvaslm.server.launch import build_state

    state = build_state(make_tiny_checkpoint(tmp_path / "ckpt"), device="cpu")
    try:
        deadline = time.monotonic() + 30
        while state.tokenizer not in Vocab._cache and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.tokenizer in Vocab._cache
    finally:
        state.engine.shutdown()
