"""Infilling and region editing by pinning (canvaslm.infill) and the CLI flags for canvas control."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from canvaslm.cli import main
from canvaslm.generate import GenerationError
from canvaslm.infill import default_gaps, score_continuations
from canvaslm.llm import SamplingParams


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_infill_starts_with_prefix_and_ends_with_suffix(tiny_llm, seed):
    r = tiny_llm.infill("def add(a, b):", "return c", SamplingParams(seed=seed, max_denoising_steps=3),
                        gaps=[3, 8, 20])
    assert r.text.startswith("def add(a, b):") and r.text.endswith("return c")
    assert r.text == r.prefix + r.middle + r.suffix and len(r.middle_ids) == r.gap
    assert set(r.scores) == {3, 8, 20} and r.scores[r.gap] == max(r.scores.values())
    assert not set(r.middle_ids) & set(range(5))  # no eos, pad or other special token


def test_infill_default_gaps_and_empty_prefix(tiny_llm):
    assert default_gaps(28) == (2, 4, 8, 16, 28) and default_gaps(1) == (1,) and default_gaps(0) == (1,)
    assert default_gaps(256) == (2, 4, 8, 16, 32, 64, 128, 256)  # no cap: a long middle stays possible
    r = tiny_llm.infill("", "xyz", SamplingParams(seed=4, max_new_tokens=12, max_denoising_steps=2))
    assert r.text.endswith("xyz") and r.gap in (2, 4, 8)


def test_edit_keeps_both_sides_exactly(tiny_llm):
    text = "The quick brown fox jumps over the lazy dog"
    for seed in range(3):
        r = tiny_llm.edit(text, 4, 9, SamplingParams(seed=seed, max_denoising_steps=3))
        assert r.text.startswith("The ") and r.text.endswith(" brown fox jumps over the lazy dog")
        assert r.gap == 5 and len(r.middle) == 5
    r = tiny_llm.edit(text, 10, 19, SamplingParams(seed=0, max_denoising_steps=2), gaps=[2, 12])
    assert r.text.startswith(text[:10]) and r.text.endswith(text[19:]) and r.gap in (2, 12)


def test_edit_and_infill_errors(tiny_llm):
    with pytest.raises(GenerationError, match="span"):
        tiny_llm.edit("abc", 2, 9)
    with pytest.raises(GenerationError, match="gaps"):
        tiny_llm.infill("a", "b", gaps=[-1])
    with pytest.raises(GenerationError, match="cannot be combined"):
        tiny_llm.infill("a", "b", SamplingParams(json_schema={"type": "boolean"}))
    # every field that would shape the output is refused by name (they were dropped without a word)
    for field, value in [("regex", "[0-9]+"), ("choice", ("yes", "no")), ("json_object", True),
                         ("grammar", 'root ::= "a"'), ("stop_token_ids", (5,)), ("min_tokens", 2)]:
        with pytest.raises(GenerationError, match=f"SamplingParams.{field} cannot be combined with infilling"):
            tiny_llm.infill("a", "b", SamplingParams(**{field: value}))
        with pytest.raises(GenerationError, match=f"SamplingParams.{field} cannot be combined"):
            tiny_llm.edit("abc", 1, 2, SamplingParams(**{field: value}))


def test_score_continuations_matches_one_row_at_a_time(tiny_llm):
    prompt = tiny_llm.tokenizer.encode("hello")
    conts = [tiny_llm.tokenizer.encode(t, add_special_tokens=False) for t in ["ab", "a longer one", "z"]]
    batched = score_continuations(tiny_llm.model, prompt, conts)
    single = [score_continuations(tiny_llm.model, prompt, [c])[0] for c in conts]
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-4)
    assert all(s < 0 for s in batched)


def test_score_continuations_equals_scoring_each_whole_sequence(tiny_llm):
    """The prompt is encoded once and its KV shared by every continuation: the scores are those of
    encoding prompt + continuation from scratch (continuations past the sliding window included)."""
    from canvaslm.scoring import batch_token_logprobs

    tok = tiny_llm.tokenizer
    prompt = tok.encode("a prompt that is longer than the sixteen-token sliding window")
    conts = [tok.encode(t, add_special_tokens=False) for t in ["ab", "a continuation that also outruns the window", ""]]
    whole = batch_token_logprobs(tiny_llm.model, [prompt + c for c in conts], [len(prompt)] * 3, batch_size=3)
    want = [sum(lp) / len(lp) if lp else 0.0 for lp, _ in whole]
    assert score_continuations(tiny_llm.model, prompt, conts) == pytest.approx(want, abs=1e-5)


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_json_schema(tiny_llm, tmp_path, capsys):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"enum": ["ab", "abc"]}}}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    assert main(["generate", str(tiny_llm.model_dir), "--prompt", "hi", "--json-schema", str(f), "--seed", "3",
                 "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    jsonschema.validate(json.loads(out["text"]), schema)


def test_cli_pin_and_suffix(tiny_llm, capsys):
    d = str(tiny_llm.model_dir)
    assert main(["generate", d, "--prompt", "hi", "--pin", "2:abc", "--pin", "20:XY", "--seed", "1",
                 "--steps", "2", "--max-new-tokens", "24"]) == 0
    text = capsys.readouterr().out
    assert text[2:5] == "abc" and text[20:22] == "XY"
    assert main(["generate", d, "--prompt", "x = ", "--suffix", ";", "--gaps", "3,5", "--seed", "0",
                 "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].startswith("x = ") and out["text"].endswith(";") and out["gap"] in (3, 5)


def test_cli_errors(tiny_llm, tmp_path, capsys):
    d = str(tiny_llm.model_dir)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "string", "format": "color"}))
    assert main(["generate", d, "--prompt", "hi", "--json-schema", str(bad)]) == 2
    assert "format 'color' is not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", d, "--prompt", "hi", "--pin", "abc"])
    assert "OFFSET:TEXT" in capsys.readouterr().err
    # a repeated offset was a dict key written twice: the first pin was dropped without a word
    assert main(["generate", d, "--prompt", "hi", "--pin", "0:ab", "--pin", "0:cd"]) == 2
    assert "--pin 0:ab and --pin 0:cd pin the same offset" in capsys.readouterr().err


def test_infill_takes_any_valid_seed(tiny_llm):
    """Candidate seeds wrap as the server's do ((seed + i) % 2**63): seed 2**64 - 1 (valid) overflowed
    torch's manual_seed; its candidates are 2**63 - 1 and 0, 1, ... as for seed 2**63 - 1."""
    def run(seed):
        return tiny_llm.infill("ab", "cd", SamplingParams(seed=seed, max_new_tokens=8, max_denoising_steps=2),
                               gaps=[2, 4]).middle_ids

    assert run(2**64 - 1) == run(2**63 - 1)


