"""On a CPU: a bfloat16 checkpoint run in bfloat16 (what `dtype=None` / `--dtype auto` now picks on a CPU with
AMX or AVX512-BF16) against the same checkpoint upcast to float32 (the peer: the old CPU default), in the
same run, end to end through `LLM.generate`.

    python bench/cpu_dtype.py [--shape small] [--prompts 4] [--steps 8] [--threads 1]

The model is random at a named shape (canvaslm.shapes), saved once as a bfloat16 checkpoint in a temporary
directory. Each prompt (128 tokens) writes one canvas of 256 tokens in exactly `--steps` denoising steps
(early stop off), so both runs do the same work. Printed: what the CPU offers, the dtype `auto` chose,
seconds and tokens/s of each, the ratio, and how many output tokens the two runs share (bf16 rounds
differently from float32, so a random model's samples drift apart; the speed is the point here).
Run it under `ONEDNN_MAX_CPU_ISA=AVX512_CORE` (or `AVX2`) to see a CPU without bf16 instructions: `auto`
still picks float32 there by reading /proc/cpuinfo, and forcing bf16 shows why.
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
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", default=None, help="run this dtype instead of what auto picks (e.g. bfloat16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.shape, canvas_length=256)
    params = DiffusionParams(max_new_tokens=256, max_denoising_steps=args.steps, eos_token_ids=(1,), pad_token_id=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, cfg.vocab_size, (127,), generator=gen).tolist() for _ in range(args.prompts)]
    sp = [SamplingParams(seed=i, max_new_tokens=256, max_denoising_steps=args.steps, confidence_threshold=1e-30,
                     min_tokens=256)
          for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_random_model(cfg, dtype="bfloat16", seed=0, std=0.5), tmp, params)
        auto = args.force or default_dtype("cpu", tmp)
        print(f"shape {args.shape}, {args.prompts} prompts x 256 tokens, {args.steps} steps each; torch "
              f"{torch.__version__}, {args.threads} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}, "
              f"bf16 matrix instructions: {cpu_has_native_bf16()}; auto picks {default_dtype('cpu', tmp)}")
        rows, outs = [], {}
        for name, dtype in (("float32 (peer: the old CPU default)", "float32"), (f"{auto} (auto)", auto)):
            llm = LLM(tmp, device="cpu", dtype=dtype, max_batch=args.prompts)
            llm.generate(prompts[:1], [SamplingParams(seed=0, max_new_tokens=256, max_denoising_steps=1)],
                         use_tqdm=False)  # warm-up
            t0 = time.perf_counter()
            res = llm.generate(prompts, sp, use_tqdm=False)
            secs = time.perf_counter() - t0
            n = sum(len(r.token_ids) for r in res)
            outs[dtype] = [t for r in res for t in r.token_ids]
            rows.append((name, secs, n))
            del llm
    print("| dtype | seconds | output tokens | tokens/s |\n|---|---|---|---|")
    for name, secs, n in rows:
        print(f"| {name} | {secs:.2f} | {n} | {n / secs:.1f} |")
    same = sum(a == b for a, b in zip(outs["float32"], outs[auto]))
    print(f"{auto} ran {rows[0][1] / rows[1][1]:.2f}x as fast as float32; {same} of {len(outs['float32'])} "
          f"output tokens the same")


if __name__ == "__main__":
    main()
