"""llama.vim's flow against `canvaslm serve`: code completion at the cursor (`POST /infill`) with a few
thousand tokens of extra context (chunks of other files), cold against warmed, in the same run.

    python bench/editor_infill.py [--extra 4096] [--hidden 256] [--layers 6] [--canvas 64] [--n-predict 32]

The peer is a cold request: extra context the server has never seen. Then the editor's warm-up
(`n_predict: 0` with new chunks, as llama.vim sends them in the background) followed by the completion
that uses them, and a second completion after the cursor moved (same chunks, another prefix). Printed:
wall milliseconds of each completion, the prompt tokens it encoded and took from the cache, and the
ratios to the peer. The model is random (a char tokenizer: one character per token; no download).
"""

from __future__ import annotations

import argparse
import random
import string
import tempfile
import time
from pathlib import Path

import httpx
import torch

from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state
from canvaslm.testing import make_tiny_checkpoint


def chunks(rng: random.Random, tokens: int, n: int = 8) -> list[dict]:
    per = tokens // n
    alphabet = string.ascii_letters + string.digits + " _=()\n"
    return [{"filename": f"src/mod{i}.py", "text": "".join(rng.choice(alphabet) for _ in range(per))} for i in range(n)]


def fim(base: str, extra, prefix: str, n_predict: int) -> tuple[float, dict]:
    body = {"input_extra": extra, "input_prefix": prefix, "input_suffix": "\n    return y\n", "prompt": "    y = ",
            "n_predict": n_predict, "seed": 1, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True}
    t = time.perf_counter()
    r = httpx.post(base + "/infill", json=body, timeout=600)
    r.raise_for_status()
    return 1e3 * (time.perf_counter() - t), r.json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extra", type=int, default=4096, help="tokens of extra context (8 file chunks)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6, help="5 sliding : 1 full, as DiffusionGemma")
    ap.add_argument("--canvas", type=int, default=64)
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(args.layers)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "m", canvas_length=args.canvas, hidden_size=args.hidden,
                                    intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                                    sliding_window=256, moe_intermediate_size=args.hidden // 2,
                                    max_position_embeddings=4 * args.extra + 4096, layer_types=types,
                                    per_layer_config={str(i): {"head_dim": args.hidden // 2, "num_key_value_heads": 1}
                                                      for i, t in enumerate(types) if t == "full_attention"})
        state = build_state(ckpt, "cpu", "float32", EngineConfig(max_batch=8, max_model_len=2 * args.extra + 2048,
                                                                 prefill_chunk=512, prefix_caching=True))
        rng = random.Random(0)
        with BackgroundServer(state) as srv:
            base = srv.base_url
            fim(base, chunks(rng, 256), "def warmup(x):\n", args.n_predict)  # first-call setup out of the figures
            cold_ms, cold = fim(base, chunks(rng, args.extra), "def f(x):\n", args.n_predict)
            extra = chunks(rng, args.extra)
            t = time.perf_counter()
            httpx.post(base + "/infill", json={"input_extra": extra, "n_predict": 0}, timeout=600).raise_for_status()
            warm_up_ms = 1e3 * (time.perf_counter() - t)
            warm_ms, warm = fim(base, extra, "def f(x):\n", args.n_predict)
            moved_ms, moved = fim(base, extra, "def f(x):\n    z = 1\n", args.n_predict)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads; random model: hidden {args.hidden}, "
          f"{args.layers} layers, canvas {args.canvas}; extra context {args.extra} tokens in 8 chunks, "
          f"n_predict {args.n_predict}")
    print("| completion | ms | prompt tokens encoded | from the cache | vs the cold peer |")
    print("|---|---|---|---|---|")
    for name, ms, out in (("cold (peer)", cold_ms, cold), ("after the warm-up", warm_ms, warm),
                          ("cursor moved, same chunks", moved_ms, moved)):
        print(f"| {name} | {ms:.0f} | {out['timings']['prompt_n']} | {out['tokens_cached']} | {cold_ms / ms:.2f}x |")
    print(f"the warm-up itself (n_predict 0, in the background): {warm_up_ms:.0f} ms")


if __name__ == "__main__":
    main()
