"""`canvaslm chat`: each line is a turn over the whole conversation (LLM.chat with seed + turn), /reset and
/system start over, and a failing turn is reported and left out of the history."""

from __future__ import annotations

import io

import pytest

from canvaslm.cli import main
from canvaslm.llm import LLM, SamplingParams


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return LLM(make_tiny_checkpoint(tmp_path_factory.mktemp("chat")), device="cpu", dtype="float32")


def _reply(llm, messages, seed):
    return llm.chat(messages, SamplingParams(max_new_tokens=16, seed=seed)).text


def test_turns_carry_the_conversation(chat_llm, monkeypatch, capsys):
    too_long = "x" * 5000  # over the tiny model's 4096 positions: an error, not the end of the session
    monkeypatch.setattr("sys.stdin", io.StringIO(f"hi\n{too_long}\nhow are you\n/bogus\n/system be terse\nhi\n"
                                                 "/reset\nhi\n/exit\nnever read\n"))
    assert main(["chat", str(chat_llm.model_dir), "--seed", "3", "--max-new-tokens", "16"]) == 0
    out, err = capsys.readouterr()
    r1 = _reply(chat_llm, [{"role": "user", "content": "hi"}], 3)
    # turn 1 (the too-long line) failed and left no trace in the history; its seed is spent
    r2 = _reply(chat_llm, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": r1},
                           {"role": "user", "content": "how are you"}], 5)
    r3 = _reply(chat_llm, [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}], 6)
    r4 = _reply(chat_llm, [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}], 7)
    assert out == f"{r1}\n{r2}\n{r3}\n{r4}\n"
    assert "error:" in err and "unknown command '/bogus'" in err


def test_a_checkpoint_without_chat_template_is_refused(capsys):
    assert main(["chat"]) == 2  # the bundled Sudoku model has no chat template
    assert "no chat template" in capsys.readouterr().err
