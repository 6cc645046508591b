"""`canvaslm run-batch MODEL_DIR -i requests.jsonl -o results.jsonl`: OpenAI's batch file format, offline.

Each input line is a request of the OpenAI Batch API: `{"custom_id", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions" | "/v1/responses" | "/v1/embeddings", "body": {...}}`.
Every request goes through the server's own app in this process (httpx's ASGI transport, no socket),
so it is validated, batched by the engine and answered exactly as `canvaslm serve` would answer it; up
to `concurrency` run at once, so the engine batches them and shares their common prompt prefixes. Each
output line,
in input order, is `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
A request the server refuses keeps its 4xx status and error body. A line that is not a request at all
(bad JSON, a missing field, another method or url, `stream: true`) gets `"response": null` and an
`error` naming the line and what is wrong. The output file is written once all lines are done, through
a temporary file and a rename, so a failed run never leaves a partial file in its place.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid
from pathlib import Path

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")


class BatchInputError(ValueError):
    pass


def parse_line(number: int, line: str) -> tuple[str | None, dict | None, str | None]:
    """(custom_id, request, problem) of one input line (numbered from 1)."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        return None, None, f"line {number}: not valid JSON ({e.msg} at column {e.colno})"
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
    return custom_id, req, None


def read_requests(path: Path) -> list[tuple[str | None, dict | None, str | None]]:
    if not path.is_file():
        raise BatchInputError(f"run-batch: input file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (PowerShell writes one) is no JSON
    except UnicodeDecodeError as e:
        raise BatchInputError(f"run-batch: {path} is not UTF-8 text ({e})") from None
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
            async with gate:
                resp = await client.post(req["url"], json=req["body"], headers=headers)
            try:
                body = resp.json()
            except ValueError:
                body = {"error": {"message": resp.text, "type": "server_error"}}
            record["response"] = {"status_code": resp.status_code, "request_id": "req_" + uuid.uuid4().hex,
                                  "body": body}
        if progress is not None:
            progress(1)
        return record

    async with httpx.AsyncClient(transport=transport, base_url="http://canvaslm-batch", timeout=None) as client:
        return await asyncio.gather(*(one(client, *p) for p in parsed))


def check_batch_args(output_path, concurrency: int) -> None:
    """What `-o` and `--concurrency` must be, checked before the model loads and the batch runs: -o not a
    directory, and the directory it goes in (made if missing) a writable directory."""
    if concurrency < 1:
        raise BatchInputError(f"run-batch: --concurrency must be >= 1, got {concurrency}")
    path = Path(output_path)
    if path.is_dir():
        raise BatchInputError(f"run-batch: -o {path} is a directory; name the output file, e.g. "
                              f"{path / 'results.jsonl'}")
    above = next(p for p in (path.absolute().parent, *path.absolute().parents) if p.exists())
    if not above.is_dir():
        raise BatchInputError(f"run-batch: cannot write -o {path}: {above} is not a directory")
    if not os.access(above, os.W_OK | os.X_OK):
        raise BatchInputError(f"run-batch: cannot write -o {path}: {above} is not writable")


def write_records(path: Path, records: list[dict]) -> None:
    """All records at once, atomically: a temporary file in the same directory, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # a plain file's mode (mkstemp makes it private)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_batch_file(state, input_path, output_path, concurrency: int = 16) -> dict:
    """Read, run and write a batch; returns counts {"requests", "ok", "failed"} (failed: a non-200 or an
    invalid line)."""
    from tqdm.auto import tqdm

    check_batch_args(output_path, concurrency)
    output_path = Path(output_path)
    parsed = read_requests(Path(input_path))
    with tqdm(total=len(parsed), desc="run-batch", unit="req") as bar:
        records = asyncio.run(run_requests(state, parsed, concurrency, bar.update))
    try:
        write_records(output_path, records)
    except OSError as e:  # what changed under -o since the check (or a full disk): said, not a traceback
        raise BatchInputError(f"run-batch: cannot write -o {output_path}: {e.strerror or e}") from None
    ok = sum(1 for r in records if r["response"] is not None and r["response"]["status_code"] == 200)
    return {"requests": len(records), "ok": ok, "failed": len(records) - ok}
