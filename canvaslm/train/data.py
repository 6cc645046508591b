"""Training data: load (prompt_ids, response_ids) examples and order them deterministically.

Sources: a JSONL file of {"prompt_ids", "response_ids"} rows or {"prompt", "response"} texts (encoded
with the checkpoint's tokenizer), or a Python callable `module:function` returning a list of examples
(pairs, or dicts as in the JSONL). The order is a pure function of (seed, global example counter): step s
of a run with global batch size G uses examples number s*G ... s*G+G-1 of an endless stream of shuffled
epochs. Nothing about the order lives in a loader's state, so a resumed run sees exactly the examples it
would have seen, whatever the number of processes or gradient-accumulation micro-batches.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

import torch

Example = tuple[list[int], list[int]]


class DataError(ValueError):
    """A data source cannot be read or holds a malformed example."""


def _coerce(item, where: str, tokenizer) -> Example:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        prompt, response = item
    elif isinstance(item, dict) and "prompt_ids" in item and "response_ids" in item:
        prompt, response = item["prompt_ids"], item["response_ids"]
    elif isinstance(item, dict) and "prompt" in item and "response" in item:
        if tokenizer is None:
            raise DataError(f"{where}: text examples ('prompt'/'response') need a tokenizer; set `tokenizer:` "
                            "in the config or use a checkpoint that ships tokenizer.json")
        prompt = tokenizer.encode(item["prompt"])
        response = tokenizer.encode(item["response"], add_special_tokens=False)
    else:
        raise DataError(f"{where}: expected a (prompt_ids, response_ids) pair or a dict with "
                        f"'prompt_ids'/'response_ids' or 'prompt'/'response', got {str(item)[:80]!r}")
    try:
        prompt, response = [int(t) for t in prompt], [int(t) for t in response]
    except (TypeError, ValueError):
        raise DataError(f"{where}: token ids must be integers") from None
    if not prompt:
        raise DataError(f"{where}: empty prompt (at least one token is needed)")
    return prompt, response


def resolve_callable(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise DataError(f"data source {spec!r}: expected a .jsonl path or 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DataError(f"data source {spec!r}: cannot import ({e})") from None
    if not callable(fn):
        raise DataError(f"data source {spec!r}: {name} is not callable")
    return fn


def load_examples(spec: str, tokenizer=None, kwargs: dict | None = None, vocab_size: int | None = None) -> list[Example]:
    """Examples from a JSONL path or a `module:function` callable (called with **kwargs)."""
    if spec.endswith((".jsonl", ".json")) or Path(spec).exists():
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        out = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
                out.append(_coerce(item, f"{path}:{i}", tokenizer))
    else:
        items = resolve_callable(spec)(**(kwargs or {}))
        out = [_coerce(item, f"{spec}[{i}]", tokenizer) for i, item in enumerate(items)]
    if not out:
        raise DataError(f"data source {spec!r} holds no examples")
    if vocab_size is not None:
        for i, (p, r) in enumerate(out):
            bad = [t for t in p + r if not 0 <= t < vocab_size]
            if bad:
                raise DataError(f"data source {spec!r} example {i}: token ids {bad[:5]} outside the "
                                f"vocabulary [0, {vocab_size})")
    return out


def split_holdout(examples: list[Example], n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a fixed-seed random `n_eval` examples held out."""
    if n_eval <= 0:
        return examples, []
    if n_eval >= len(examples):
        raise DataError(f"eval_size={n_eval} leaves no training examples (only {len(examples)} in total)")
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(perm[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in perm[:n_eval]]


class ExampleStream:
    """Endless shuffled epochs; `indices(start, count)` are the dataset indices of stream items
    start..start+count-1 (a pure function of seed and position)."""

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [self._perm(i // self.n)[i % self.n] for i in range(start, start + count)]


__all__ = ["Example", "DataError", "load_examples", "split_holdout", "ExampleStream", "resolve_callable"]
