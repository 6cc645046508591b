"""What serving LoRA adapters costs: a burst of requests through an engine whose model serves adapters
(`lora_serving.install`), against the peer, an engine serving one adapter merged into the weights
(what serving a fine-tune costs without multi-LoRA), measured in the same run on the same requests.

    python bench/lora_serving.py [--requests 8] [--adapters 4] [--rank 16] [--device cpu]

Three runs: the merged model (peer); the served model with every request on adapter 1 (the same
outputs, to float rounding); the served model with requests spread over the base and all adapters
(one step serves them all). One model is held: adapter 1 is folded into its weights for the peer's run,
then taken back out (to rounding) and the adapters installed, so a 26B model fits one GPU. The model is
random (no download) at a small shape by default; `--shape` picks a named one (e.g. 26b-a4b on a GPU).
Prints wall time and tokens/s of each, and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import torch

from canvaslm.checkpoint import build_random_model
from canvaslm.config import DiffusionParams
from canvaslm.engine.engine import Engine, EngineConfig, GenerationRequest
from canvaslm.lora_serving import Adapter, both_modes, install
from canvaslm.train.lora import DEFAULT_TARGETS
from prefix_cache import model_config  # bench/: the same random shape options


def adapters(model, k: int, rank: int) -> list:
    """k random adapters on every layer projection: [(Adapter for both modes, {our module: (A, B)})]."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(k):
        weights = {}
        for name, mod in model.named_modules():
            if name.rpartition(".")[2] in DEFAULT_TARGETS and ".layers." in name:
                weights[name] = (torch.randn(rank, mod.in_features, generator=g) / mod.in_features ** 0.5,
                                 torch.randn(mod.out_features, rank, generator=g) / rank ** 0.5)
        out.append((Adapter(f"a{i + 1}", None, rank, 1.0, both_modes(weights)), weights))
    return out


def fold(model, weights: dict, sign: int = 1):
    """Add (sign=1) or take back (-1) an adapter of our shared projections in the model's weights, in
    place: the peer runs on the same tensors, so a 26B model is held once."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in weights.items():
            w = mods[name].weight
            w += sign * (b @ a).to(w.device, w.dtype)
    return model


async def burst(engine, prompts, params, loras):
    async def one(i):
        toks, _ = await engine.run(GenerationRequest(f"r{i}", tuple(prompts[i]), params, seed=i, eos_ids=(),
                                                     lora=loras[i]))
        return len(toks)
    return sum(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def timed(model, prompts, params, loras, max_batch, max_len):
    engine = Engine(model, EngineConfig(max_batch=max_batch, max_model_len=max_len, prefix_caching=False)).start()
    try:
        asyncio.run(burst(engine, prompts[:1], params, loras[:1]))  # warm-up
        t = time.perf_counter()
        tokens = asyncio.run(burst(engine, prompts, params, loras))
        return time.perf_counter() - t, tokens
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    ap.add_argument("--canvases", type=int, default=2, help="canvases generated per request")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--canvas", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per canvas")
    ap.add_argument("--shape", default=None, help="a named shape (canvaslm.shapes) instead of --hidden/--layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    args = ap.parse_args()
    from canvaslm.bench import exit_unless_device

    exit_unless_device(args.device)  # `error: ...`, exit 2: not a traceback
    cfg = model_config(args)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model = build_random_model(cfg, device=args.device, dtype=dtype, seed=0, std=0.5).eval()
    ads = adapters(model, args.adapters, args.rank)
    rng = random.Random(0)
    prompts = [[2] + [rng.randrange(3, cfg.vocab_size) for _ in range(args.prompt - 1)] for _ in range(args.requests)]
    n_new = args.canvases * args.canvas
    params = DiffusionParams(max_new_tokens=n_new, max_denoising_steps=args.steps, eos_token_ids=(1,), pad_token_id=0,
                             entropy_bound=1e9)  # accept every position: every request runs every step
    max_len = args.prompt + n_new
    runs = {  # the peer first: adapter 1 folded into the weights, then taken back out and served
        "merged adapter 1 (peer)": [0] * args.requests,
        "served, all on adapter 1": [1] * args.requests,
        f"served, spread over base + {args.adapters} adapters": [i % (args.adapters + 1) for i in range(args.requests)],
    }
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"model: {args.shape or f'hidden {args.hidden}, {args.layers} layers'} ({dtype}), canvas {args.canvas}, "
          f"{args.steps} steps; {args.requests} requests at once, {args.prompt}-token prompts, {n_new} new tokens; "
          f"{args.adapters} adapters of rank {args.rank} on {DEFAULT_TARGETS}; device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| run | wall (s) | tokens/s | vs peer |")
    print("|---|---|---|---|")
    peer_rate = None
    fold(model, ads[0][1])
    for k, (name, loras) in enumerate(runs.items()):
        if k == 1:
            install(fold(model, ads[0][1], -1), [a for a, _ in ads], num_slots=args.requests)
        wall, tokens = timed(model, prompts, params, loras, args.requests, max_len)
        rate = tokens / wall
        peer_rate = peer_rate or rate
        print(f"| {name} | {wall:.2f} | {rate:.0f} | {rate / peer_rate:.2f}x |")


if __name__ == "__main__":
    main()
