"""`canvaslm run-batch MODEL_DIR -i requests.jsonl -o results.jsonl`: OpenAI's batch file format, offline.

Each input line is a request of the OpenAI Batch API: `{"custom_id", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions" | "/v1/responses" | "/v1/embeddings", "body": {...}}`.
Every request goes through the server's own app in this process (httpx's ASGI transport, no socket),
so it is validated, batched by the engine and answered exactly as `canvaslm serve` would answer it; up
to `concurrency` run at once, so the engine batches them and shares their common prompt prefixes. Each
output line, in input order, is `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
A request the server refuses keeps its 4xx status and error body. A line that is not a request at all
(bad JSON, a missing field, another method or url, `stream: true`) gets `"response": null` and an
`error` naming the line and what is wrong; so does a line no request can carry (NaN or Infinity, a number
past Python's 4300 digits, nesting too deep), and a request that fails outside the server gets an error
record too: one line never stops the batch. The output file is written once all lines are done, through
a temporary file and a rename (made in the directory of the file a symlink names, so the link stays), so
a failed run never leaves a partial file in its place; a device, a pipe or /dev/stdout is written straight.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import stat
import sys
import tempfile
import uuid
from pathlib import Path

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")


class BatchInputError(ValueError):
    pass


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as inf, which no request body can carry either
        raise ValueError(f"{text[:24]} is past a float's range")
    return value


def encode_body(body: dict) -> bytes:
    """A request body as it is sent: strict JSON (no NaN or Infinity) in UTF-8 (no lone surrogate)."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")


def parse_line(number: int, line: str) -> tuple[str | None, dict | None, str | None]:
    """(custom_id, request, problem) of one input line (numbered from 1)."""
    try:
        # json.loads takes NaN, Infinity and 1e999 (inf), which no request can carry (httpx will not send them)
        req = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        return None, None, f"line {number}: not valid JSON ({e.msg} at column {e.colno})"
    except ValueError as e:  # NaN / Infinity / 1e999, or an integer past Python's 4300 digits
        return None, None, f"line {number}: not valid JSON ({str(e).split('; use sys.')[0]})"
    except RecursionError:
        return None, None, f"line {number}: not valid JSON (nested too deeply)"
    if not isinstance(req, dict):
        return None, None, f"line {number}: expected a JSON object, got {type(req).__name__}"
    custom_id = req.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, None, f"line {number}: custom_id must be a non-empty string"
    if req.get("method", "POST") != "POST":
        return custom_id, None, f"line {number}: method {req.get('method')!r} is not supported; only POST"
    if req.get("url") not in URLS:
        return custom_id, None, f"line {number}: url {req.get('url')!r} is not one of {list(URLS)}"
    if not isinstance(req.get("body"), dict):
        return custom_id, None, f"line {number}: body must be a JSON object"
    if req["body"].get("stream"):
        return custom_id, None, f"line {number}: body.stream must be false in a batch"
    try:
        encode_body(req["body"])  # what one() sends: a body that cannot be sent is this line's error
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        return custom_id, None, f"line {number}: body cannot be sent as JSON ({why})"
    return custom_id, req, None


def _read_input(path: Path) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (PowerShell writes one) is no JSON
    except UnicodeDecodeError as e:
        raise BatchInputError(f"run-batch: {path} is not UTF-8 text ({e})") from None


def read_requests(path: Path) -> list[tuple[str | None, dict | None, str | None]]:
    """parse_line of each non-blank line of -i: any readable file that is not a directory (a regular file, a
    pipe such as /dev/stdin or <(...), a device)."""
    if not path.exists():
        raise BatchInputError(f"run-batch: input file {path} does not exist")
    if path.is_dir():
        raise BatchInputError(f"run-batch: input {path} is a directory; name the JSONL file")
    try:
        text = _read_input(path)
    except OSError as e:
        raise BatchInputError(f"run-batch: cannot read input {path}: {e.strerror or e}") from None
    # lines end at "\n" (or "\r\n") only: U+2028 and the like may stand unescaped inside a JSON string
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise BatchInputError(f"run-batch: {path} holds no requests")
    parsed = [parse_line(n, line) for n, line in lines]
    seen: dict[str, int] = {}
    for (n, _), (cid, _, problem) in zip(lines, parsed):
        if cid is not None and problem is None:
            if cid in seen:
                raise BatchInputError(f"run-batch: {path} line {n}: custom_id {cid!r} repeats line {seen[cid]}")
            seen[cid] = n
    return parsed


async def run_requests(state, parsed, concurrency: int = 16, progress=None) -> list[dict]:
    """One output record per parsed line, in order (`progress(n)` is called as records complete)."""
    import httpx

    from .app import build_app

    transport = httpx.ASGITransport(app=build_app(state), raise_app_exceptions=False)  # a 500 is a record
    headers = {"Authorization": f"Bearer {state.api_key}"} if state.api_key else {}
    gate = asyncio.Semaphore(concurrency)

    async def one(client, custom_id, req, problem) -> dict:
        record = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": None, "error": None}
        if problem is not None:
            record["error"] = {"code": "invalid_request", "message": problem}
        else:
            try:
                async with gate:
                    resp = await client.post(req["url"], content=encode_body(req["body"]),
                                             headers={**headers, "Content-Type": "application/json"})
                try:
                    body = resp.json()
                except ValueError:
                    body = {"error": {"message": resp.text, "type": "server_error"}}
                record["response"] = {"status_code": resp.status_code, "request_id": "req_" + uuid.uuid4().hex,
                                      "body": body}
            except Exception as e:  # a request that could not be sent or read back fails alone, not the batch
                record["error"] = {"code": "request_failed",
                                   "message": f"custom_id {custom_id!r}: {type(e).__name__}: {e}"}
        if progress is not None:
            progress(1)
        return record

    async with httpx.AsyncClient(transport=transport, base_url="http://canvaslm-batch", timeout=None) as client:
        return await asyncio.gather(*(one(client, *p) for p in parsed))


