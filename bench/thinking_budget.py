"""What a thinking budget adds to a denoising step: the sampler step alone against the budget's forced close
(sampling/thinking.py: one argmax over the canvas's logits, a one-row write) plus the same sampler step, on the
same logits, in the same run.

    python bench/thinking_budget.py [--vocab 262144] [--canvas 256] [--batch 1] [--device cpu] [--dtype float32]

Logits are random at DiffusionGemma 26B-A4B's vocabulary and canvas; the budget's case is the one that does
the most work (the thought's start known, its last allowed position in this canvas, so the close is forced
every step). Printed: milliseconds per step for each (median of --repeat after a warm-up) and the ratio. The
decoder pass that makes the logits (the step's real cost: ~17 ms in bf16 on an H100, seconds on a CPU) is
left out, so the ratio is an upper bound on the budget's share of a step. The sampler step is the reference
one on a CPU (as the recorded figures were measured; the engine's CPU default is now the inverse-CDF step,
`--sampler-impl cdf`), the fused one on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from canvaslm.bench import add_sampler_impl_arg, exit_unless_device, step_impl
from canvaslm.config import DiffusionParams
from canvaslm.sampling.samplers import CanvasState, SamplerParams, entropy_bound_step
from canvaslm.sampling.thinking import ThinkingBudget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    add_sampler_impl_arg(p)
    a = p.parse_args()
    exit_unless_device(a.device)  # `error: ...`, exit 2: not a traceback
    impl = step_impl(a.sampler_impl, a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    B, C, V, dev = a.batch, a.canvas, a.vocab, a.device
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, C, V, generator=g, device=dev).to(getattr(torch, a.dtype)) * 4
    params = SamplerParams.build([DiffusionParams()] * B, dev)
    canvas = torch.randint(0, V, (B, C), generator=g, device=dev)
    state = CanvasState(canvas, canvas.clone(), None, torch.zeros(B, dtype=torch.bool, device=dev),
                        torch.full((B, 1, C), -1, dtype=torch.long, device=dev), params.n_steps.clone())
    budget = ThinkingBudget(C // 2, open_id=5, close_id=6)

    def plain():
        return entropy_bound_step(logits.clone(), state, params, g, V, impl=impl)

    def budgeted():
        lg = logits.clone()
        for b in range(B):
            budget.tracker(prompt_ids=[5]).apply(lg[b], 0)  # the thought opened in the prompt: close due at C // 2
        return entropy_bound_step(lg, state, params, g, V, impl=impl)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(a.repeat):
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    base, with_budget = timed(plain), timed(budgeted)
    print(f"{impl} sampler step, batch {B}, canvas {C}, vocab {V}, {a.dtype} on {dev}: {base:.1f} ms; with the "
          f"thinking budget's forced close: {with_budget:.1f} ms; ratio {with_budget / base:.3f}")


if __name__ == "__main__":
    main()
