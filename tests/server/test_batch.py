"""`canvaslm run-batch`: OpenAI batch files run offline through the server's own app, answered as the live
server answers the same bodies, in input order, with bad lines reported by line number."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from canvaslm.server.batch import BatchInputError, read_requests
from canvaslm.server.launch import BackgroundServer, build_state

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 12, "seed": 1}
GOOD = [
    ("chat", "/v1/chat/completions", CHAT),
    ("text", "/v1/completions", {"model": "tiny", "prompt": "Once upon", "max_tokens": 20, "seed": 2, "n": 2}),
    ("resp", "/v1/responses", {"model": "tiny", "input": "hello", "max_output_tokens": 10, "seed": 3}),
    ("chat-same-prefix", "/v1/chat/completions", {**CHAT, "seed": 4}),
    ("emb", "/v1/embeddings", {"model": "tiny", "input": ["hello", "there"]}),
]


def line(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def run_cli(*args, timeout=300):
    # one intra-op thread, as the comparing server below runs with: float sums then add in the same order
    return subprocess.run([sys.executable, "-m", "canvaslm.cli", "run-batch", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_run_batch_answers_as_the_server_does(tiny_checkpoint, tmp_path, one_thread):
    lines = [line(*g) for g in GOOD]
    lines += [line("bad-field", "/v1/chat/completions", {**CHAT, "max_tokens": -1}),
              "{not json",
              line("wrong-url", "/v1/moderations", {"model": "tiny"}),
              line("streamed", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True}),
              line("get", "/v1/completions", {}, method="GET"),
              ""]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    proc = run_cli(tiny_checkpoint, "-i", src, "-o", out, "--served-model-name", "tiny", "--concurrency", "3")
    assert proc.returncode == 0, proc.stderr
    plain = tmp_path / "plain"
    plain.write_text("")
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # the umask's mode, not mkstemp's 0600
    assert "10 requests, 5 ok, 5 failed" in proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == [g[0] for g in GOOD] + ["bad-field", None, "wrong-url",
                                                                          "streamed", "get"]
    with BackgroundServer(build_state(tiny_checkpoint, "cpu", "float32", served_model_name="tiny")) as srv:
        for record, (_, url, body) in zip(records, GOOD):
            want = httpx.post(srv.base_url + url, json=body, timeout=60).json()
            got = record["response"]
            assert got["status_code"] == 200 and record["error"] is None and record["id"].startswith("batch_req_")
            if url == "/v1/embeddings":
                assert [d["embedding"] for d in got["body"]["data"]] == [d["embedding"] for d in want["data"]]
            elif url == "/v1/responses":
                assert got["body"]["output"][0]["content"][0]["text"] == want["output"][0]["content"][0]["text"]
            else:
                key = "message" if "chat" in url else "text"
                assert [c[key] for c in got["body"]["choices"]] == [c[key] for c in want["choices"]]
    refused = records[len(GOOD)]
    assert refused["response"]["status_code"] == 400 and refused["response"]["body"]["error"]["param"] == "max_tokens"
    problems = [r["error"]["message"] for r in records[len(GOOD) + 1:]]
    assert problems == ["line 7: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
                        "line 8: url '/v1/moderations' is not one of ['/v1/chat/completions', '/v1/completions', "
                        "'/v1/responses', '/v1/embeddings']",
                        "line 9: body.stream must be false in a batch",
                        "line 10: method 'GET' is not supported; only POST"]


def test_bad_input_files_fail_before_the_model_loads(tmp_path, tiny_checkpoint):
    dup = tmp_path / "dup.jsonl"
    dup.write_text(line("a", "/v1/completions", {}) + "\n" + line("a", "/v1/completions", {}) + "\n")
    with pytest.raises(BatchInputError, match="line 2: custom_id 'a' repeats line 1"):
        read_requests(dup)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"custom_id": "caf\xe9"}\n')
    with pytest.raises(BatchInputError, match=f"{latin1} is not UTF-8 text"):
        read_requests(latin1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    out = tmp_path / "out.jsonl"
    for path, words in [(tmp_path / "missing.jsonl", "does not exist"), (empty, "holds no requests")]:
        proc = run_cli(tiny_checkpoint, "-i", path, "-o", out, timeout=120)
        assert proc.returncode != 0 and words in proc.stderr and not out.exists()


def test_run_batch_takes_the_chat_template_flags(tiny_checkpoint, tmp_path):
    """run-batch takes vLLM's serve flags too: --default-chat-template-kwargs reaches the template (said at start),
    and a reserved name is refused before the model loads."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(line("c", "/v1/chat/completions", {**CHAT, "seed": 1}) + "\n")
    proc = run_cli(tiny_checkpoint, "-i", src, "-o", out, "--served-model-name", "tiny",
                   "--default-chat-template-kwargs", '{"greeting": "ahoy"}')
    assert proc.returncode == 0 and "chat template defaults: greeting='ahoy'" in proc.stderr, proc.stderr
    refused = run_cli(tiny_checkpoint, "-i", src, "-o", tmp_path / "x.jsonl",
                      "--default-chat-template-kwargs", '{"messages": []}')
    assert refused.returncode == 2 and "--default-chat-template-kwargs may not set messages" in refused.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_a_line_that_fails_inside_the_server_is_a_500_record(tiny_checkpoint, tmp_path, monkeypatch):
    """An unexpected error while answering one line (a bug: the server answers it with a 500) is that line's
    record; the other lines are still answered and the output file is written."""
    from canvaslm.server import embeddings
    from canvaslm.server.batch import run_batch_file

    async def broken(state, body, seqs):
        raise RuntimeError("boom")

    monkeypatch.setattr(embeddings, "create_embeddings", broken)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join([line("emb", "/v1/embeddings", {"model": "tiny", "input": "hello"}),
                              line("text", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4})]))
    state = build_state(tiny_checkpoint, "cpu", "float32", served_model_name="tiny")
    try:
        counts = run_batch_file(state, src, out, concurrency=2)
    finally:
        state.shutdown()
    assert counts == {"requests": 2, "ok": 1, "failed": 1}
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == ["emb", "text"]
    assert records[0]["response"]["status_code"] == 500 and records[1]["response"]["status_code"] == 200


