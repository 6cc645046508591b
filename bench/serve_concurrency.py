"""Aggregate throughput of 1 vs N concurrent requests through the HTTP server, at a named shape.

Random weights at `--shape` (26b-a4b | small | tiny, see canvaslm.shapes), served in this process on
loopback. Work per request is fixed: `--canvases` canvases of exactly `--steps` denoising steps
(confidence_threshold ~0 disables the adaptive stop, ignore_eos disables EOS), token-id prompts of
`--prompt-len`. For each concurrency level it sends that many requests at once, `--repeats` times
after a warm-up, and reports output tokens/s (median); the headline is the ratio N vs 1.

    python bench/serve_concurrency.py --shape 26b-a4b --device cuda          # the GPU figure
    python bench/serve_concurrency.py --shape tiny --canvas-length 16 --device cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx


async def burst(base_url: str, model: str, n: int, prompt_len: int, max_tokens: int, steps: int,
                vocab: int, seed: int) -> tuple[float, int]:
    """n concurrent non-streamed requests -> (wall seconds, output tokens)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=3600) as http:
        def body(i):
            prompt = [(seed * 7919 + i * 104_729 + j) % (vocab - 8) + 8 for j in range(prompt_len)]
            return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed + i,
                    "max_denoising_steps": steps, "confidence_threshold": 1e-12, "ignore_eos": True}
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(http.post("/v1/completions", json=body(i)) for i in range(n)))
        wall = time.perf_counter() - t0
    for r in rs:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    return wall, sum(r.json()["usage"]["completion_tokens"] for r in rs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="26b-a4b")
    ap.add_argument("--canvas-length", type=int, default=256)
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--canvases", type=int, default=2, help="canvases generated per request")
    ap.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (fixed)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from canvaslm.bench import exit_unless_device

    exit_unless_device(args.device)  # `error: ...`, exit 2: not a traceback

    import torch

    from canvaslm.checkpoint import build_random_model
    from canvaslm.config import DiffusionParams
    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.launch import BackgroundServer, state_from_model
    from canvaslm.shapes import model_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    cfg = model_config(args.shape, canvas_length=args.canvas_length)
    t0 = time.perf_counter()
    model = build_random_model(cfg, device=device, dtype=dtype, seed=0, std=0.02)
    build_s = time.perf_counter() - t0
    C, top = cfg.canvas_length, max(args.concurrency)
    max_tokens = args.canvases * C
    config = EngineConfig(max_batch=top, max_model_len=args.prompt_len + max_tokens, prefill_chunk=args.prompt_len)
    defaults = DiffusionParams(max_new_tokens=max_tokens, max_denoising_steps=args.steps)
    state = state_from_model(model, defaults, None, config, served_model_name=args.shape,
                             max_denoising_steps=max(args.steps, 1024))
    results = {}
    with BackgroundServer(state) as srv:
        run = lambda n, seed: asyncio.run(burst(srv.base_url, args.shape, n, args.prompt_len,  # noqa: E731
                                                max_tokens, args.steps, cfg.vocab_size, seed))
        run(top, 10_000)  # warm-up: allocator, kernels, every batch size up to top
        run(1, 20_000)
        for n in args.concurrency:
            rates = []
            for r in range(args.repeats):
                wall, tokens = run(n, 1000 * (r + 1))
                rates.append(tokens / wall)
            results[n] = statistics.median(rates)
    base = results[args.concurrency[0]]
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"shape={args.shape} canvas={C} steps={args.steps} canvases={args.canvases} prompt={args.prompt_len} "
          f"device={device_name} dtype={dtype} (model built in {build_s:.0f}s)")
    for n, rate in results.items():
        print(f"  concurrency {n}: {rate:,.1f} output tokens/s  ({rate / base:.2f}x of {args.concurrency[0]})")
    if args.json:
        print(json.dumps({"shape": args.shape, "device": device_name, "dtype": dtype, "steps": args.steps,
                          "canvas_length": C, "tokens_per_s": results,
                          "ratio": {n: r / base for n, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
