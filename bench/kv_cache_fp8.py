"""`--kv-cache-dtype fp8` against the model-dtype KV cache (the peer), in one run: what it buys (the context
the memory plan gives at the 26B-A4B shape), what it costs in quality (decoder logits of the trained
Sudoku model against an fp32 cache), and what it costs in time (one decoder pass over a long cache).

    python bench/kv_cache_fp8.py [--shape small] [--device cpu] [--context 8192]

1. Planned context, 8 slots, prefix caching off (arithmetic from `plan_max_model_len`, no allocation),
   for three amounts of free memory.
2. The bundled Sudoku model (trained): 64 puzzles encoded into an fp32, a bf16 and an fp8 cache, one
   denoising step from the same noise canvas: argmax agreement and mean KL from the fp32 cache's logits.
3. One decoder pass after a `--context`-token prompt at `--shape` (random weights), fp8 cache vs a cache
   in the model's dtype: median milliseconds (the fp8 read widens K and V as it copies them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from canvaslm.engine.engine import EngineConfig, plan_max_model_len
from canvaslm.kv_cache import KVCache
from canvaslm.shapes import model_config, random_model

FP8, GIB = torch.float8_e4m3fn, 1 << 30


def planned_context() -> None:
    cfg = model_config("26b-a4b")
    config = EngineConfig(max_batch=8, max_model_len=None, prefix_caching=False)
    print("| free memory (of total) | bf16 cache: context | fp8 cache: context | ratio |")
    print("|---|---|---|---|")
    for free, total in ((8, 24), (20, 80), (28, 80)):
        got = {}
        for dtype in (torch.bfloat16, FP8):
            try:
                got[dtype] = plan_max_model_len(cfg, config, "cuda", dtype, (free * GIB, total * GIB))[0]
            except ValueError:
                got[dtype] = 0
        ratio = f"{got[FP8] / got[torch.bfloat16]:.2f}x" if got[torch.bfloat16] else "-"
        print(f"| {free} GiB ({total}) | {got[torch.bfloat16]} | {got[FP8]} | {ratio} |")
    print(f"(the model's whole context is {cfg.max_position_embeddings}: a plan stops there)")


def sudoku_drift() -> None:
    from canvaslm.llm import LLM
    from canvaslm.recipes.sudoku.eval import kv_cache_drift

    drift = kv_cache_drift(LLM(device="cpu").model, (torch.bfloat16, FP8))
    print("| KV cache (Sudoku model, 64 puzzles) | argmax agreement with fp32 | mean KL from fp32 |")
    print("|---|---|---|")
    for dtype, (kl, agree) in drift.items():
        print(f"| {str(dtype).removeprefix('torch.')} | {100 * agree:.2f} % | {kl:.2e} |")


def decoder_pass(shape: str, device: str, context: int, canvas: int, threads, repeat: int = 5) -> None:
    cfg, model, dtype = random_model(shape, canvas, device, threads)
    dtype = getattr(torch, dtype)
    prompt = torch.randint(3, cfg.vocab_size, (1, context), device=device)
    noise = torch.randint(3, cfg.vocab_size, (1, canvas), device=device)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    ms = {}
    for name, store in (("peer", dtype), ("fp8", FP8)):
        cache = KVCache(cfg, 1, context + canvas, dtype=store, device=device, compute_dtype=dtype)
        times = []
        with torch.no_grad():
            for start in range(0, context, 4096):  # chunked, as the engine prefills
                end = min(context, start + 4096)
                model.encode(prompt[:, start:end], torch.arange(start, end, device=device)[None], slots, cache,
                             fresh=start == 0, max_position=end - 1)
            for i in range(repeat + 1):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                model.denoise(noise, slots, cache, max_start=context)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t)
        ms[name] = (1e3 * statistics.median(times), cache.nbytes())
    (p_ms, p_bytes), (f_ms, f_bytes) = ms["peer"], ms["fp8"]
    print(f"one decoder pass after {context} prompt tokens ({shape}, {str(dtype).removeprefix('torch.')}, {device}): "
          f"{str(dtype).removeprefix('torch.')} cache {p_ms:.1f} ms, {p_bytes / 2**20:.1f} MiB; fp8 cache {f_ms:.1f} ms, "
          f"{f_bytes / 2**20:.1f} MiB; fp8 / peer: time {f_ms / p_ms:.2f}x, memory {f_bytes / p_bytes:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from canvaslm.bench import exit_unless_device

    exit_unless_device(args.device)  # `error: ...`, exit 2: not a traceback
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    planned_context()
    sudoku_drift()
    decoder_pass(args.shape, args.device, args.context, args.canvas, args.threads)


if __name__ == "__main__":
    main()