def test_an_output_that_cannot_be_written_fails_before_the_model_loads(tiny_checkpoint, tmp_path, monkeypatch,
                                                                        capsys):
    """-o naming a directory (or a path under a file) and --concurrency 0 are refused before the model loads
    (they used to run the whole batch, then crash and drop every result); a write that fails anyway is an
    error naming -o, not a traceback."""
    from canvaslm.cli import main
    from canvaslm.server import batch, launch

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(launch, "build_state", no_load)
    src = tmp_path / "in.jsonl"
    src.write_text(line("a", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4}) + "\n")
    (tmp_path / "file").write_text("")
    for out, flags, words in [(tmp_path, [], f"-o {tmp_path} is a directory"),
                              (tmp_path / "file" / "out.jsonl", [], f"{tmp_path / 'file'} is not a directory"),
                              (tmp_path / "out.jsonl", ["--concurrency", "0"], "--concurrency must be >= 1, got 0")]:
        assert main(["run-batch", str(tiny_checkpoint), "-i", str(src), "-o", str(out), *flags]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()

    async def answered(state, parsed, concurrency, progress):
        return [{"custom_id": "a", "response": None, "error": "x"}]

    def full(path, records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch, "run_requests", answered)
    monkeypatch.setattr(batch, "write_records", full)
    with pytest.raises(BatchInputError, match="cannot write -o .*out.jsonl: No space left on device"):
        batch.run_batch_file(None, src, tmp_path / "out.jsonl")


def test_input_lines_end_at_newlines_only(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps(ensure_ascii=False) writes them so):
    str.splitlines() would cut such a request in pieces; a byte-order mark is skipped; CRLF files read."""
    import json

    from canvaslm.server.batch import read_requests

    rows = [{"custom_id": k, "method": "POST", "url": "/v1/completions",
             "body": {"model": "m", "prompt": f"one{sep}two", "max_tokens": 4}}
            for k, sep in (("a", "\u2028"), ("b", "\u0085"), ("c", "\u2029"))]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\r\n")
    parsed = read_requests(path)
    assert [(cid, problem) for cid, _, problem in parsed] == [("a", None), ("b", None), ("c", None)]
    assert parsed[1][1]["body"]["prompt"] == "one\u0085two"
