"""The default context on a real device, and what a long prompt costs: an engine sized as `canvaslm serve`
sizes it by default (`EngineConfig(max_model_len=None)`: the model's whole context where the KV cache and
prefix store fit), then one request with a long prompt against the peer, one with a short prompt, in the
same run on the same engine.

    python bench/long_context.py [--shape 26b-a4b] [--device cuda] [--long 32768] [--short 1024]

Prints the start-up decisions (context, prefix caching), then per prompt: time to the first committed
canvas (prefill + one canvas of denoising), the mean decoder step (one canvas, fixed steps), and the long
prompt's ratios to the short one's. A follow-up turn on the long prompt (its prompt, reply and a few new
tokens) shows what prefix caching saves at that length. Last, one decoder pass over the short prompt's
cache at the engine's context, reading only the blocks in use (`KVCache.span`) against reading every
column (what every step did before). The model is random (no download).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import torch

from canvaslm.config import DiffusionParams
from canvaslm.engine.engine import Engine, EngineConfig, GenerationRequest
from canvaslm.shapes import random_model


async def timed(engine: Engine, rid: str, prompt, params):
    """(seconds to the first commit, seconds to the end, decoder passes, output, cached prompt tokens)."""
    import asyncio as aio

    from canvaslm.engine.engine import Commit, Finish

    queue, t0, first = aio.Queue(), time.perf_counter(), None
    engine.submit(GenerationRequest(rid, tuple(prompt), params, seed=1, eos_ids=()), queue, aio.get_running_loop())
    out = []
    while True:
        ev = await queue.get()
        if isinstance(ev, Commit):
            first = first or time.perf_counter() - t0
            out += ev.token_ids
        elif isinstance(ev, Finish):
            if ev.reason not in ("stop", "length"):  # e.g. a prompt over the context: no figure to give
                raise RuntimeError(f"request {rid} ({len(prompt)} prompt tokens): {ev.reason}: {ev.message}")
            return first, time.perf_counter() - t0, ev.decoder_passes, out, ev.cached_tokens


FOLLOW_NEW = 32  # tokens the follow-up turn adds after the long prompt and its reply


def fit_long(asked: int, short: int, limit: int, canvas: int) -> int:
    """The long prompt's length: `asked`, shortened so its follow-up turn (the long prompt + its 2-canvas
    reply + FOLLOW_NEW tokens, then 2 canvases of reply) fits the engine's context of `limit` positions.
    A ValueError naming the limit when not even the short prompt's request fits."""
    need_short = short + 2 * canvas
    fit = limit - 4 * canvas - FOLLOW_NEW
    if need_short > limit or fit < 1:
        raise ValueError(f"the engine's context of {limit} positions is too small: --short {short} needs "
                         f"{need_short}, a follow-up turn needs 4 canvases of {canvas} + {FOLLOW_NEW} beyond --long")
    return min(asked, fit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="26b-a4b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--long", type=int, default=32768, help="tokens of the long prompt")
    ap.add_argument("--short", type=int, default=1024, help="tokens of the short prompt (the peer)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (fixed: no early stop)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from canvaslm.bench import exit_unless_device

    exit_unless_device(args.device)  # `error: ...`, exit 2: not a traceback
    cfg, model, dtype = random_model(args.shape, args.canvas, args.device, args.threads)
    engine = Engine(model, EngineConfig(max_batch=args.max_batch, max_model_len=None)).start()
    try:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        print(f"model: {args.shape} ({dtype}), canvas {args.canvas}, max_batch {args.max_batch}; {device}, "
              f"torch {torch.__version__}")
        for note in engine.notes:
            print(f"engine: {note}")
        limit = engine.config.max_model_len
        long_len = fit_long(args.long, args.short, limit, args.canvas)
        if long_len < args.long:
            print(f"--long {args.long} shortened to {long_len}: its follow-up turn must fit {limit} positions")
        rng = random.Random(0)
        params = DiffusionParams(max_new_tokens=2 * args.canvas, max_denoising_steps=args.steps,
                                 confidence_threshold=1e-9, eos_token_ids=(1,), pad_token_id=0)
        prompts = {n: [2] + [rng.randrange(3, cfg.vocab_size) for _ in range(n - 1)] for n in (args.short, long_len)}
        asyncio.run(timed(engine, "warm", prompts[args.short][:64], params))  # first-call setup out of the figures
        rows = {}
        for n, prompt in prompts.items():
            first, total, passes, out, _ = asyncio.run(timed(engine, f"p{n}", prompt, params))
            rows[n] = (first, (total - first) / max(1, passes - args.steps), out)
        follow = prompts[long_len] + rows[long_len][2] + [rng.randrange(3, cfg.vocab_size) for _ in range(FOLLOW_NEW)]
        f_first, _, _, _, cached = asyncio.run(timed(engine, "follow", follow, params))
    finally:
        engine.shutdown()
    cut, every = span_vs_every_column(model, cfg, limit, prompts[args.short], args.device)
    (s_first, s_step, _), (l_first, l_step, _) = rows[args.short], rows[long_len]
    print("| prompt tokens | to the first canvas (s) | decoder step, 2nd canvas (ms) |")
    print("|---|---|---|")
    for n in (args.short, long_len):
        print(f"| {n} | {rows[n][0]:.3f} | {1e3 * rows[n][1]:.1f} |")
    print(f"long / short: first canvas {l_first / s_first:.2f}x, decoder step {l_step / s_step:.2f}x; "
          f"follow-up turn of {len(follow)} tokens: first canvas in {f_first:.3f} s with {cached} prompt tokens "
          f"reused ({l_first / f_first:.2f}x faster than the first turn)")
    print(f"one decoder pass after {args.short} prompt tokens, cache of {limit} positions: {1e3 * cut:.1f} ms reading "
          f"the blocks in use, {1e3 * every:.1f} ms reading every column ({every / cut:.2f}x)")


def span_vs_every_column(model, cfg, max_len: int, prompt, device, repeat: int = 3):
    """Median seconds of one decoder pass with the cache bound given (KVCache.span) and without."""
    import statistics

    from canvaslm.kv_cache import KVCache

    cache = KVCache(cfg, 1, max_len, dtype=model.embed_weight.dtype, device=device)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    n = len(prompt)
    canvas = torch.randint(3, cfg.vocab_size, (1, cfg.canvas_length), device=device)
    times = {True: [], False: []}
    with torch.no_grad():
        model.encode(torch.tensor([prompt], device=device), torch.arange(n, device=device)[None], slots, cache,
                     fresh=True)
        for i in range(repeat + 1):
            for bound in (True, False):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                model.denoise(canvas, slots, cache, max_start=n if bound else None)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i:
                    times[bound].append(time.perf_counter() - t)
    return statistics.median(times[True]), statistics.median(times[False])


if __name__ == "__main__":
    main()
