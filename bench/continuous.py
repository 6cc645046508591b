"""Offline generation of many prompts with mixed output lengths: `LLM.generate_continuous` (the serving
engine: continuous batching, a finished request's slot goes to the next prompt at once) against
`LLM.generate` (static batches that wait for their slowest row), the peer, measured in the same run on
the same model, prompts and parameters.

    python bench/continuous.py [--prompts 64] [--max-batch 16] [--device cpu] [--threads 1]

The model is random (no download): `--shape` names one of canvaslm.shapes (default small: hidden 512,
6 layers, vocabulary 32k, canvas 32). Output budgets are drawn from 1 to 8 canvases and denoising steps
from 2 to 8, so rows finish at very different times. Every request runs to its budget (min_tokens: a random
model's EOS would stop rows where the two methods' different random draws happen to put it), so both
methods produce the same tokens, checked, and the headline compares tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch

from canvaslm.config import DiffusionParams
from canvaslm.llm import LLM, SamplingParams
from canvaslm.shapes import random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--shape", default="small")
    ap.add_argument("--canvas", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None,
                    help="prompts (one canvas each) both methods run untimed first, so neither is charged the "
                         "first call's compiles and captures (default: --max-batch; 0: none)")
    args = ap.parse_args()
    from canvaslm.bench import exit_unless_device

    exit_unless_device(args.device)  # `error: ...`, exit 2: not a traceback
    cfg, model, dtype = random_model(args.shape, args.canvas, args.device, args.threads)
    llm = LLM.from_model(model, DiffusionParams(eos_token_ids=(1,), pad_token_id=0), max_batch=args.max_batch)
    rng = random.Random(0)
    prompts = [[2] + [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(16, 96))] for _ in range(args.prompts)]
    params = [budget_params(seed=i, max_new_tokens=args.canvas * rng.randint(1, 8),
                            max_denoising_steps=rng.randint(2, 8)) for i in range(args.prompts)]
    warm = min(args.prompts, args.max_batch if args.warmup is None else args.warmup)
    if warm:  # both methods, untimed: the first call's compiles and graph captures land here, not on the peer
        warm_params = [dataclasses.replace(p, max_new_tokens=args.canvas, min_tokens=args.canvas)
                       for p in params[:warm]]
        llm.generate(prompts[:warm], warm_params, use_tqdm=False)
        llm.generate_continuous(prompts[:warm], warm_params, max_batch=args.max_batch, use_tqdm=False)
    times, outs = {}, {}
    for name, run in (("generate (static batches, peer)", lambda: llm.generate(prompts, params, use_tqdm=False)),
                      ("generate_continuous (engine)", lambda: llm.generate_continuous(
                          prompts, params, max_batch=args.max_batch, use_tqdm=False))):
        t = time.perf_counter()
        outs[name] = run()
        times[name] = time.perf_counter() - t
    tokens = equal_work(outs, params)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"model: {args.shape} ({dtype}), canvas {args.canvas}; {args.prompts} prompts of 17-97 tokens, budgets "
          f"1-8 canvases, 2-8 steps; max_batch {args.max_batch}; {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; "
          + (f"both warmed up first on {warm} prompts of one canvas (untimed)" if warm else "no warm-up"))
    print("| method | seconds | output tokens | tokens/s |")
    print("|---|---|---|---|")
    for name in times:
        print(f"| {name} | {times[name]:.2f} | {tokens} | {tokens / times[name]:.0f} |")
    peer, engine = (tokens / t for t in times.values())
    print(f"generate_continuous: {engine / peer:.2f}x the speed of generate (tokens/s, both {tokens} tokens)")


def budget_params(**kw) -> SamplingParams:
    """A request that runs to its budget: no EOS before max_new_tokens, early stopping off."""
    return SamplingParams(min_tokens=kw["max_new_tokens"], confidence_threshold=1e-9, **kw)


def equal_work(outs: dict, params: list) -> int:
    """The output tokens each method produced, checked equal per request (each its budget): the ratio
    of two methods' speeds means nothing over unequal work."""
    want = [p.max_new_tokens for p in params]
    for name, results in outs.items():
        got = [len(o.token_ids) for o in results]
        bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
        if bad:
            raise RuntimeError(f"{name}: requests (index, tokens, budget) {bad[:5]} did not run to their budget; "
                               "the two methods would time unequal work")
    return sum(want)


if __name__ == "__main__":
    main()
