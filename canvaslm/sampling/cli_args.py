"""`canvaslm generate` flags for canvas control: --json-schema, --json-object, --choice, --regex, --grammar,
--pin, --suffix (infilling), --gaps; and the sampling cuts --top-k, --top-p, --min-p and penalties
--frequency-penalty, --presence-penalty, --repetition-penalty, and the latency budget --max-time
(generate and chat)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pin(text: str) -> tuple:
    pos, sep, value = text.partition(":")
    try:
        off = int(pos)
    except ValueError:
        off = -1
    if not sep or off < 0 or value == "":
        raise argparse.ArgumentTypeError(f"--pin must be OFFSET:TEXT with a non-negative offset, got {text!r}")
    return off, value


def _gaps(text: str) -> list:
    try:
        gaps = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        gaps = []
    if not gaps or min(gaps) < 0:
        raise argparse.ArgumentTypeError(f"--gaps must be comma-separated non-negative integers, got {text!r}")
    return gaps


def add_sampling_args(p: argparse.ArgumentParser):
    """--top-k, --top-p, --min-p (sampling.truncation) and the penalties (sampling.penalties);
    `sampling_params(args)` gives SamplingParams' fields."""
    p.add_argument("--top-k", type=int, default=None, help="sample each position from its k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample each position from its nucleus of this mass")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens under this share of the position's most likely token's probability")
    p.add_argument("--frequency-penalty", type=float, default=None,
                   help="in [-2, 2]: minus this for each time a token is already in the output so far")
    p.add_argument("--presence-penalty", type=float, default=None,
                   help="in [-2, 2]: minus this once a token is already in the output so far")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="in [0.01, 100]: shrink prompt and output-so-far tokens' logits by this factor (1: off)")
    p.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                   help="latency budget: after this many seconds of denoising, the canvas in progress is "
                        "committed as it stands and is the last")
    p.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="at most N tokens in the reply's thought channel, then it is closed and the answer follows")


def sampling_params(args) -> dict:
    return {"top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "frequency_penalty": args.frequency_penalty, "presence_penalty": args.presence_penalty,
            "repetition_penalty": args.repetition_penalty, "max_time": args.max_time,
            "thinking_token_budget": args.thinking_budget}


def add_constraint_args(p: argparse.ArgumentParser):
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain the output to JSON valid under this JSON schema file")
    p.add_argument("--json-object", action="store_const", const=True, default=None,
                   help="JSON mode: the output is one JSON object (no schema)")
    p.add_argument("--choice", metavar="TEXT", action="append", default=None,
                   help="the output is exactly one of the --choice texts (repeat it for each choice)")
    p.add_argument("--regex", metavar="PATTERN", default=None,
                   help="the output is a whole match of this regular expression")
    p.add_argument("--grammar", metavar="FILE", default=None,
                   help="the output is in this GBNF grammar's language (llama.cpp's format, from `root`)")
    p.add_argument("--pin", metavar="OFFSET:TEXT", type=_pin, action="append", default=None,
                   help="pin TEXT's tokens at this output token offset (repeatable)")
    p.add_argument("--suffix", default=None,
                   help="infill: generate the text between --prompt (prefix) and this suffix")
    p.add_argument("--gaps", type=_gaps, default=None,
                   help="infill: candidate middle lengths in tokens, e.g. 4,8,16 (default: powers of two and the whole budget)")


def _read_text(flag: str, path: str) -> str:
    """A flag's file as UTF-8 text; a ValueError naming the flag and the file when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text ({e})") from None


def constraint_params(args, llm) -> dict:
    """SamplingParams keyword arguments for the constraint flags."""
    flags = (("--json-schema", args.json_schema), ("--json-object", args.json_object), ("--choice", args.choice),
             ("--regex", args.regex), ("--grammar", args.grammar), ("--pin", args.pin), ("--suffix", args.suffix))
    given = [f for f, v in flags if v is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} cannot be combined: each constrains the whole output")
    if args.choice:
        return {"choice": tuple(args.choice)}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.grammar is not None:
        return {"grammar": _read_text("--grammar", args.grammar)}
    if args.json_object:
        return {"json_object": True}
    if args.json_schema:
        try:
            schema = json.loads(_read_text("--json-schema", args.json_schema))
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema {args.json_schema}: not valid JSON ({e})") from e
        return {"json_schema": schema}
    if args.pin:
        from .constraints import PinnedConstraint, pins_from_text

        if llm.tokenizer is None:
            raise ValueError(f"{llm.model_dir} has no tokenizer.json, so --pin TEXT is not available")
        spans = {}
        for off, text in args.pin:
            if off in spans:
                raise ValueError(f"--pin {off}:{spans[off]} and --pin {off}:{text} pin the same offset; give one")
            spans[off] = text
        pins = {}
        for off, text in spans.items():
            try:  # text the tokenizer cannot encode, or that encodes to nothing
                pins.update(pins_from_text(llm.tokenizer, {off: text}))
            except ValueError as e:
                raise ValueError(f"--pin {off}:{text}: {e}") from None
        last = max(off + len(ids) for off, ids in pins.items())
        return {"constraint": PinnedConstraint(pins, ban_ids=llm.eos_ids, ban_until=last)}
    return {}
