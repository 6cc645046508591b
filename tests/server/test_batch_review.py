"""`canvaslm run-batch` after review: one line that no request can carry (NaN, a 5000-digit integer, deep nesting)
is that line's error and never stops the batch; -o through a symlink keeps the link; -o and -i may be descriptors,
devices and pipes (/dev/stdout, /dev/stdin)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import pytest

from canvaslm.server import batch
from canvaslm.server.batch import BatchInputError, check_batch_args, read_requests, write_records
from canvaslm.server.launch import build_state

EMB = {"model": "tiny", "input": "hello"}


def line(custom_id, body, url="/v1/embeddings") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def raw(custom_id, body_json: str) -> str:
    """A line whose body is given as JSON text (what json.dumps would not write)."""
    return '{"custom_id": "%s", "method": "POST", "url": "/v1/completions", "body": %s}' % (custom_id, body_json)


BAD = [  # (line, what its error says)
    (raw("nan", '{"model": "tiny", "prompt": "x", "temperature": NaN}'),
     "line 2: not valid JSON (NaN is not a JSON number)"),
    (raw("inf", '{"model": "tiny", "prompt": "x", "top_p": -Infinity}'), "line 3: not valid JSON (-Infinity is not"),
    (raw("huge", '{"model": "tiny", "prompt": "x", "top_p": 1e999}'), "line 4: not valid JSON (1e999 is past a"),
    (raw("long", '{"model": "tiny", "prompt": "x", "seed": %s}' % ("9" * 5000)),
     "line 5: not valid JSON (Exceeds the limit"),
    ("[" * 100_000 + "]" * 100_000, "line 6: not valid JSON (nested too deeply)"),
    (raw("surrogate", '{"model": "tiny", "prompt": "\\ud800"}'), "line 7: body cannot be sent as JSON ("),
]


def test_a_line_no_request_can_carry_is_that_lines_error(tmp_path):
    """json.loads takes NaN / Infinity (httpx then refuses to send the body and the whole run died), a 5000-digit
    integer raised a bare ValueError and deep nesting a RecursionError before the model loaded: each is now the
    error of its own line, named by number, and the good lines stand."""
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([line("ok", EMB)] + [text for text, _ in BAD] + [line("ok2", EMB)]) + "\n")
    parsed = read_requests(path)
    assert [problem for _, _, problem in parsed][0] is None and parsed[-1][2] is None
    for (_, req, problem), (_, words) in zip(parsed[1:-1], BAD):
        assert req is None and problem.startswith(words), problem
    assert "digits; use sys." not in parsed[4][2]  # Python's advice to the programmer is left out


@pytest.fixture(scope="module")
def state(tiny_checkpoint):
    state = build_state(tiny_checkpoint, "cpu", "float32", served_model_name="tiny")
    yield state
    state.shutdown()


def test_a_request_that_fails_outside_the_server_fails_alone(state):
    """A request that cannot even be sent (here a NaN body that bypassed parse_line) used to raise out of
    asyncio.gather and lose every record; now it is its own error record and the others are answered."""
    parsed = [("bad", {"url": "/v1/completions", "body": {"model": "tiny", "prompt": "x", "top_p": float("nan")}},
               None),
              ("good", {"url": "/v1/embeddings", "body": EMB}, None)]
    records = asyncio.run(batch.run_requests(state, parsed, concurrency=2))
    assert [r["custom_id"] for r in records] == ["bad", "good"]
    assert records[0]["response"] is None and records[0]["error"]["code"] == "request_failed"
    assert records[0]["error"]["message"].startswith("custom_id 'bad': ValueError: ")
    assert records[1]["response"]["status_code"] == 200 and records[1]["error"] is None


def test_bad_lines_and_a_lone_surrogate_custom_id_keep_the_batch(state, tmp_path):
    """The batch with such lines runs to its end and writes every record; a custom_id with a lone surrogate
    (valid JSON: "\\ud800") is written back with \\u escapes rather than failing the write after the run."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    surrogate = '{"custom_id": "\\ud800", "method": "POST", "url": "/v1/embeddings", "body": %s}' % json.dumps(EMB)
    src.write_text("\n".join([line("ok", EMB)] + [text for text, _ in BAD] + [surrogate]) + "\n")
    counts = batch.run_batch_file(state, src, out, concurrency=2)
    assert counts == {"requests": 8, "ok": 2, "failed": 6}
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert records[-1]["custom_id"] == "\ud800" and records[-1]["response"]["status_code"] == 200
    assert [r["error"]["message"][:len(words)] for r, (_, words) in zip(records[1:-1], BAD)] == [w for _, w in BAD]