# --- suffix on /v1/completions (insert mode over HTTP) ----------------------------------------------------

def test_server_suffix_writes_the_best_scored_middle(client, tiny_llm):
    """Each choice's text is the middle of its best candidate: a gap's worth of plain tokens whose score
    (mean log-prob of middle + suffix under the encoder) is the one reported, and the highest."""
    c, model = client
    tok = tiny_llm.tokenizer
    prefix, suffix = "def add(a, b):", "return c"
    suffix_ids = tok.encode(suffix, add_special_tokens=False)
    for seed in (0, 5):
        r = c.completions.create(model=model, prompt=prefix, suffix=suffix, max_tokens=12, seed=seed, n=2)
        for ch in r.choices:
            info = ch.model_extra["infill"]
            assert ch.finish_reason == ("length" if info["gap"] == 12 else "stop")  # the middle max_tokens allows
            assert {int(g) for g in info["scores"]} == set(default_gaps(12))
            assert info["scores"][str(info["gap"])] == max(info["scores"].values())
            middle = tok.encode(ch.text, add_special_tokens=False)
            assert len(middle) == info["gap"] and not set(middle) & set(range(5))  # no special token
            direct = score_continuations(tiny_llm.model, tok.encode(prefix), [middle + suffix_ids])[0]
            assert direct == pytest.approx(info["scores"][str(info["gap"])], abs=1e-4)
        assert r.usage.completion_tokens == sum(ch.model_extra["infill"]["gap"] for ch in r.choices)
    again = c.completions.create(model=model, prompt=prefix, suffix=suffix, max_tokens=12, seed=5, n=2)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]  # the seed decides


