"""Standalone entry point of `canvaslm bench` (same flags):

    python bench/bench_step.py --shape small --device cpu --batches 1,2 --reference eager
"""

from __future__ import annotations

import argparse
import sys

from canvaslm.bench import add_parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_step.py")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as e:  # a bad flag or a device this machine lacks, named (as `canvaslm bench` does)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