def test_output_through_a_symlink_keeps_the_link(tmp_path):
    """-o link -> ../real/results.jsonl writes real/results.jsonl (the temporary file and the rename happen
    there); the link used to be replaced by a regular file and the real file never written."""
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "out.jsonl"
    link.symlink_to("../real/results.jsonl")  # dangling until the batch writes it
    records = [{"custom_id": "a", "response": None, "error": None}]
    check_batch_args(link, 1)
    write_records(link, records)
    assert link.is_symlink() and json.loads((tmp_path / "real" / "results.jsonl").read_text()) == records[0]
    write_records(link, records * 2)  # and again, over the file it now names
    assert link.is_symlink() and len((tmp_path / "real" / "results.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["out.jsonl"]
    (tmp_path / "dirlink").symlink_to(tmp_path / "real")
    with pytest.raises(BatchInputError, match="dirlink is a directory"):
        check_batch_args(tmp_path / "dirlink", 1)


WRITE_TO_STDOUT = """
import sys
from pathlib import Path
from canvaslm.server.batch import check_batch_args, write_records
print("before", flush=True)
check_batch_args(sys.argv[1], 1)
write_records(Path(sys.argv[1]), [{"custom_id": "a"}, {"custom_id": "b"}])
print("after", flush=True)
"""


# Not /dev/stdout itself: run as root against a regressed write_records, the test would replace the machine's
# /dev/stdout link with a regular file. /proc/self/fd/1 and /dev/fd/1 fail safely there (no file can be made in
# /proc/self/fd), and a link of our own to /proc/self/fd/1 stands for /dev/stdout.
@pytest.mark.parametrize("target", ["/proc/self/fd/1", "/dev/fd/1", "link"])
def test_output_to_stdout_writes_through_the_descriptor(tmp_path, target):
    """-o /dev/stdout (or any link to descriptor 1) writes through descriptor 1, at its offset: a shell's `>>`
    keeps what the file held and the lines printed around the records stay in order. A link used to be replaced
    by a regular file (as root, /dev/stdout itself) and stdout got nothing."""
    if target == "link":
        (tmp_path / "stdout").symlink_to("/proc/self/fd/1")
        target = str(tmp_path / "stdout")
    out = tmp_path / "captured"
    out.write_text("old\n")
    with open(out, "a") as f:
        proc = subprocess.run([sys.executable, "-c", WRITE_TO_STDOUT, target], stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines() == ["old", "before", '{"custom_id": "a"}', '{"custom_id": "b"}', "after"]
    if target.endswith("stdout"):
        assert os.path.islink(target)
    piped = subprocess.run([sys.executable, "-c", WRITE_TO_STDOUT, target], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert piped.stdout.splitlines()[1:3] == ['{"custom_id": "a"}', '{"custom_id": "b"}'], piped.stderr


def test_output_to_a_named_pipe_or_a_read_only_descriptor(tmp_path):
    """A named pipe is written straight (it stays a pipe; mkstemp + rename used to put a file in its place); a
    descriptor open for reading only is refused before the model loads."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    check_batch_args(fifo, 1)
    write_records(fifo, [{"custom_id": "a"}])
    reader.join(timeout=30)
    assert got == ['{"custom_id": "a"}\n'] and fifo.is_fifo()
    fd = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BatchInputError, match=f"descriptor {fd} is open for reading only"):
            check_batch_args(f"/proc/self/fd/{fd}", 1)
    finally:
        os.close(fd)


def test_input_from_a_pipe_is_read(tmp_path):
    """-i /dev/stdin from a pipe was refused as "does not exist" (not is_file()); the command reads it once
    and hands what it parsed to run_batch_file. A directory is named as such."""
    r, w = os.pipe()
    os.write(w, (line("a", EMB) + "\n" + line("b", EMB) + "\n").encode())
    os.close(w)
    try:
        assert [cid for cid, _, _ in read_requests(batch.Path(f"/proc/self/fd/{r}"))] == ["a", "b"]
    finally:
        os.close(r)
    with pytest.raises(BatchInputError, match="is a directory"):
        read_requests(tmp_path)


def test_run_batch_from_stdin_to_stdout(tiny_checkpoint, tmp_path):
    """The whole command: `... | canvaslm run-batch -i /dev/stdin -o /dev/stdout` answers every line, the bad
    ones included, on stdout (/dev/fd/1 here: see above)."""
    lines = [line("ok", EMB), BAD[0][0], BAD[3][0]]
    proc = subprocess.run([sys.executable, "-m", "canvaslm.cli", "run-batch", str(tiny_checkpoint), "-i", "/dev/stdin",
                           "-o", "/dev/fd/1", "--served-model-name", "tiny"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in proc.stdout.splitlines()]  # stdout holds the records alone
    assert [r["custom_id"] for r in records] == ["ok", None, None]
    assert records[0]["response"]["status_code"] == 200
    assert [r["error"]["message"][:16] for r in records[1:]] == ["line 2: not vali", "line 3: not vali"]
    assert "3 requests, 1 ok, 2 failed" in proc.stderr