def _own_fd(path) -> int | None:
    """N when `path` names, through any links, one of this process's own descriptors: /dev/stdout,
    /dev/fd/N, /proc/self/fd/N."""
    p = os.path.abspath(path)
    for _ in range(40):  # as many links as the kernel follows
        p = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
        m = re.fullmatch(r"/proc/(\d+)/fd/(\d+)", p)
        if m and int(m[1]) == os.getpid():
            return int(m[2])
        try:
            p = os.path.join(os.path.dirname(p), os.readlink(p))
        except OSError:  # not a link (or not there): the end of the chain
            return None
    return None


def output_target(output_path) -> tuple[Path, int | None, bool]:
    """Where -o's records go, as (path, fd, straight). One of this process's descriptors (/dev/stdout, even
    when a shell points it at a file) is written through that descriptor, at its offset, so a `>`, `>>` or
    pipe gets the records where it expects them; another existing file that is not a regular file (a
    device, a named pipe) is opened and written straight; anything else is the file that the path names
    after its symlinks, replaced through a temporary file beside it (a symlink stays a symlink)."""
    fd = _own_fd(output_path)
    if fd is not None:
        return Path(output_path), fd, False
    try:
        mode = os.stat(output_path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return Path(output_path), None, True
    return Path(os.path.realpath(output_path)), None, False


def check_batch_args(output_path, concurrency: int) -> None:
    """What `-o` and `--concurrency` must be, checked before the model loads and the batch runs: -o not a
    directory, and the directory it goes in (made if missing) a writable directory; or a descriptor open
    for writing, or a device or pipe we may write."""
    if concurrency < 1:
        raise BatchInputError(f"run-batch: --concurrency must be >= 1, got {concurrency}")
    given = Path(output_path)
    path, fd, straight = output_target(output_path)
    if fd is not None:
        import fcntl

        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            raise BatchInputError(f"run-batch: cannot write -o {given}: descriptor {fd} is not open") from None
        if flags & os.O_ACCMODE == os.O_RDONLY:
            raise BatchInputError(f"run-batch: cannot write -o {given}: descriptor {fd} is open for reading only")
        return
    if straight:
        if not os.access(path, os.W_OK):
            raise BatchInputError(f"run-batch: cannot write -o {given}: it is not writable")
        return
    if path.is_dir():
        raise BatchInputError(f"run-batch: -o {given} is a directory; name the output file, e.g. "
                              f"{given / 'results.jsonl'}")
    above = next(p for p in (path.parent, *path.parents) if p.exists())
    if not above.is_dir():
        raise BatchInputError(f"run-batch: cannot write -o {given}: {above} is not a directory")
    if not os.access(above, os.W_OK | os.X_OK):
        raise BatchInputError(f"run-batch: cannot write -o {given}: {above} is not writable")


def _write_lines(f, records: list[dict]) -> None:
    for r in records:
        text = json.dumps(r, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (a custom_id "\ud800" reads so): \u escapes, still JSON
            text = json.dumps(r)
        f.write(text + "\n")


def write_records(path, records: list[dict]) -> None:
    """All records at once: atomically into a file (a temporary file in the directory of the file that
    -o names after its symlinks, then a rename), straight into a descriptor, a device or a pipe."""
    path, fd, straight = output_target(path)
    if fd is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        with os.fdopen(os.dup(fd), "w", encoding="utf-8") as f:  # a dup shares the descriptor's offset
            _write_lines(f, records)
        return
    if straight:
        with open(path, "w", encoding="utf-8") as f:
            _write_lines(f, records)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # a plain file's mode (mkstemp makes it private)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _write_lines(f, records)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_batch_file(state, input_path, output_path, concurrency: int = 16, parsed: list | None = None) -> dict:
    """Read, run and write a batch; returns counts {"requests", "ok", "failed"} (failed: a non-200 or an
    invalid line). parsed: `read_requests(input_path)` when the caller read it already (a pipe such as
    /dev/stdin can be read once)."""
    from tqdm.auto import tqdm

    check_batch_args(output_path, concurrency)
    output_path = Path(output_path)
    if parsed is None:
        parsed = read_requests(Path(input_path))
    with tqdm(total=len(parsed), desc="run-batch", unit="req") as bar:
        records = asyncio.run(run_requests(state, parsed, concurrency, bar.update))
    try:
        write_records(output_path, records)
    except OSError as e:  # what changed under -o since the check (or a full disk): said, not a traceback
        raise BatchInputError(f"run-batch: cannot write -o {output_path}: {e.strerror or e}") from None
    ok = sum(1 for r in records if r["response"] is not None and r["response"]["status_code"] == 200)
    return {"requests": len(records), "ok": ok, "failed": len(records) - ok}
