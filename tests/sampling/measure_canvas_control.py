"""Measurements for docs/canvas_control.md on a tiny random checkpoint (not a test; run by hand):

    python tests/sampling/measure_canvas_control.py [--seeds 20]

Prints JSON-schema validity and repair rates, the cost of constraints, and infill gap-candidate costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_json_schema import SCHEMAS  # noqa: E402

from canvaslm.llm import LLM, SamplingParams  # noqa: E402
from canvaslm.sampling.constraints import CanvasConstraint  # noqa: E402
from canvaslm.testing import make_tiny_checkpoint  # noqa: E402


def best_of(fn, n=3):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    llm = LLM(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny"), device="cpu", dtype="float32")

    # count slot parts whose masked argmax was already valid (commit kept it) vs repaired
    stats = {"kept": 0, "repaired": 0}
    orig = CanvasConstraint.commit

    def counting(self, k, ids, logits):
        new = orig(self, k, ids, logits)
        lay, C = self.layout(ids.shape[0]), ids.shape[0]
        for s in lay.slots:
            a, b = max(s.start, k * C), min(s.start + s.width, (k + 1) * C)
            if a < b:
                same = bool((new[a - k * C:b - k * C] == ids[a - k * C:b - k * C]).all())
                stats["kept" if same else "repaired"] += 1
        return new

    CanvasConstraint.commit = counting
    for name, schema in SCHEMAS.items():
        params = [SamplingParams(seed=s, max_denoising_steps=8, json_schema=schema) for s in range(args.seeds)]
        outs = llm.generate(["{"] * args.seeds, params)
        valid = 0
        for r in outs:
            try:
                jsonschema.validate(json.loads(r.text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        print(f"json_schema {name:20s} valid {valid}/{len(outs)}  tokens {len(outs[0].token_ids)}")
    print(f"value-slot parts kept as argmax {stats['kept']}, repaired by the automaton {stats['repaired']}")
    CanvasConstraint.commit = orig

    schema = SCHEMAS["flat"]
    n = len(llm.generate("{", SamplingParams(seed=0, json_schema=schema))[0].token_ids)
    t_free, _ = best_of(lambda: llm.generate("{", SamplingParams(seed=0, max_new_tokens=n, max_denoising_steps=8)))
    t_json, _ = best_of(lambda: llm.generate("{", SamplingParams(seed=0, max_denoising_steps=8, json_schema=schema)))
    print(f"latency {n} tokens, 8 steps: unconstrained {t_free * 1e3:.0f} ms, json_schema {t_json * 1e3:.0f} ms")

    p = SamplingParams(seed=0, max_denoising_steps=8, max_new_tokens=48)  # the widest gap, the suffix, EOS
    for gaps in ([8], [2, 4, 8, 16], [2, 4, 8, 16, 32]):
        t, r = best_of(lambda: llm.infill("def f(x):\n    ", "\n    return y", p, gaps=gaps))
        print(f"infill gaps {gaps}: {t * 1e3:.0f} ms, chose {r.gap}, decoder passes {r.decoder_passes}")
    chosen = {}
    for s in range(args.seeds):
        r = llm.infill("def f(x):\n    ", "\n    return y", SamplingParams(seed=s, max_denoising_steps=8,
                                                                          max_new_tokens=40))
        chosen[r.gap] = chosen.get(r.gap, 0) + 1
        assert r.text.endswith("\n    return y")
    print(f"infill chosen gaps over {args.seeds} seeds: {dict(sorted(chosen.items()))}")
    ends = sum(llm.generate("def f(x):\n    [suffix: return y]", SamplingParams(seed=s, max_new_tokens=40))[0]
               .text.rstrip().endswith("return y") for s in range(args.seeds))
    print(f"left-to-right with the suffix in the prompt ends with the suffix: {ends}/{args.seeds}")


if __name__ == "__main__":
    main()
