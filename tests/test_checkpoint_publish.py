"""write_dir_atomically / _publish: files in subfolders (a tokenizer's additional_chat_templates/NAME.jinja) are
written, and every folder of the published directory can be entered by whoever may read its files."""

from __future__ import annotations

import os

import pytest

from canvaslm.checkpoint import _publish, write_dir_atomically


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text("{}")
    (src / "tool_use.jinja").write_text("{{ messages }}")
    return {"a.json": src / "a.json", "additional_chat_templates/tool_use.jinja": src / "tool_use.jinja"}


def test_files_in_a_subfolder_are_written(tmp_path, sources):
    out = write_dir_atomically(tmp_path / "out", sources)
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ messages }}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_subfolders_get_the_directory_mode_and_files_the_file_mode(tmp_path, sources, umask):
    old = os.umask(umask)
    try:
        out = write_dir_atomically(tmp_path / "out", sources)
    finally:
        os.umask(old)
    for d in (out, out / "additional_chat_templates"):
        assert d.stat().st_mode & 0o777 == 0o777 & ~umask, d
    for f in (out / "a.json", out / "additional_chat_templates" / "tool_use.jinja"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_publish_gives_a_subfolder_search_where_its_files_are_readable(tmp_path):
    # what save_model hands _publish: a temp dir (0700) whose subfolder holds a file (0600)
    tmp = tmp_path / ".tmp"
    (tmp / "additional_chat_templates").mkdir(parents=True, mode=0o700)
    (tmp / "additional_chat_templates" / "tool_use.jinja").write_text("x")
    _publish(tmp, tmp_path / "out", 0o644)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "additional_chat_templates").stat().st_mode & 0o777 == 0o755
    assert (out / "additional_chat_templates" / "tool_use.jinja").stat().st_mode & 0o777 == 0o644
