"""Regex output: the text is a whole match of a regular expression (dates, codes, phone numbers...).

The pattern compiles to a character automaton (the `interegular` package, see `regex_fsm`), which
`token_dfa.char_dfa` lifts to tokens; an EOS symbol is added that leaves any accepting state for a final
state that only takes more EOS. One slot of `width` tokens then holds a match followed by EOS padding,
and a pinned EOS follows it: the output is cut at the first EOS, so its text is the match (vLLM's
`guided_regex`). Python's `re` syntax, less what a finite automaton cannot express (backreferences,
lookarounds), which is refused by name. A DFA can be exponential in the pattern, so `compile_timeout`
bounds the whole compile: the character automaton is built in a child process killed at the deadline,
and lifting it to tokens stops at the same deadline (the server always passes one; the Python API and
the CLI compile in-process without one unless asked).
"""

from __future__ import annotations

import time

import torch

from .constraints import ConstraintError, OneSlotConstraint, Slot, TokenDFA, output_eos
from .regex_fsm import MAX_REPEAT, MAX_STATES, CharFSM, RegexCompileError, char_fsm, char_fsm_with_deadline
from .token_dfa import Vocab, char_dfa

DEFAULT_TOKENS = 64  # slot width when the request gives no max_tokens


def _token_automaton(vocab: Vocab, pattern: str, field: str, timeout: float | None) -> TokenDFA:
    key = ("regex", pattern)
    hit = vocab.dfas.get(key)
    if hit is not None:  # compiled lately (for this tokenizer): no child, no deadline
        return hit
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        fsm = char_fsm(pattern) if timeout is None else char_fsm_with_deadline(pattern, timeout)
        missing = unwritable_chars(vocab, fsm)
        if missing:
            shown = ", ".join(map(repr, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise RegexCompileError(f"no token of this tokenizer writes the character(s) {shown} (a byte-level "
                                    "tokenizer may spell a character only with partial UTF-8 byte tokens, which "
                                    f"constrained output cannot use), so {pattern!r} cannot be written as asked")
        return char_dfa(vocab, key, fsm.classify, fsm.initial, fsm.step, fsm.finals.__contains__, deadline)
    except RegexCompileError as e:
        raise ConstraintError(f"{field}: {e}") from None
    except ConstraintError as e:
        if deadline is not None and time.monotonic() > deadline:
            raise ConstraintError(f"{field}: compiling {pattern!r} took longer than the limit of {timeout:g} s "
                                  f"({e}); simplify it") from None
        raise ConstraintError(f"{field}: {e}") from None


def unwritable_chars(vocab: Vocab, fsm: CharFSM) -> list:
    """The characters the pattern names (its character classes) that it could use on the way to a match, in a
    class no token writes any character of: sorted. Constrained output writes whole characters only, so such
    a character would silently drop out of the language (`"ë"|"x"` always writing x) or leave none."""
    classes = {fsm.classify(c) for c in vocab.chars} - {None}  # classes some token writes a character of
    reach, todo = {fsm.initial}, [fsm.initial]
    while todo:
        for t in fsm.trans.get(todo.pop(), {}).values():
            if t not in reach:
                reach.add(t)
                todo.append(t)
    back: dict = {}
    for s, row in fsm.trans.items():
        for t in row.values():
            back.setdefault(t, set()).add(s)
    live, todo = set(fsm.finals), list(fsm.finals)  # states a match can still be finished from
    while todo:
        for s in back.get(todo.pop(), ()):
            if s not in live:
                live.add(s)
                todo.append(s)
    needed = {k for s in reach for k, t in fsm.trans.get(s, {}).items() if t in live and k not in classes}
    return sorted(c for c, k in fsm.classes.items() if k in needed)


def with_eos_padding(dfa: TokenDFA, eos: int) -> TokenDFA:
    """The same automaton plus an EOS symbol: accepting state --EOS--> a final state --EOS--> itself."""
    S, G = dfa.trans.shape
    sym = dfa.sym_of_token.clone()
    if eos >= sym.numel():
        sym = torch.cat([sym, sym.new_full((eos + 1 - sym.numel(),), -1)])
    sym[eos] = G
    trans = torch.full((S + 1, G + 1), -1, dtype=torch.long)
    trans[:S, :G] = dfa.trans
    trans[:S, G] = torch.where(dfa.accept, S, -1)
    trans[S, G] = S
    return TokenDFA(sym, trans, dfa.start, torch.cat([dfa.accept, torch.tensor([True])]))


class PaddedSlotConstraint(OneSlotConstraint):
    """One slot of `width` tokens holding a value of `dfa` then EOS padding, then a pinned EOS (regex,
    grammar and JSON-mode output); ConstraintError `no_fit` when no value fits in the slot, or `no_value`
    (if given) when the automaton accepts no value at any width."""

    def __init__(self, dfa: TokenDFA, width: int, eos: int, no_fit: str, no_value: str | None = None):
        super().__init__(with_eos_padding(dfa, eos), width, eos)
        if not bool(self.coreach_of(Slot(0, width, self.dfa))[width][self.dfa.start]):
            if no_value is not None and self._fewest_tokens(None) is None:
                raise ConstraintError(no_value)
            raise ConstraintError(no_fit)

    def shortest(self) -> int:
        """The fewest tokens a value takes (its EOS padding not counted): the narrowest slot that holds one."""
        n = self._fewest_tokens(self.width)
        return self.width if n is None else n  # not reached: the constructor checked that a value fits

    def _fewest_tokens(self, most: int | None) -> int | None:
        """Tokens of the shortest value, looking at most `most` deep (None: until no new state); None if none."""
        trans, accept = self.dfa.trans, self.dfa.accept
        seen = torch.zeros(trans.shape[0], dtype=torch.bool)
        seen[self.dfa.start] = True
        frontier, n = seen.clone(), 0
        while bool(frontier.any()) and (most is None or n <= most):  # breadth first: n tokens from the start
            if (frontier & accept).any():
                return n
            reached = trans[frontier].flatten()
            frontier = torch.zeros_like(seen)
            frontier[reached[reached >= 0]] = True
            frontier &= ~seen
            seen |= frontier
            n += 1
        return None


class RegexConstraint(PaddedSlotConstraint):
    def __init__(self, pattern, tokenizer, width: int = DEFAULT_TOKENS, field: str = "regex",
                 compile_timeout: float | None = None):
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError(f"{field} must be a non-empty string")
        if not isinstance(width, int) or width < 1:
            raise ConstraintError(f"{field}: the output needs room for at least one token, got {width}")
        eos = output_eos(tokenizer, field)
        self.pattern = pattern
        dfa = _token_automaton(Vocab.of(tokenizer), pattern, field, compile_timeout)
        if bool(dfa.accept[dfa.start]) and not bool((dfa.trans[dfa.start] >= 0).any()):
            raise ConstraintError(f"{field}: {pattern!r} matches only the empty string; constrained output needs "
                                  "at least one character")
        super().__init__(dfa, width, eos, f"{field}: no match of {pattern!r} fits in {width} tokens (with EOS "
                                          "padding); raise max_tokens, or check that the pattern can match",
                         f"{field}: no sequence of this tokenizer's tokens spells a match of {pattern!r}, at any "
                         "length (constrained output writes whole characters: one that a tokenizer spells only "
                         "with partial UTF-8 byte tokens, or only inside longer tokens, cannot be written)")


__all__ = ["RegexConstraint", "PaddedSlotConstraint", "DEFAULT_TOKENS", "MAX_REPEAT", "MAX_STATES",
           "unwritable_chars", "with_eos_padding"]
