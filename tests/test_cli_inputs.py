"""Inputs the command line and the offline API cannot honour: each is an error naming the flag, field or limit
(not a traceback, not an option silently ignored, not an error per chat turn with exit code 0)."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

from canvaslm.cli import main
from canvaslm.generate import GenerationError
from canvaslm.llm import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli_inputs"))


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, device="cpu", dtype="float32")


@pytest.mark.parametrize("flags, words", [
    (["--suffix", "cd", "--chat"], "--suffix (infilling) cannot be combined with --chat"),
    (["--suffix", "cd", "--image", "x.png"], "--suffix (infilling) cannot be combined with --image"),
    (["--gaps", "2,4"], "--gaps needs --suffix"),
    (["--think"], "--think needs --chat"),
])
def test_generate_refuses_flags_it_would_ignore(tiny, flags, words):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tiny), "--device", "cpu", "--prompt", "ab", *flags])
    assert words in str(e.value.code)


def test_generate_names_a_schema_or_grammar_file_it_cannot_read(tiny, tmp_path, capsys):
    latin1 = tmp_path / "schema.json"
    latin1.write_bytes(b'{"description": "caf\xe9"}')
    for flag, path, words in [("--json-schema", tmp_path, "cannot read it"), ("--json-schema", latin1, "not UTF-8"),
                              ("--grammar", latin1, "not UTF-8")]:
        assert main(["generate", str(tiny), "--device", "cpu", "--prompt", "ab", flag, str(path)]) == 2
        assert f"{flag} {path}: {words}" in capsys.readouterr().err


def test_chat_refuses_bad_sampling_flags_once(tiny, monkeypatch, capsys):
    from canvaslm.testing import CHAT_TEMPLATE

    d = tiny.parent / "chat_copy"
    shutil.copytree(tiny, d, dirs_exist_ok=True)
    LLM(d, device="cpu").tokenizer.set_chat_template(CHAT_TEMPLATE, "test")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nyo\n"))
    assert main(["chat", str(d), "--device", "cpu", "--top-p", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("top_p") == 1


@pytest.mark.parametrize("flags, words", [
    (["--overhead", "-100"], "--overhead) must be a finite number of GiB >= 0"),
    (["--gpu-memory", "inf"], "--gpu-memory) must be a finite number of GiB > 0"),
])
def test_memory_refuses_impossible_numbers(tiny, flags, words, capsys):
    args = ["memory", str(tiny), "--gpu-memory", "24", *flags]
    assert main(args) == 2
    assert words in capsys.readouterr().err


def test_infill_keeps_to_its_token_budget(llm):
    with pytest.raises(GenerationError, match="max_new_tokens=4 leaves no room for a middle"):
        llm.infill("ab", "hello world", SamplingParams(seed=0, max_new_tokens=4))
    with pytest.raises(GenerationError, match="need 12 tokens, over max_new_tokens=8"):
        llm.infill("ab", "x", SamplingParams(seed=0, max_new_tokens=8), gaps=[10])
    fill = llm.infill("ab", "x", SamplingParams(seed=0, max_new_tokens=8))
    assert len(fill.middle_ids) + 2 <= 8 and fill.text.startswith("ab") and fill.text.endswith("x")


def test_scoring_and_embedding_check_their_token_ids(llm):
    V = llm.cfg.vocab_size
    for call in (lambda: llm.loglikelihood([([2, 5], [V])]), lambda: llm.loglikelihood([([2, -1], [5])]),
                 lambda: llm.loglikelihood_rolling([[2, V]])):
        with pytest.raises(GenerationError, match=r"request 0 token ids \[-?\d+\] are outside the vocabulary"):
            call()
    with pytest.raises(GenerationError, match=r"embed: texts\[0\] token ids"):
        llm.embed([[2, V]])
    with pytest.raises(GenerationError, match="embed: batch_size must be an integer >= 1"):
        llm.embed(["abc"], batch_size=0)
    assert llm.embed([]).shape == (0, llm.cfg.hidden_size)
    assert torch.isfinite(llm.embed(["abc"])).all()


def test_a_device_this_machine_lacks_is_named(tiny, capsys):
    from canvaslm.checkpoint import CheckpointError, load_model

    with pytest.raises(CheckpointError, match="'bogus' is not a torch device"):
        load_model(tiny, device="bogus")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", str(tiny), "--device", "cuda", "--prompt", "ab"]) == 2
    assert "device 'cuda': this machine has no CUDA device" in capsys.readouterr().err


def test_a_revision_without_a_model_is_refused():
    with pytest.raises(GenerationError, match="revision 'main' needs a model"):
        LLM(revision="main", device="cpu")


def test_generate_reads_a_big_image_file_and_names_a_bad_one(tmp_path, capsys):
    """--image names the user's own file: no 20 MiB limit (that is for API clients' images; a 9 Mpx PNG is
    ~27 MB), only the pixel limit; and an unreadable one is named by its path, not 'the image bytes'."""
    from conftest import build_vision_chat_checkpoint, png

    model = tmp_path / "vision"
    model.mkdir()
    build_vision_chat_checkpoint(model)
    big = tmp_path / "big.png"
    big.write_bytes(png(40, 30, 0) + bytes(21 << 20))  # 21 MiB past IEND, which decoders skip
    flags = ["--prompt", "hi", "--max-new-tokens", "4", "--steps", "2", "--device", "cpu", "--json"]
    assert main(["generate", str(model), *flags]) == 0
    text_only = json.loads(capsys.readouterr().out)["prompt_tokens"]
    assert main(["generate", str(model), "--image", str(big), *flags]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > text_only + 3  # boi, soft tokens, eoi
    llm = LLM(model, device="cpu")  # a path given to the offline API: the same
    llm.generate({"prompt": f"hi {llm.image_placeholder}", "multi_modal_data": {"image": str(big)}},
                 SamplingParams(max_new_tokens=4, max_denoising_steps=2))
    (tmp_path / "not.png").write_bytes(b"hello")
    assert main(["generate", str(model), "--image", str(tmp_path / "not.png"), *flags]) != 0
    assert f"image 0: {tmp_path / 'not.png'} is not an image" in capsys.readouterr().err
