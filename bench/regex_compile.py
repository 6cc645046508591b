"""What the server's bounded regex compile costs: the character automaton built in a child interpreter
(`sampling.regex_fsm.char_fsm_with_deadline`, what `guided_regex` uses) against the same compile in this
process (its peer, measured in the same run), and how fast an exponential pattern is refused.

    python bench/regex_compile.py [--repeats 5] [--timeout 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import time

from canvaslm.sampling.regex_fsm import RegexCompileError, char_fsm, char_fsm_with_deadline

PATTERNS = [r"\d{3}-\d{4}", r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8})?",
            r"[ab]*a[ab]{10}"]
EXPONENTIAL = r"[ab]*a[ab]{16}"  # 2**17 DFA states: minutes in-process


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1.0)
    args = ap.parse_args()
    print("| pattern | DFA states | in-process (ms) | child (ms) | child / in-process |")
    print("|---|---|---|---|---|")
    for p in PATTERNS:
        here = _median(lambda: char_fsm(p), args.repeats)
        child = _median(lambda: char_fsm_with_deadline(p, 60.0), args.repeats)
        cell = p.replace("|", "\\|")  # a table cell
        print(f"| `{cell}` | {char_fsm(p).num_states} | {here * 1e3:.1f} | {child * 1e3:.0f} | {child / here:.1f}x |")
    print()
    t = time.perf_counter()
    try:
        char_fsm_with_deadline(EXPONENTIAL, args.timeout)
        print(f"`{EXPONENTIAL}` compiled within {args.timeout} s (unexpected)")
    except RegexCompileError:
        print(f"`{EXPONENTIAL}` refused after {time.perf_counter() - t:.2f} s (limit {args.timeout} s)")


if __name__ == "__main__":
    main()
