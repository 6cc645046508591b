"""What JSON-mode requests cost the other requests of a server: the engine with constraint host work (masks
and commit passes) on its worker thread, against the peer, the same engine running that work inside its
steps (`EngineConfig(constraint_worker=False)`, how it ran before), in the same run on the same model,
prompts, seeds and constraints.

    python bench/constraint_worker.py [--vocab 65536] [--plain 4] [--json 2] [--steps 8]

Plain requests and JSON-mode requests (`JsonObjectConstraint`, one 255-token slot) arrive together. The
vocabulary is a byte-level BPE trained in the run on the installed packages' Python sources (as
bench/constraint_passes.py does); the model is random (hidden 128, 3 layers, canvas 256) so the host work
weighs as it would next to a GPU's short steps. Printed: each kind's mean time to finish, and the wall
time; outputs must be equal.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from constraint_passes import bpe  # noqa: E402

from canvaslm.checkpoint import build_random_model  # noqa: E402
from canvaslm.config import DiffusionParams  # noqa: E402
from canvaslm.engine.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from canvaslm.sampling.json_any import JsonObjectConstraint  # noqa: E402
from canvaslm.shapes import model_config  # noqa: E402


def run(model, requests, worker: bool):
    engine = Engine(model, EngineConfig(max_batch=8, max_model_len=1024, constraint_worker=worker)).start()

    async def main():
        t0 = time.perf_counter()

        async def one(req):
            tokens, _ = await engine.run(req)
            return tokens, time.perf_counter() - t0

        return await asyncio.gather(*(one(r) for r in requests))

    try:
        t = time.perf_counter()
        out = asyncio.run(main())
        return out, time.perf_counter() - t
    finally:
        engine.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--files", type=int, default=3000, help="Python files the BPE is trained on")
    ap.add_argument("--plain", type=int, default=4)
    ap.add_argument("--json", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (at 2, BLAS splits rows and outputs "
                    "can depend on the batch, which the equality check would catch)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = bpe(a.vocab, a.files)
    V = tok.vocab_size
    cfg = model_config("tiny", vocab_size=V, hidden_size=128, canvas_length=256)
    model = build_random_model(cfg, device="cpu", dtype="float32", seed=0, std=0.5).eval()
    eos = (1,)  # the BPE's <eos>
    base = DiffusionParams(max_new_tokens=512, max_denoising_steps=a.steps, eos_token_ids=eos, pad_token_id=0)
    reqs = []
    for i in range(a.plain + a.json):
        is_json = i >= a.plain
        prompt = tuple(3 + (i * 7919 + j * 104729) % (V - 3) for j in range(32))
        params = base.replace(max_new_tokens=256) if is_json else base
        reqs.append(GenerationRequest(f"{'json' if is_json else 'plain'}{i}", prompt, params, i, eos,
                                      constraint=JsonObjectConstraint(tok, 255, "bench") if is_json else None))
    t = time.perf_counter()
    JsonObjectConstraint(tok, 255, "bench").canvas(0, 256, V)  # the automaton, built once per tokenizer
    print(f"vocabulary {V} (BPE), JSON automaton built in {time.perf_counter() - t:.1f} s; model hidden 128, "
          f"3 layers, canvas 256, float32, {torch.get_num_threads()} threads; {a.plain} plain requests "
          f"(2 canvases) + {a.json} JSON-mode requests, {a.steps} steps at most, all at once")
    results = {}
    for name, worker in (("host work inside the steps (peer)", False), ("host work on the worker", True)):
        results[name] = run(model, reqs, worker)
    outs = [[tokens for tokens, _ in out] for out, _ in results.values()]
    differ = [r.request_id for r, x, y in zip(reqs, *outs) if x != y]
    assert not differ, f"the two engines disagree on {differ}"
    print("| engine | plain requests: mean s to finish | JSON requests: mean s to finish | wall s |")
    print("|---|---|---|---|")
    peer = None
    for name, (out, wall) in results.items():
        plain = statistics.mean(t for _, t in out[:a.plain])
        js = statistics.mean(t for _, t in out[a.plain:]) if a.json else float("nan")
        peer = peer or plain
        print(f"| {name} | {plain:.2f} ({peer / plain:.2f}x the peer's speed) | {js:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
