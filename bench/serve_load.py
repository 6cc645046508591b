"""Bounded loopback load test of `canvaslm serve`: N concurrent streaming clients for D seconds.

Starts the server in this process (a tiny random checkpoint unless a model dir is given), runs
`--clients` asyncio clients that each send streaming completions back to back (each with its own
seed, prompt length and budget) for `--duration` seconds, split into `--rounds` to watch memory.
Then replays every request without streaming and checks that each stream's text and token count
equal the non-streamed result for its seed: no failed requests, no lost or duplicated tokens.

    python bench/serve_load.py --clients 64 --duration 60
    python bench/serve_load.py MODEL_DIR --clients 8 --duration 5 --json

Prints the figures (and a JSON line with --json); exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Outcome:
    body: dict
    text: str = ""
    tokens: int = -1
    finish: str | None = None
    error: str | None = None
    ttft: float | None = None
    latency: float = 0.0
    chunks: int = 0


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    requests: int = 0
    failed: int = 0
    mismatched: int = 0
    tokens: int = 0
    rss_mib_per_round: list = field(default_factory=list)
    ttft_p50_s: float = 0.0
    ttft_p95_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p95_s: float = 0.0
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    tokens_per_forward: float = 0.0
    verify_s: float = 0.0
    errors: list = field(default_factory=list)

    @property
    def rss_growth_mib(self) -> float:
        """Growth after the first (warm-up) round: the largest RSS at the end of a later round over the RSS at
        the end of round 1 (0 with one round: nothing after the warm-up to compare)."""
        r = self.rss_mib_per_round
        return max(r[1:]) - r[0] if len(r) > 1 else 0.0

    def ok(self, max_growth_mib: float = 64.0) -> bool:
        return self.failed == 0 and self.mismatched == 0 and self.requests > 0 and \
            self.rss_growth_mib <= max_growth_mib


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def request_body(model: str, client: int, k: int, max_steps: int) -> dict:
    rnd = random.Random(client * 1_000_003 + k)
    prompt = "".join(rnd.choice("abcdefghij klmnop") for _ in range(rnd.randint(4, 40)))
    return {"model": model, "prompt": prompt, "max_tokens": rnd.choice([8, 16, 24, 40]),
            "seed": client * 100_000 + k, "max_denoising_steps": rnd.randint(2, max_steps),
            "stop": rnd.choice([None, ["zz"]])}


async def stream_one(http: httpx.AsyncClient, body: dict) -> Outcome:
    out, t0 = Outcome(body), time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions",
                               json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                out.chunks += 1
                for ch in chunk.get("choices", []):
                    if ch["text"] and out.ttft is None:
                        out.ttft = time.perf_counter() - t0
                    out.text += ch["text"]
                    out.finish = ch["finish_reason"] or out.finish
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        out.error = f"{type(e).__name__}: {e}"
    out.latency = time.perf_counter() - t0
    if out.error is None and (out.finish is None or out.tokens < 0):
        out.error = "stream ended without a finish_reason or usage"
    return out


async def run_load(base_url: str, model: str, clients: int, duration: float, rounds: int = 6,
                   max_steps: int = 6) -> LoadReport:
    rep = LoadReport(clients, duration)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:
        start = time.perf_counter()
        round_len = duration / rounds

        async def client(c: int):
            k = 0
            while time.perf_counter() - start < duration:
                outcomes.append(await stream_one(http, request_body(model, c, k, max_steps)))
                k += 1

        async def watch():
            for r in range(rounds):
                await asyncio.sleep(max(0.0, start + (r + 1) * round_len - time.perf_counter()))
                rep.rss_mib_per_round.append(round(rss_mib(), 1))

        await asyncio.gather(watch(), *(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
        metrics = (await http.get("/metrics")).text

        # replay without streaming: every stream must equal its seed's non-streamed result
        t_verify, sem = time.perf_counter(), asyncio.Semaphore(clients)

        async def verify(o: Outcome):
            if o.error is not None:
                return
            async with sem:
                r = await http.post("/v1/completions", json=o.body)
            if r.status_code != 200:
                o.error = f"replay HTTP {r.status_code}"
                return
            data = r.json()
            ref = data["choices"][0]
            if (ref["text"], ref["finish_reason"], data["usage"]["completion_tokens"]) != \
                    (o.text, o.finish, o.tokens):
                rep.mismatched += 1
                rep.errors.append(f"mismatch seed={o.body['seed']}: stream {o.text!r}/{o.tokens} vs {ref['text']!r}")

        await asyncio.gather(*(verify(o) for o in outcomes))
        rep.verify_s = round(time.perf_counter() - t_verify, 1)

    done = [o for o in outcomes if o.error is None]
    rep.requests, rep.failed = len(outcomes), len(outcomes) - len(done)
    rep.errors += [o.error for o in outcomes if o.error][:5]
    rep.tokens = sum(o.tokens for o in done)
    rep.tokens_per_s = round(rep.tokens / elapsed, 1)
    rep.requests_per_s = round(len(done) / elapsed, 2)
    ttfts = sorted(o.ttft for o in done if o.ttft is not None)
    lats = sorted(o.latency for o in done)
    pct = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else 0.0  # noqa: E731
    rep.ttft_p50_s, rep.ttft_p95_s = pct(ttfts, 0.5), pct(ttfts, 0.95)
    rep.latency_p50_s, rep.latency_p95_s = pct(lats, 0.5), pct(lats, 0.95)
    for line in metrics.splitlines():
        if line.startswith("canvaslm_tokens_per_forward "):
            rep.tokens_per_forward = round(float(line.split()[1]), 2)
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", help="checkpoint (default: a tiny random one in a temp dir)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--rounds", type=int, default=6, help="RSS is sampled at the end of each round")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=6, help="max_denoising_steps drawn from [2, this]")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prefix-caching", choices=["auto", "on", "off"], default="auto",
                    help="the engine's prefix caching (auto: where its memory fits)")
    args = ap.parse_args(argv)
    from canvaslm.bench import exit_unless_device

    exit_unless_device(args.device)  # `error: ...`, exit 2: not a traceback

    import torch

    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.launch import BackgroundServer, build_state
    from canvaslm.testing import make_tiny_checkpoint

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_tiny_checkpoint(os.path.join(tmp, "tiny"))
        caching = {"auto": None, "on": True, "off": False}[args.prefix_caching]
        config = EngineConfig(max_batch=args.max_batch, max_model_len=args.max_model_len, prefix_caching=caching)
        state = build_state(model_dir, args.device, None, config, served_model_name="load")
        with BackgroundServer(state) as srv:
            rep = asyncio.run(run_load(srv.base_url, "load", args.clients, args.duration, args.rounds,
                                       args.max_steps))
    print(f"clients={rep.clients} duration={rep.duration_s}s requests={rep.requests} failed={rep.failed} "
          f"mismatched={rep.mismatched} (replayed in {rep.verify_s}s)")
    print(f"tokens={rep.tokens} tokens/s={rep.tokens_per_s} requests/s={rep.requests_per_s} "
          f"tokens/forward={rep.tokens_per_forward}")
    print(f"ttft p50={rep.ttft_p50_s}s p95={rep.ttft_p95_s}s  latency p50={rep.latency_p50_s}s "
          f"p95={rep.latency_p95_s}s")
    print(f"rss MiB per round={rep.rss_mib_per_round} growth after round 1={rep.rss_growth_mib:.1f} MiB")
    for e in rep.errors[:5]:
        print("  error:", e)
    if args.json:
        print(json.dumps({**rep.__dict__, "rss_growth_mib": rep.rss_growth_mib, "ok": rep.ok()}))
    print("OK" if rep.ok() else "FAILED")
    return 0 if rep.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
