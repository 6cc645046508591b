"""Shared pieces of the trainer tests: a reversal task and a tiny from-scratch config."""

from __future__ import annotations

import json
import random
from pathlib import Path

# the "tiny" shape made smaller still: every trainer test builds one, so keep it cheap
SMALL = {"num_experts": 4, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16}
TINY_INIT = {"shape": "tiny", "canvas_length": 8, "vocab_size": 32, "seed": 0, **SMALL}


def reversal_examples(n: int = 64, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randint(5, 31) for _ in range(rng.randint(3, 9))]
        out.append(([2] + p, p[::-1]))
    return out


def write_jsonl(path: Path, examples) -> Path:
    path.write_text("".join(json.dumps({"prompt_ids": p, "response_ids": r}) + "\n" for p, r in examples))
    return path


def tiny_config(tmp_path: Path, **kw) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "data.jsonl", reversal_examples())
    cfg = dict(out_dir=str(tmp_path / "run"), max_steps=4, model={"init": dict(TINY_INIT)},
               data={"train": str(data), "eval_size": 8}, lr=3e-3, warmup_steps=1, batch_size=4, progress=False,
               plot=False)
    cfg.update(kw)
    return cfg


def vision_tensors(checkpoint_dir: Path) -> dict:
    """The vision tower tensors a checkpoint directory's safetensors files hold, by name."""
    from safetensors import safe_open

    out = {}
    for f in Path(checkpoint_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys() if "vision" in k})
    return out