def test_server_suffix_stream_equals_whole(client):
    c, model = client
    kwargs = dict(model=model, prompt=["x = ", "y"], suffix=" + 1", max_tokens=8, seed=2)
    whole = c.completions.create(**kwargs)
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = {}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {ch.index: ch.text for ch in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("extra,param,needle", [
    ({"stop": ["\n"]}, "stop", "cut the middle"),
    ({"extra_body": {"guided_choice": ["a"]}}, "suffix", "send one"),
    ({"prompt": "a" * 4000, "suffix": "y" * 96}, "suffix", "leave no room"),  # 96 positions left
    ({"n": 16, "max_tokens": 64}, "n", "over the limit of 64 candidates"),
    ({"extra_body": {"ignore_eos": True}}, "ignore_eos", "pinned EOS"),
])
def test_server_suffix_refusals_name_the_field(client, extra, param, needle):
    import openai

    c, model = client
    kwargs = {"model": model, "prompt": "x", "suffix": "y", **extra}
    with pytest.raises(openai.BadRequestError, match=needle) as e:
        c.completions.create(**kwargs)
    assert e.value.body["param"] == param, e.value.body


def test_engine_call_runs_on_the_engine_thread(tiny_llm):
    import threading

    from canvaslm.engine.engine import Engine, EngineConfig

    engine = Engine(tiny_llm.model, EngineConfig(max_model_len=64)).start()
    try:
        assert engine.call(lambda m: (m.cfg.vocab_size, threading.current_thread().name)).result(10) == \
            (tiny_llm.model.cfg.vocab_size, "canvaslm-engine")
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda m: 1 / 0).result(10)
        assert engine.alive  # a failing call does not stop the engine
    finally:
        engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.call(lambda m: 0)


def test_scores_read_from_a_held_slot_equal_a_fresh_encode(tiny_llm):
    """score_continuations(held=(cache, slot, head)) reads a prompt some other pass encoded (a serving
    engine's slot, in chunks, past the sliding window) instead of encoding it: the same scores, nothing
    written."""
    from canvaslm.kv_cache import KVCache

    model, tok = tiny_llm.model, tiny_llm.tokenizer
    prompt = tok.encode("a prompt well past the sliding window of sixteen positions, in chunks")
    conts = [tok.encode(t, add_special_tokens=False) for t in ["ab", "a longer continuation", "z", ""]]
    fresh = score_continuations(model, prompt, conts)
    cache = KVCache(model.cfg, 3, 160, dtype=model.embed_weight.dtype)
    other = tok.encode("something else entirely in slot zero")
    for slot, ids in ((2, prompt), (0, other)):
        for start in range(0, len(ids), 16):  # as the engine prefills: chunk by chunk
            chunk = ids[start:start + 16]
            h = model.encode(torch.tensor([chunk]), torch.arange(start, start + len(chunk))[None],
                             torch.tensor([slot]), cache, fresh=start == 0)
        if slot == 2:
            head = h[0, -1]
    before = [t.clone() for t in cache.k]
    held = score_continuations(model, prompt, conts, held=(cache, 2, head))
    assert held[3] == 0.0 and torch.allclose(torch.tensor(held), torch.tensor(fresh), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k))  # read only


def test_a_fresh_score_encodes_the_prompt_as_an_fp8_engine_does(tiny_llm):
    """With an fp8 KV cache a held slot's prompt was rounded as it was written, chunk by chunk: a fresh
    encode told the engine's KV dtype and prefill chunk stores and reads it the same way, so an infill's or
    best_of's pick does not depend on whether a freed slot happened to hold the prompt (0.03 apart before)."""
    from canvaslm.kv_cache import KVCache

    model, tok = tiny_llm.model, tiny_llm.tokenizer
    fp8 = torch.float8_e4m3fn
    prompt = tok.encode("a prompt well past the sliding window of sixteen positions, in chunks")
    conts = [tok.encode(t, add_special_tokens=False) for t in ["ab", "a longer continuation", "z"]]
    cache = KVCache(model.cfg, 2, 160, dtype=fp8, compute_dtype=model.embed_weight.dtype)
    for start in range(0, len(prompt), 16):  # as the engine prefills: chunk by chunk
        h = model.encode(torch.tensor([prompt[start:start + 16]]),
                         torch.arange(start, min(len(prompt), start + 16))[None], torch.tensor([1]), cache,
                         fresh=start == 0)
    held = score_continuations(model, prompt, conts, held=(cache, 1, h[0, -1]))
    fresh = score_continuations(model, prompt, conts, kv_dtype=fp8, chunk=16)
    assert torch.allclose(torch.tensor(held), torch.tensor(fresh), atol=1e-5)
    plain = score_continuations(model, prompt, conts)  # the model dtype, one call: what the fix replaced
    assert not torch.allclose(torch.tensor(held), torch.tensor(plain), atol=1e-4)
