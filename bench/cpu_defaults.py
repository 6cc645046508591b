"""On a CPU, end to end through `LLM.generate`: the old defaults (float32 weights, `torch.multinomial` draws:
`sampler_impl="reference"`) as the peer, against the inverse-CDF draw (`sampler_impl="auto"` off CUDA) and
then against the whole new default (also `dtype=None`, which runs a bfloat16 checkpoint in bfloat16 on a
CPU with AMX or AVX512-BF16), in the same run on the same checkpoint.

    python bench/cpu_defaults.py [--shape small] [--vocab 262144] [--prompts 2] [--steps 4] [--threads 1]

The model is random at a named shape (canvaslm.shapes), saved once as a bfloat16 checkpoint in a temporary
directory. Each prompt (128 tokens) writes one canvas of 256 tokens in exactly `--steps` denoising steps
(early stop and EOS off), so every run does the same work. Printed: what the CPU offers, what `auto` picks,
seconds and tokens/s of each run and its speed against the peer. A random model's samples differ between
the runs (other draws, other rounding): the speed is the point. Under `ONEDNN_MAX_CPU_ISA=AVX512_CORE` (or
`AVX2`) oneDNN acts as a CPU without bf16 instructions; `auto` reads /proc/cpuinfo and still picks bf16
there, so pass `--dtype float32` to see that CPU's default.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from canvaslm.checkpoint import build_random_model, cpu_has_native_bf16, default_dtype, save_model
from canvaslm.config import DiffusionParams
from canvaslm.llm import LLM, SamplingParams
from canvaslm.shapes import model_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size over the shape's (DiffusionGemma: 262144)")
    ap.add_argument("--dtype", default=None, help="the new default's dtype (default: what auto picks)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.shape, canvas_length=256, **({"vocab_size": args.vocab} if args.vocab else {}))
    params = DiffusionParams(max_new_tokens=256, max_denoising_steps=args.steps, eos_token_ids=(1,), pad_token_id=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, cfg.vocab_size, (127,), generator=gen).tolist() for _ in range(args.prompts)]
    sp = [SamplingParams(seed=i, max_new_tokens=256, max_denoising_steps=args.steps, confidence_threshold=1e-30,
                         min_tokens=256) for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_random_model(cfg, dtype="bfloat16", seed=0, std=0.5), tmp, params)
        auto = args.dtype or default_dtype("cpu", tmp)
        print(f"shape {args.shape} (vocabulary {cfg.vocab_size}), {args.prompts} prompts x 256 tokens, {args.steps} "
              f"steps each; torch {torch.__version__}, {args.threads} thread(s), CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}, bf16 matrix instructions: {cpu_has_native_bf16()}; "
              f"dtype auto picks {default_dtype('cpu', tmp)}")
        runs = (("float32, reference draws (peer: the old defaults)", "float32", "reference"),
                ("float32, inverse-CDF draws", "float32", "auto"),
                (f"{auto}, inverse-CDF draws (the new defaults)", auto, "auto"))
        rows = []
        for name, dtype, impl in runs:
            llm = LLM(tmp, device="cpu", dtype=dtype, max_batch=args.prompts, sampler_impl=impl)
            llm.generate(prompts[:1], [SamplingParams(seed=0, max_new_tokens=256, max_denoising_steps=1)],
                         use_tqdm=False)  # warm-up
            t0 = time.perf_counter()
            res = llm.generate(prompts, sp, use_tqdm=False)
            rows.append((name, time.perf_counter() - t0, sum(len(r.token_ids) for r in res)))
            del llm
    print("| run | seconds | output tokens | tokens/s | vs the peer |\n|---|---|---|---|---|")
    for name, secs, n in rows:
        print(f"| {name} | {secs:.2f} | {n} | {n / secs:.1f} | {rows[0][1] / secs:.2f}x |")


if __name__ == "__main__":
    main()
