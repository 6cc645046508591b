"""Regex output: the text is a whole match of a regular expression (dates, codes, phone numbers...).

The pattern compiles to a character automaton (the `interegular` package), which `token_dfa.char_dfa`
lifts to tokens; an EOS symbol is added that leaves any accepting state for a final state that only
takes more EOS. One slot of `width` tokens then holds a match followed by EOS padding, and a pinned EOS
follows it: the output is cut at the first EOS, so its text is the match (vLLM's `guided_regex`). Python's
`re` syntax, less what a finite automaton cannot express (backreferences, lookarounds), which is refused
by name. Compiling is not time-bounded (a DFA can be exponential in the pattern), which is why the
server does not take regexes yet.
"""

from __future__ import annotations

import re

import torch

from .constraints import ConstraintError, OneSlotConstraint, TokenDFA, output_eos
from .token_dfa import Vocab, char_dfa

DEFAULT_TOKENS = 64  # slot width when the request gives no max_tokens
MAX_REPEAT = 1000  # largest {n,m} bound (interegular unrolls repetitions into states)
MAX_STATES = 20000  # character-automaton states (the token automaton has the same limit)


def _char_automaton(vocab: Vocab, pattern: str, field: str) -> TokenDFA:
    try:
        import interegular
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ConstraintError(f"{field}: the 'interegular' package is needed for regex output") from None
    for m in re.finditer(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}", pattern):
        if max(int(n) for n in m.groups() if n) > MAX_REPEAT:
            raise ConstraintError(f"{field}: repetition {m.group(0)} is over the limit of {MAX_REPEAT}")
    try:
        fsm = interegular.parse_pattern(pattern).to_fsm()
    except Exception as e:  # interegular raises its own error types for unsupported syntax
        raise ConstraintError(f"{field}: cannot compile {pattern!r} to an automaton "
                              f"({type(e).__name__}: {e})") from None
    if len(fsm.states) > MAX_STATES:
        raise ConstraintError(f"{field}: {pattern!r} needs {len(fsm.states)} automaton states, over the limit "
                              f"of {MAX_STATES}")

    def classify(ch):
        try:
            return fsm.alphabet[ch]
        except KeyError:
            return None

    def step(state, cls):
        return fsm.map.get(state, {}).get(cls)

    return char_dfa(vocab, ("regex", pattern), classify, fsm.initial, step, lambda s: s in fsm.finals)


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


class RegexConstraint(OneSlotConstraint):
    def __init__(self, pattern, tokenizer, width: int = DEFAULT_TOKENS, field: str = "regex"):
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError(f"{field} must be a non-empty string")
        if not isinstance(width, int) or width < 1:
            raise ConstraintError(f"{field}: the output needs room for at least one token, got {width}")
        eos = output_eos(tokenizer, field)
        self.pattern = pattern
        super().__init__(with_eos_padding(_char_automaton(Vocab.of(tokenizer), pattern, field), eos), width, eos)
        if not bool(self.dfa.coreach(width)[width, self.dfa.start]):
            raise ConstraintError(f"{field}: no match of {pattern!r} fits in {width} tokens (with EOS padding); "
                                  "raise max_tokens, or check that the pattern can match")


__all__ = ["RegexConstraint", "DEFAULT_TOKENS", "with_eos_padding"]
