"""What a JSON-schema union of objects costs to compile on a large vocabulary: pydantic's tagged union
`Cat | Dog | Fish` beside `list[int] | str` and `Optional[Cat | Dog]`, compiled cold (every automaton cache
emptied) with `token_dfa.unique_columns` (1-D uniques: how union_dfa and sequence_dfa dedupe symbol columns)
against the peer, the same compile with `torch.unique(dim=1)` in its place (how union_dfa did it before),
measured in the same run on the same vocabulary. The two must build the same automata (states and accepted
tokens compared), and a cached compile is timed too.

    python bench/union_compile.py [--vocab 65536] [--files 4000] [--repeat 2]

The vocabulary is a byte-level BPE trained here on the Python sources of the installed packages (no download),
standing in for a production tokenizer (bench/constraint_passes.py's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, Field

from canvaslm.sampling import token_dfa
from canvaslm.sampling.json_schema import JsonSchemaConstraint
from canvaslm.sampling.token_dfa import Vocab

sys.path.insert(0, str(Path(__file__).resolve().parent))
from constraint_passes import bpe  # noqa: E402


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=1, le=9)
    color: str


class Dog(BaseModel):
    kind: Literal["dog"]
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=1000)
    tricks: list[str]


class Fish(BaseModel):
    kind: Literal["fish"]
    meta: dict


class Pet(BaseModel):
    pet: Cat | Dog | Fish = Field(discriminator="kind")
    tags: list[int] | str
    other: Optional[Cat | Dog] = None


def dim1_unique(rows: torch.Tensor):
    """The peer: torch.unique over whole columns."""
    return torch.unique(rows, dim=1, return_inverse=True)


def cold(tok, schema) -> tuple[float, JsonSchemaConstraint]:
    cache = Vocab.of(tok).dfas
    with cache._lock:
        cache._items.clear()
        cache.bytes = 0
    t = time.perf_counter()
    c = JsonSchemaConstraint(schema, tok)
    return time.perf_counter() - t, c


def signature(c: JsonSchemaConstraint) -> list:
    """What each slot's automaton is, independent of how its symbols are numbered: states, and per state the
    number of live symbols and of allowed tokens."""
    out = []
    for p in c.pieces:
        if isinstance(p, tuple):
            d = p[1]
            out.append((p[0], d.num_states, int(d.accept.sum()), int((d.sym_of_token >= 0).sum()),
                        sorted((d.trans >= 0).sum(1).tolist())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--files", type=int, default=4000, help="Python files the BPE is trained on")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    t = time.perf_counter()
    tok = bpe(args.vocab, args.files)
    print(f"vocabulary {tok.vocab_size} (byte-level BPE, trained in {time.perf_counter() - t:.1f} s); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    Vocab.of(tok)
    schema = Pet.model_json_schema()
    ours, peer = [], []
    for _ in range(args.repeat):
        s, c_ours = cold(tok, schema)
        ours.append(s)
        token_dfa.unique_columns, saved = dim1_unique, token_dfa.unique_columns
        try:
            s, c_peer = cold(tok, schema)
            peer.append(s)
        finally:
            token_dfa.unique_columns = saved
    t = time.perf_counter()
    JsonSchemaConstraint(schema, tok)
    cached = time.perf_counter() - t
    a, b = statistics.median(ours), statistics.median(peer)
    print("| compile of Pet (cold) | seconds |")
    print("|---|---|")
    print(f"| torch.unique(dim=1) (peer) | {b:.2f} |")
    print(f"| unique_columns | {a:.2f} |")
    print(f"| cached (ours) | {cached:.3f} |")
    print(f"{b / a:.2f}x faster cold; same automata: {signature(c_ours) == signature(c_peer)}; slots (width, "
          f"states): {[(p[0], p[1].num_states) for p in c_ours.pieces if isinstance(p, tuple)]}")


if __name__ == "__main__":
    main()
