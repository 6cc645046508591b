"""What top_k / top_p / min_p, and the frequency / presence / repetition penalties, add to one denoising
sampling step at the full model's vocabulary, against the peer measured in the same run: the same step
with no cut and no penalty (what every request paid before they existed).

    python bench/sampling_cuts.py [--vocab 262144] [--canvas 256] [--batch 1] [--repeat 3] [--device cpu]

Logits are random, shaped like a trained model's (a few likely tokens over a long tail, softcapped at
30) so nuclei are small, as they are in practice; `--flat` makes them flat, the worst case for top_p
(every nucleus is larger than the candidate set and rows are sorted whole). On CUDA the step is the
fused one (the sampler's choice there); on the CPU the reference step (`--sampler-impl` picks another:
the engine's CPU default is now the inverse-CDF step, `cdf`). A penalty case times the
penalty pass (sampling.penalties, with a draft: a mid-canvas step; 512 prompt and 512 committed output
tokens) plus the uncut step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from canvaslm.bench import add_sampler_impl_arg, exit_unless_device, step_impl
from canvaslm.config import DiffusionParams
from canvaslm.sampling.penalties import penalty_state
from canvaslm.sampling.samplers import CanvasState, SamplerParams, entropy_bound_step
from canvaslm.sampling.stopping import new_history

CASES = {"no cut (peer)": {}, "top_k=64": {"top_k": 64}, "top_p=0.95": {"top_p": 0.95},
         "top_k=64, top_p=0.95 (Gemma's)": {"top_k": 64, "top_p": 0.95}, "min_p=0.05": {"min_p": 0.05},
         "frequency+presence penalty": {"frequency_penalty": 0.3, "presence_penalty": 0.3},
         "repetition_penalty=1.1": {"repetition_penalty": 1.1},
         "all three penalties": {"frequency_penalty": 0.3, "presence_penalty": 0.3, "repetition_penalty": 1.1}}


def logits_like_a_model(B, C, V, flat, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    if flat:
        x = torch.randn(B, C, V, generator=g, device=device) * 0.1
    else:  # a long tail plus a handful of strong candidates per position
        x = torch.randn(B, C, V, generator=g, device=device) * 1.5
        top = torch.randint(0, V, (B, C, 8), generator=g, device=device)
        x.scatter_add_(2, top, 14 + 6 * torch.rand(B, C, 8, generator=g, device=device))
    return (torch.tanh(x / 30) * 30).to(torch.bfloat16 if device != "cpu" else torch.float32)


def time_step(logits, kw, repeat, device, impl):
    B, C, V = logits.shape
    p = SamplerParams.build([DiffusionParams(**kw)] * B, device)
    st = CanvasState(torch.zeros(B, C, dtype=torch.long, device=device), torch.zeros(B, C, dtype=torch.long,
                     device=device), None, torch.zeros(B, dtype=torch.bool, device=device),
                     new_history(B, 1, C, device), p.n_steps.clone())
    seeds = torch.arange(B, device=device) + 1
    gens = seeds if impl == "fused" else torch.Generator(device=device).manual_seed(1)
    g = torch.Generator(device=device).manual_seed(2)
    pens = [penalty_state(p_, torch.randint(0, V, (512,), generator=g, device=device).tolist(), (1,), V, device)
            for p_ in [DiffusionParams(**kw)] * B]
    for pen in pens:
        if pen is not None:
            pen.commit(torch.randint(0, V, (512,), generator=g, device=device))
    draft = torch.randint(0, V, (B, C), generator=g, device=device)
    times = []
    for i in range(repeat + 1):
        x = logits.clone() if pens[0] is not None else logits  # the pass is in place
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b, pen in enumerate(pens):
            if pen is not None:
                pen.apply(x[b], draft[b])
        entropy_bound_step(x, st, p, gens, V, impl=impl)
        if device != "cpu":
            torch.cuda.synchronize()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--flat", action="store_true", help="flat logits: top_p's worst case")
    add_sampler_impl_arg(ap)
    a = ap.parse_args()
    exit_unless_device(a.device)  # `error: ...`, exit 2: not a traceback
    impl = step_impl(a.sampler_impl, a.device)
    torch.manual_seed(0)
    logits = logits_like_a_model(a.batch, a.canvas, a.vocab, a.flat, a.device)
    print(f"sampling step, logits [{a.batch}, {a.canvas}, {a.vocab}] {logits.dtype} on {a.device}"
          f"{' (flat)' if a.flat else ''}, {impl} step, median of {a.repeat}")
    base = None
    for name, kw in CASES.items():
        t = time_step(logits, kw, a.repeat, a.device, impl)
        base = base or t
        print(f"  {name:32s} {t * 1000:9.1f} ms  {t / base:5.2f}x the peer")


if __name__ == "__main__":
    main()
