"""Training memory: chunked cross-entropy and gradient checkpointing, against the step that keeps every
activation and the whole [tokens, vocab] logits (the peer: what training did before), in the same run.

    python bench/grad_checkpointing.py [--shape small] [--batch 4] [--prompt 512] [--lora] [--threads 2]

A random model of the named shape takes training steps of the block-diffusion objective on random
examples (a `--prompt`-token prompt and a one-canvas answer): the peer (`ce_rows_per_chunk=0`), the
chunked cross-entropy (the default now), and that plus `gradient_checkpointing`. Each variant runs in
its own process, so its peak resident memory (the
kernel's max RSS, weights included) is its own. Printed: milliseconds per step (median of `--steps`
after one warm-up), the bytes autograd keeps for the backward (`trainer.kept_for_backward`), the peak
RSS, and the ratios; the losses must be equal.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = {"peer": "whole logits, every activation kept (peer)", "chunked": "chunked cross-entropy",
            "checkpointed": "chunked cross-entropy + gradient_checkpointing"}


def child(args) -> dict:
    from canvaslm.checkpoint import build_random_model
    from canvaslm.shapes import model_config
    from canvaslm.train.lora import LoRAConfig, apply_lora
    from canvaslm.train.objective import block_diffusion_loss, make_batch, set_trainable
    from canvaslm.train.trainer import kept_for_backward

    torch.set_num_threads(args.threads)
    cfg = model_config(args.shape, canvas_length=args.canvas)
    model = build_random_model(cfg, seed=0, std=0.02).train()
    if args.lora:
        torch.manual_seed(0)
        apply_lora(model, LoRAConfig(rank=16, alpha=32))
    else:
        set_trainable(model)
    model.gradient_checkpointing = args.child == "checkpointed"
    rows = 0 if args.child == "peer" else None
    rng = random.Random(0)
    examples = [([2] + [rng.randrange(3, cfg.vocab_size) for _ in range(args.prompt - 1)],
                 [rng.randrange(3, cfg.vocab_size) for _ in range(args.canvas - 1)]) for _ in range(args.batch)]
    batch = make_batch(examples, cfg.canvas_length, 0, cfg.eos_token_ids, "cpu", list(range(args.batch)))
    times, kept, losses = [], 0, []
    for _ in range(args.steps + 1):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        out, kept = kept_for_backward(model, lambda: block_diffusion_loss(model, batch, None,
                                                                                 ce_rows_per_chunk=rows))
        out.loss.backward()
        times.append(1e3 * (time.perf_counter() - t))
        losses.append(out.loss.item())
    return {"ms": statistics.median(times[1:]), "kept": kept, "loss": losses[-1],
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 16) instead of every weight")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    for name in ("batch", "prompt", "canvas", "steps", "threads"):  # before three processes start, not in each
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.child:
        print(json.dumps(child(args)))
        return
    res = {variant: run_child(variant) for variant in VARIANTS}
    peer = res["peer"]
    print(f"torch {torch.__version__}, cpu, {args.threads} threads; shape {args.shape}, "
          f"{'LoRA rank 16' if args.lora else 'full fine-tuning'}, batch {args.batch} x ({args.prompt} prompt + "
          f"{args.canvas} canvas) tokens, median of {args.steps} steps")
    print("| step | ms | kept for backward | peak RSS | vs the peer |")
    print("|---|---|---|---|---|")
    for variant, r in res.items():
        vs = "1.00x" if variant == "peer" else (f"{r['ms'] / peer['ms']:.2f}x time, {peer['kept'] / r['kept']:.1f}x "
                                                f"less kept, {peer['rss'] / r['rss']:.2f}x less peak RSS")
        print(f"| {VARIANTS[variant]} | {r['ms']:.0f} | {r['kept'] / 2**20:.0f} MiB | {r['rss'] / 2**20:.0f} MiB "
              f"| {vs} |")
    losses = [r["loss"] for r in res.values()]
    same = max(losses) - min(losses) <= 1e-5 * max(losses)
    print("losses: " + ", ".join(f"{x:.6f}" for x in losses) + (" (equal)" if same else " (DIFFERENT)"))


def run_child(variant: str) -> dict:
    """One variant's figures from its own process; a child that fails shows its stderr and the run exits 2
    (its output is captured for the JSON line, so an error would otherwise be a bare CalledProcessError)."""
    proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", variant], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        print(f"error: the {variant} variant's process exited {proc.returncode} (its stderr above)", file=sys.stderr)
        raise SystemExit(2)
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
