"""The command line: every subcommand's flags must be spelled out in full (a prefix would match whatever flag
it begins, as `serve --enable-lora` matched `--enable-lora-updates`)."""

from __future__ import annotations

import pytest

from canvaslm.cli import build_parser


@pytest.mark.parametrize("argv,flag", [
    (["generate", "m", "--prompt", "x", "--max-new", "3"], "--max-new"),
    (["quantize", "a", "b", "--to", "int4", "--dev", "cpu"], "--dev"),
    (["sudoku", "solve", "--step", "3", "1" * 81], "--step"),
])
def test_a_prefix_of_a_flag_is_refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_flags_spelled_out_still_parse():
    args = build_parser().parse_args(["generate", "m", "--prompt", "x", "--max-new-tokens", "3"])
    assert args.max_new_tokens == 3


def test_chat_with_prompt_ids_is_refused_and_required_models_have_no_default(capsys):
    from canvaslm.cli import main

    with pytest.raises(SystemExit) as e:  # the ids are used as given: --chat would be ignored
        main(["generate", "m", "--prompt-ids", "2,5", "--chat"])
    assert "--prompt-ids are used as given" in str(e.value.code)
    for cmd in ("serve", "run-batch"):  # their model is required: the help promises no default
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        assert "bundled Sudoku" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    assert "bundled Sudoku" in capsys.readouterr().out
