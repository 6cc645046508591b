"""`canvaslm chat`: each line is a turn over the whole conversation (seed + turn), /reset and /system start
over, a failing or interrupted (Ctrl-C) turn is reported and left out of the history, Ctrl-C at the prompt
quits with 130, and a turn reuses the previous prompt's KV without changing a token (each reply equals
LLM.generate_continuous on the whole conversation)."""

from __future__ import annotations

import io
import os
import re
import signal

import pytest

from canvaslm.cli import main
from canvaslm.llm import LLM, SamplingParams


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return LLM(make_tiny_checkpoint(tmp_path_factory.mktemp("chat")), device="cpu", dtype="float32")


def _reply(llm, messages, seed, chunk=128, max_new_tokens=16):
    """The reply an engine of the chat's shape (one slot, the model's whole context) gives, fresh."""
    ids = llm.tokenizer.encode_chat(messages)
    return llm.generate_continuous([ids], SamplingParams(max_new_tokens=max_new_tokens, seed=seed), max_batch=1,
                                   max_model_len=llm.cfg.max_position_embeddings, prefill_chunk=chunk,
                                   use_tqdm=False)[0].text


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


def test_a_turn_reuses_the_conversation_so_far(chat_llm, monkeypatch, capsys):
    """With 16-token chunks, turn 2 takes the first turn's prompt from the cache (--stats says how much)
    and still replies exactly as a fresh engine would."""
    lines = ["tell me about the quick brown fox and the lazy dog, please", "and then what happened next?",
             "one more thing about the fox"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(chat_llm.model_dir), "--seed", "1", "--max-new-tokens", "32", "--prefill-chunk", "16",
                 "--stats"]) == 0
    out, err = capsys.readouterr()
    stats = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens, (\d+) from the cache", err)]
    assert len(stats) == 3 and stats[0][1] == 0
    # each turn takes the previous turn's prompt from the cache, in whole chunks
    assert [cached for _, cached in stats[1:]] == [prompt // 16 * 16 for prompt, _ in stats[:-1]]
    assert stats[1][1] > 0
    messages, want = [], []
    for i, line in enumerate(lines):
        messages.append({"role": "user", "content": line})
        want.append(_reply(chat_llm, messages, 1 + i, chunk=16, max_new_tokens=32))
        messages.append({"role": "assistant", "content": want[-1]})
    assert out == "".join(f"{r}\n" for r in want)


def test_a_checkpoint_without_chat_template_is_refused(capsys):
    from canvaslm.llm import BUNDLED_MODEL

    assert main(["chat", str(BUNDLED_MODEL)]) == 2  # the bundled Sudoku model has no chat template
    assert "no chat template" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # so chat takes no default model (its help said the bundled one)
        main(["chat"])
    assert e.value.code == 2 and "model_dir" in capsys.readouterr().err


def test_temperature_zero_is_near_greedy(chat_llm, monkeypatch, capsys):
    """--temperature 0 means near-greedy, as for generate and on the server (it was refused)."""
    from canvaslm.sampling.schedules import GREEDY_TEMPERATURE

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(chat_llm.model_dir), "--seed", "4", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    ids = chat_llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    want = chat_llm.generate_continuous([ids], SamplingParams(max_new_tokens=8, seed=4, temperature=GREEDY_TEMPERATURE),
                                        max_batch=1, max_model_len=chat_llm.cfg.max_position_embeddings,
                                        prefill_chunk=128, use_tqdm=False)[0].text
    assert capsys.readouterr().out == want + "\n"


def test_a_thought_is_printed_apart_and_left_out_of_the_history(tmp_path, monkeypatch, capsys):
    """A reply's thought channel goes to stderr ([thinking]); the answer alone is printed and kept, and --think
    renders the template with enable_thinking. The engine is scripted: a random model writes no channel."""
    from canvaslm.engine.engine import Finish
    from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN
    from canvaslm.testing import make_tiny_checkpoint
    from canvaslm.tokenizer import Tokenizer

    d = make_tiny_checkpoint(tmp_path / "think", extra_specials=(CHANNEL_OPEN, CHANNEL_CLOSE))
    tok = Tokenizer.from_dir(d)
    prompts, kwargs = [], []
    encode = Tokenizer.encode_chat

    def spy(self, messages, *a, **kw):
        prompts.append([m["content"] for m in messages])
        kwargs.append(kw)
        return encode(self, messages, *a, **kw)

    async def run(self, request, on_draft=None):
        ids = tok.encode(f"{CHANNEL_OPEN}thought\nhmm{CHANNEL_CLOSE}Fine.", add_special_tokens=False)
        return ids, Finish(request.request_id, "stop", len(ids), 1)

    monkeypatch.setattr(Tokenizer, "encode_chat", spy)
    monkeypatch.setattr("canvaslm.engine.engine.Engine.run", run)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand you?\n"))
    assert main(["chat", str(d), "--think"]) == 0
    out, err = capsys.readouterr()
    assert out == "Fine.\nFine.\n" and err.count("[thinking] hmm") == 2
    assert prompts[-1] == ["hi", "Fine.", "and you?"] and kwargs[-1] == {"enable_thinking": True}


def _spy_prompts(monkeypatch):
    """The messages of every chat the session encodes."""
    from canvaslm.tokenizer import Tokenizer

    prompts, encode = [], Tokenizer.encode_chat

    def spy(self, messages, *a, **kw):
        prompts.append(messages)
        return encode(self, messages, *a, **kw)

    monkeypatch.setattr(Tokenizer, "encode_chat", spy)
    return prompts


def _main_uninterrupted(argv):
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped `canvaslm chat`")


def test_ctrl_c_at_the_prompt_quits_quietly_with_130(chat_llm, monkeypatch, capsys):
    lines = iter(["hi"])

    def fake_input(prompt=""):
        line = next(lines, None)
        if line is None:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    assert _main_uninterrupted(["chat", str(chat_llm.model_dir), "--seed", "2", "--max-new-tokens", "8"]) == 130
    out, err = capsys.readouterr()
    assert out == _reply(chat_llm, [{"role": "user", "content": "hi"}], 2, max_new_tokens=8) + "\n"
    assert "Traceback" not in err


def test_ctrl_c_during_a_reply_stops_that_turn_only(chat_llm, monkeypatch, capsys):
    """SIGINT while a reply runs: the engine request is cancelled, the turn is left out of the history and
    the next line is answered as if it were the first (its seed is the next one)."""
    from canvaslm.engine.engine import Engine

    run, cancel, cancelled = Engine.run, Engine.cancel, []

    async def interrupted_first(self, request, on_draft=None):
        if request.request_id == "turn1":
            os.kill(os.getpid(), signal.SIGINT)  # asyncio.run cancels its task at the await in run
        return await run(self, request, on_draft)

    def spy_cancel(self, request_id, reason="cancelled"):
        cancelled.append(request_id)
        cancel(self, request_id, reason)

    monkeypatch.setattr(Engine, "run", interrupted_first)
    monkeypatch.setattr(Engine, "cancel", spy_cancel)
    monkeypatch.setattr("sys.stdin", io.StringIO("a long question " * 20 + "\nhi\n"))
    assert _main_uninterrupted(["chat", str(chat_llm.model_dir), "--seed", "4", "--max-new-tokens", "16"]) == 0
    out, err = capsys.readouterr()
    assert cancelled == ["turn1"] and "reply stopped" in err and "Traceback" not in err
    assert out == _reply(chat_llm, [{"role": "user", "content": "hi"}], 5) + "\n"


def test_commands_are_whole_words_and_double_slash_escapes(chat_llm, monkeypatch, capsys):
    """"/systemd ..." is an unknown command, not a system message; "//x" sends "/x"; a tab separates a
    command from its argument."""
    prompts = _spy_prompts(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("/systemd is slow\n/system\tbe terse\n//image of a cat\n"
                                                 "/exit now\nnever read\n"))
    assert main(["chat", str(chat_llm.model_dir), "--max-new-tokens", "4"]) == 0
    assert "unknown command '/systemd'" in capsys.readouterr().err
    assert prompts == [[{"role": "system", "content": "be terse"}, {"role": "user", "content": "/image of a cat"}]]


def test_the_largest_seed_wraps_around(chat_llm, monkeypatch, capsys):
    """--seed 2**64 - 1: turn 1 draws from seed 0 (it was an error that ended the session after turn 0)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhow are you\n"))
    assert main(["chat", str(chat_llm.model_dir), "--seed", str(2**64 - 1), "--max-new-tokens", "8"]) == 0
    out, _ = capsys.readouterr()
    r1 = _reply(chat_llm, [{"role": "user", "content": "hi"}], 2**64 - 1, max_new_tokens=8)
    r2 = _reply(chat_llm, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": r1},
                           {"role": "user", "content": "how are you"}], 0, max_new_tokens=8)
    assert out == f"{r1}\n{r2}\n"
    assert main(["chat", str(chat_llm.model_dir), "--seed", str(2**64)]) == 2
