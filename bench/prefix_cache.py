"""What prefix caching saves: requests that share a long prefix (a system prompt, a document, a chat's
earlier turns) sent one after another to an engine with the cache, and to one without it (the peer,
measured in the same run, same model, same requests).

    python bench/prefix_cache.py [--prefix 1536] [--suffix 32] [--requests 8] [--together] [--device cpu]
    python bench/prefix_cache.py --turns [--reply-canvases 2]

`--together` sends all requests at once (a burst, or n choices) to an engine with a slot for each.
`--turns` makes the requests turns of one conversation: each prompt is the previous prompt, its reply
(`--reply-canvases` canvases, no EOS) and `--suffix` new tokens. Then a third engine runs too, whose
prefix store keeps every position (`prefix_store_len=max_model_len`), beside the default bounded one.

The model is random (no download) at a small shape by default; `--hidden/--layers` change it. Prints
per-request latency (submit to finish) for both engines, their ratio, and the prompt tokens the cache
supplied. Outputs are compared too: reuse must not change a single token.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import torch

from canvaslm.config import DiffusionParams, ModelConfig
from canvaslm.engine.engine import Engine, EngineConfig, GenerationRequest
from canvaslm.checkpoint import build_random_model


def model_config(args) -> ModelConfig:
    if args.shape is not None:  # a named shape (canvaslm.shapes), e.g. 26b-a4b on a GPU
        from canvaslm.shapes import model_config as named

        return named(args.shape, canvas_length=args.canvas)
    text = dict(model_type="diffusion_gemma_text", vocab_size=4096, hidden_size=args.hidden,
                intermediate_size=2 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=args.hidden // 4, sliding_window=512, num_experts=8,
                top_k_experts=2, moe_intermediate_size=args.hidden // 2, max_position_embeddings=8192,
                layer_types=["sliding_attention"] * (args.layers - 1) + ["full_attention"],
                eos_token_id=[1], pad_token_id=0, bos_token_id=2)
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": text,
                                  "canvas_length": args.canvas})


async def one(engine: Engine, i: int, prompt, params):
    """(latency, Finish, output tokens, prompt length) of one request."""
    t = time.perf_counter()
    tokens, fin = await engine.run(GenerationRequest(f"r{i}", tuple(prompt), params, seed=i, eos_ids=(1,)))
    return time.perf_counter() - t, fin, tuple(tokens), len(prompt)


async def run(engine: Engine, prompts, params, together: bool, turns: int = 0):
    """turns: the shared prefix length when the prompts are turns of one conversation (each request
    sends the previous prompt, its reply and its own tokens)."""
    if turns:
        runs, prompt = [], list(prompts[0])
        for i, own in enumerate(prompts):
            if i:
                prompt = prompt + list(runs[-1][2]) + list(own[turns:])
            runs.append(await one(engine, i, prompt, params))
    elif together:
        runs = await asyncio.gather(*(one(engine, i, p, params) for i, p in enumerate(prompts)))
    else:  # one after another, sharing the prefix
        runs = [await one(engine, i, p, params) for i, p in enumerate(prompts)]
    return [list(x) for x in zip(*runs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=1536, help="shared prefix tokens")
    ap.add_argument("--suffix", type=int, default=32, help="tokens of each request's own part")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--canvas", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per canvas")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--together", action="store_true", help="send all requests at once")
    ap.add_argument("--turns", action="store_true", help="the requests are turns of one conversation")
    ap.add_argument("--reply-canvases", type=int, default=2, help="with --turns: canvases per reply")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, help="a named shape (canvaslm.shapes: tiny, small, 26b-a4b) instead "
                    "of --hidden/--layers")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    args = ap.parse_args()
    if args.requests < 2:  # the table's "later requests" are all but the first: none with one
        ap.error(f"--requests must be at least 2 (the later requests are compared with the first), got {args.requests}")
    from canvaslm.bench import exit_unless_device

    exit_unless_device(args.device)  # `error: ...`, exit 2: not a traceback
    torch.manual_seed(0)
    cfg = model_config(args)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model = build_random_model(cfg, device=args.device, dtype=dtype, seed=0, std=0.5).eval()
    rng = random.Random(0)
    shared = [2] + [rng.randrange(3, cfg.vocab_size) for _ in range(args.prefix - 1)]
    prompts = [shared + [rng.randrange(3, cfg.vocab_size) for _ in range(args.suffix)] for _ in range(args.requests)]
    reply = args.canvas * (args.reply_canvases if args.turns else 1)
    params = DiffusionParams(max_new_tokens=reply, max_denoising_steps=args.steps, eos_token_ids=(1,), pad_token_id=0)
    max_len = args.prefix + args.suffix + args.canvas
    if args.turns:
        max_len = args.prefix + args.requests * (args.suffix + reply) + args.canvas
    engines = [("no prefix cache (peer)", False, None), ("prefix cache", True, None)]
    if args.turns:
        engines.append(("prefix cache, every position stored", True, max_len))
    results, walls, notes = {}, {}, []
    for name, caching, store in engines:
        config = EngineConfig(max_batch=args.requests if args.together else 1, max_model_len=max_len,
                              prefill_chunk=args.prefill_chunk, prefix_caching=caching, prefix_store_len=store)
        engine = Engine(model, config).start()
        if caching:
            notes.append(f"{name}: prefix store {engine.runner.cache.store_len} positions per slot")
        try:
            t = time.perf_counter()
            results[name] = asyncio.run(run(engine, prompts, params, args.together,
                                            args.prefix if args.turns else 0))
            walls[name] = time.perf_counter() - t
        finally:
            engine.shutdown()
    peer = engines[0][0]
    shape = args.shape or f"hidden {args.hidden}, {args.layers} layers"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    mode = ("turns of one conversation" if args.turns else "at once" if args.together else "one after another")
    print(f"model: {shape} ({dtype}), canvas {args.canvas}, {args.steps} steps; "
          f"prompts: {args.prefix} shared + {args.suffix} own tokens, {args.requests} requests {mode}; "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; " + "; ".join(notes))
    print("| engine | median latency (ms) | first request (ms) | later requests, mean (ms) | prompt tokens reused |"
          " later requests vs the peer | outputs equal the peer's |")
    print("|---|---|---|---|---|---|---|")
    for name, _, _ in engines:
        lat, fin, out, lens = results[name]
        ratio = statistics.mean(results[peer][0][1:]) / statistics.mean(lat[1:])
        print(f"| {name} | {1e3 * statistics.median(lat):.0f} | {1e3 * lat[0]:.0f} | "
              f"{1e3 * statistics.mean(lat[1:]):.0f} | {sum(f.cached_tokens for f in fin)} of {sum(lens)} | "
              f"{ratio:.2f}x | {out == results[peer][2]} |")
    print("all requests: " + ", ".join(f"{name} {walls[name]:.2f} s" for name, _, _ in engines))
    print(f"outputs identical: {all(results[name][2] == results[peer][2] for name, _, _ in engines)}")


if __name__ == "__main__":
    main()
