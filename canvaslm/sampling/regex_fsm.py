"""A regex's character automaton as plain data, compiled in this process or, with a deadline, in a child.

Compiling a pattern to a deterministic automaton can take time exponential in the pattern
(`[ab]*a[ab]{12}` has 2**13 states and takes seconds in `interegular`; `{15}` minutes), and a Python
thread cannot be stopped, so a server compiles in a child process (`python -m` this module) that it kills
at the deadline. This module imports neither torch nor the rest of the package, so the child starts in a
fraction of a second (~0.1-0.3 s measured, with interegular's import).
At most `MAX_CONCURRENT` children run at once; a compile that cannot get a turn within `TURN_WAIT_S` (or its
deadline, if sooner) is refused as busy instead of holding its thread while the others run out their time.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MAX_REPEAT = 1000  # largest {n,m} bound (interegular unrolls it into states)
MAX_NESTED = 5000  # largest product of nested bounds (`([a-z]{1,100}\.){1,20}`: 2000 copies, 0.5 s; 5000: ~2.5 s)
MAX_STATES = 20000  # character-automaton states (the token automaton has the same limit)
MAX_CONCURRENT = 2  # compile children at once (per server process)
TURN_WAIT_S = 1.0  # longest wait for a free turn: a child's usual run is ~0.1-0.3 s, a slow one the whole limit
# Python's `re` \s for str patterns (str.isspace); interegular's own \s is ASCII " \t\n\r\f\v" only
WHITESPACE = frozenset("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                       "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# \w and \d are ASCII in interegular (and ECMA) but Unicode in Python's re and in pydantic's engine, so their
# complements differ: \W and \D here are only the characters every reading puts outside (ASCII and whitespace);
# a negated class holding \w, \W, \d or \D is refused
_ASCII_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
NON_WORD = frozenset(map(chr, range(128))) - _ASCII_WORD | WHITESPACE
NON_DIGIT = frozenset(map(chr, range(128))) - frozenset("0123456789") | WHITESPACE

_turns = threading.BoundedSemaphore(MAX_CONCURRENT)


class RegexCompileError(ValueError):
    """The pattern cannot be compiled (unsupported syntax, over a limit, or over the deadline)."""


class RegexCompileBusy(RuntimeError):
    """Every compile slot stayed taken until the deadline (a server answers 503: try again)."""


@dataclass(frozen=True)
class CharFSM:
    """Deterministic automaton over character classes: `classes[ch]` (or `other` for any other character,
    None if other characters are never allowed), `trans[state][cls]`, `initial`, `finals`."""

    classes: dict
    other: int | None
    trans: dict
    initial: int
    finals: frozenset
    num_states: int

    def classify(self, ch: str):
        return self.classes.get(ch, self.other)

    def step(self, state, cls):
        return self.trans.get(state, {}).get(cls)


_META = set(".^$*+?{}[]()|\\-")


def _literal(cp: int) -> str:
    """The code point as pattern text that matches just it (in or out of a class)."""
    c = chr(cp)
    return "\\" + c if c in _META else c


def normalized(pattern: str) -> str:
    """The pattern as `interegular` reads it: the whole output is one match, so anchors at the start (^, \\A)
    and end ($, \\Z) of the pattern or of a top-level alternative are dropped (xgrammar ignores them too);
    \\uXXXX and \\UXXXXXXXX become the character. Anchors anywhere else raise RegexCompileError."""
    out, i, depth, in_class, negated = [], 0, 0, False, False

    def branch_end():
        # drop a trailing $ / \Z of the top-level branch that ends here
        for tail in ("$", "\\Z"):
            if out and out[-1] == tail:
                out.pop()
                return

    at_start = True  # at the start of a top-level branch (anchors there are dropped)
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if e in "uU":
                n = 4 if e == "u" else 8
                digits = pattern[i + 2:i + 2 + n]
                if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise RegexCompileError(f"\\{e} needs {n} hex digits (at {i})")
                cp = int(digits, 16)
                if cp > 0x10FFFF:
                    raise RegexCompileError(f"\\{e}{digits} is not a Unicode code point")
                out.append(_literal(cp))
                i += 2 + n
            elif e in "wWdD" and in_class and negated:
                raise RegexCompileError(f"\\{e} in a negated class ([^\\{e}...]) is read differently by ASCII and "
                                        "Unicode regex engines (é is a word character to one, not the other); list the "
                                        "characters instead")
            elif e in "AZ" and not in_class:
                if not (e == "A" and at_start) and not (e == "Z" and _top_end(pattern, i + 2, depth)):
                    raise RegexCompileError(f"the anchor \\{e} is only supported at the start (\\A) or end (\\Z) of "
                                            "the pattern: the whole output is matched")
                if e == "Z":
                    out.append("\\Z")
                i += 2
            else:
                out.append(c + e)
                i += 2
            at_start = False
            continue
        if in_class:
            in_class = c != "]"
            out.append(c)
        elif c == "[":
            in_class, negated = True, False
            out.append(c)
            if i + 1 < len(pattern) and pattern[i + 1] == "^":
                out.append("^")
                negated = True
                i += 1
            if i + 1 < len(pattern) and pattern[i + 1] == "]":  # a leading ] is a literal
                out.append("\\]")
                i += 1
        elif c == "^":
            if not at_start:
                raise RegexCompileError("the anchor ^ is only supported at the start of the pattern (or of a top-level "
                                        "alternative): the whole output is matched")
            i += 1
            continue
        elif c == "$":
            if not _top_end(pattern, i + 1, depth):
                raise RegexCompileError("the anchor $ is only supported at the end of the pattern (or of a top-level "
                                        "alternative): the whole output is matched")
            out.append("$")
        else:
            if c == "(":
                depth += 1
            elif c == ")":
                depth = max(0, depth - 1)
            elif c == "|" and depth == 0:
                branch_end()
                out.append(c)
                i += 1
                at_start = True
                continue
            out.append(c)
        at_start = False
        i += 1
    branch_end()
    return "".join(out)


def _top_end(pattern: str, j: int, depth: int) -> bool:
    """Whether position j ends a top-level branch (the pattern's end, or a '|' outside any group)."""
    return depth == 0 and (j == len(pattern) or pattern[j] == "|")


_QUANTIFIER = re.compile(r"\{(\d*)(,(\d*))?\}\??|[*+?]\??")  # as interegular reads them (no spaces)


def check_repeats(source: str) -> None:
    """RegexCompileError if a {n,m} bound of the (normalized) pattern is over MAX_REPEAT, or a repeated part unrolls
    past MAX_NESTED copies of its atoms: interegular unrolls `(a{100}){100}` and `a{100}{100}` into 10000 copies and
    `(a{1000}b{1000}){5}` into 10000 (a group holds the sum of its parts, alternatives included), and its time
    grows faster than the copies (`a{,5000}` 2.5 s, `a{,20000}` 90 s). `{,n}` is `{0,n}` as in Python; braces in
    a class (`[{5}]`) or escaped are characters."""
    stack = [(0, "")]  # per open group: (atoms it unrolls to, its costliest part's quantifiers)
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "(":
            if source.startswith("(?#", i):  # a comment: skip it whole
                end = source.find(")", i)
                i = n if end < 0 else end + 1
                continue
            stack.append((0, ""))
            i += 1
            if source.startswith("?:", i):  # a group's own syntax is no atom
                i += 2
            elif source.startswith("?P<", i) and source.find(">", i) > 0:
                i = source.find(">", i) + 1
            continue
        if c == "|":  # alternatives add up: interegular builds each
            i += 1
            continue
        if c == ")" and len(stack) > 1:
            inner = stack.pop()
            inner = (max(inner[0], 1), inner[1])  # `()` still counts as one part
            i += 1
        else:  # one atom: an escape, a class, or a character
            inner = (1, "")
            if c == "\\":
                i += 2
            elif c == "[":
                j = i + 1
                j += source[j:j + 1] == "^"
                j += source[j:j + 1] == "]"  # a leading ] is a character
                while j < n and source[j] != "]":
                    j += 2 if source[j] == "\\" else 1
                i = j + 1
            else:
                i += 1
        count, names = inner
        while (m := _QUANTIFIER.match(source, i)) is not None:  # interegular takes `a{2}{3}` as six a's
            i = m.end()
            if not m.group(0).startswith("{"):
                continue  # * + ? unroll nothing
            lo = int(m.group(1) or 0)
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if max(lo, hi or 0) > MAX_REPEAT:
                raise RegexCompileError(f"repetition {m.group(0)} is over the limit of {MAX_REPEAT}")
            if hi is not None and hi < lo:
                raise RegexCompileError(f"repetition {m.group(0)} has its minimum repeat greater than its maximum")
            count, names = count * max(lo, hi or 0, 1), names + m.group(0)
            if count > MAX_NESTED:
                raise RegexCompileError(f"nested repetitions {names} unroll into {count} copies of their atoms, over "
                                        f"the limit of {MAX_NESTED}")
        total, costliest = stack[-1]
        stack[-1] = (total + count, names if count > 1 and len(names) >= len(costliest) else costliest)


def char_fsm(pattern: str) -> CharFSM:
    """Compile in this process (no deadline); raises RegexCompileError naming the problem."""
    try:
        import interegular
        from interegular import patterns
        from interegular.fsm import anything_else
    except ImportError:  # pragma: no cover - a dependency of the package
        raise RegexCompileError("the 'interegular' package is needed for regex output") from None
    patterns._CHAR_GROUPS.update(s=patterns._CharGroup(WHITESPACE, False), S=patterns._CharGroup(WHITESPACE, True),
                                 W=patterns._CharGroup(NON_WORD, False), D=patterns._CharGroup(NON_DIGIT, False))
    try:
        source = normalized(pattern)
    except RegexCompileError as e:
        raise RegexCompileError(f"cannot compile {pattern!r}: {e}") from None
    try:
        check_repeats(source)
    except RegexCompileError as e:
        raise RegexCompileError(f"cannot compile {pattern!r}: {e}") from None
    try:
        parsed = interegular.parse_pattern(source)
        if _has_lookaround(parsed, patterns._NonCapturing):
            raise RegexCompileError(f"cannot compile {pattern!r} to an automaton: lookarounds ((?=...), (?!...), "
                                    "(?<=...), (?<!...)) are not supported")
        fsm = parsed.to_fsm()
    except RegexCompileError:
        raise
    except Exception as e:  # interegular raises its own error types for unsupported syntax
        raise RegexCompileError(f"cannot compile {pattern!r} to an automaton ({type(e).__name__}: {e})") from None
    if len(fsm.states) > MAX_STATES:
        raise RegexCompileError(f"{pattern!r} needs {len(fsm.states)} automaton states, over the limit of "
                                f"{MAX_STATES}")
    mapping = dict(fsm.alphabet._symbol_mapping)  # char -> class; `anything_else` is a process-local sentinel
    other = mapping.pop(anything_else, None)
    return CharFSM({str(c): int(k) for c, k in mapping.items()}, other,
                   {int(s): {int(k): int(t) for k, t in row.items()} for s, row in fsm.map.items()},
                   int(fsm.initial), frozenset(int(s) for s in fsm.finals), len(fsm.states))


def _has_lookaround(node, lookaround_type) -> bool:
    """Whether interegular's parse tree holds a lookahead or lookbehind (it would build a different language)."""
    if isinstance(node, lookaround_type):
        return True
    if isinstance(node, tuple):
        return any(_has_lookaround(n, lookaround_type) for n in node)
    if dataclasses.is_dataclass(node):
        return any(_has_lookaround(getattr(node, f.name), lookaround_type) for f in dataclasses.fields(node))
    return False


def _fields(fsm: CharFSM) -> dict:
    return {"classes": fsm.classes, "other": fsm.other, "trans": fsm.trans, "initial": fsm.initial,
            "finals": sorted(fsm.finals), "num_states": fsm.num_states}


def _main() -> None:
    """The child: a pattern on stdin -> a pickled ("ok", fields) or ("error", message) on stdout."""
    pattern = sys.stdin.buffer.read().decode("utf-8")
    try:
        answer = ("ok", _fields(char_fsm(pattern)))
    except RegexCompileError as e:
        answer = ("error", str(e))
    except Exception as e:  # noqa: BLE001 - report anything to the parent rather than die silently
        answer = ("error", f"cannot compile {pattern!r} ({type(e).__name__}: {e})")
    pickle.dump(answer, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)


def char_fsm_with_deadline(pattern: str, timeout: float) -> CharFSM:
    """Compile in a child process; kill it and raise RegexCompileError after `timeout` seconds (counting
    the wait for a turn, which raises RegexCompileBusy after TURN_WAIT_S or the timeout, the sooner)."""
    start = time.monotonic()
    try:  # refuse what is over a limit at once, without a child (or a turn) to find it out
        check_repeats(normalized(pattern))
    except RegexCompileError as e:
        raise RegexCompileError(f"cannot compile {pattern!r}: {e}") from None
    if not _turns.acquire(timeout=min(timeout, TURN_WAIT_S)):
        raise RegexCompileBusy(f"{MAX_CONCURRENT} regex compiles are already running; try again")
    try:
        # A fresh interpreter running this module (not multiprocessing, which re-imports the caller's main
        # script and would fork a process that has threads). It must find the package wherever it is.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.Popen([sys.executable, "-m", __spec__.name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            out, err = proc.communicate(pattern.encode("utf-8"), max(0.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RegexCompileError(f"compiling {pattern!r} took longer than the limit of {timeout:g} s "
                                    "(an automaton can be exponential in the pattern); simplify it") from None
    finally:
        _turns.release()
    try:
        status, value = pickle.loads(out)
    except Exception:  # noqa: BLE001 - no answer: it crashed (out of memory, killed...)
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise RegexCompileError(f"the compiler of {pattern!r} exited with code {proc.returncode} before "
                                f"answering {tail[0]}".rstrip()) from None
    if status != "ok":
        raise RegexCompileError(value)
    value["finals"] = frozenset(value["finals"])
    return CharFSM(**value)


__all__ = ["CharFSM", "check_repeats", "char_fsm", "char_fsm_with_deadline", "RegexCompileError", "RegexCompileBusy",
           "MAX_REPEAT", "MAX_NESTED", "MAX_STATES", "MAX_CONCURRENT"]


if __name__ == "__main__":
    _main()
