"""Free-form JSON (OpenAI's JSON mode, `response_format: {"type": "json_object"}`) as a token automaton.

JSON nests, so no finite automaton accepts all of it. This one accepts JSON nested at most `max_depth`
containers deep, which is finite: a state is the stack of open containers (each an object or an array)
and where the text stands inside the innermost one (expecting a key, inside a string, in a number, ...).
Strings may hold any printable character and the escapes \\" \\\\ \\n \\t \\r \\f (not \\uXXXX, \\b, \\/);
numbers are -?(0|[1-9][0-9]*)(.[0-9]+)? (no exponent); true, false and null are spelled out.

A large vocabulary would give the automaton one symbol per distinct character sequence its tokens
spell, tens of thousands. Most characters play the same part everywhere, so a token is reduced to a
signature first. A run of letters that can be part of `true`, `false` or `null` keeps its letters, and
so does a letter that may end an escape (right after a backslash, or first in a token); every other
run of plain characters becomes one `*` (inside a string any run is alike; outside one, none is
allowed); a repeated space, newline or digit class counts once (repeating it never changes the state
it led to). Lifting then walks a trie of the signatures from each state and drops a whole subtree at
the first character the state refuses, so the cost follows the transitions that exist. A character
that the tokenizer splits over byte tokens cannot be written (as in every value slot, see token_dfa).
"""

from __future__ import annotations

import time

import torch

from .constraints import ConstraintError, TokenDFA, output_eos
from .regex import PaddedSlotConstraint
from .token_dfa import Vocab, explore_states

DEFAULT_DEPTH = 4  # containers open at once; states grow as 2 ** depth
MAX_STATES = 20000
_LITERALS = ("true", "false", "null")
_STRUCT = set('{}[]:,"\\-.')
_ESCAPES = {'"', "\\", "n", "t", "r", "f"}
_TOPS = {"object": "{", "array": "[", "any": "any"}  # what the value may be -> the character it starts with
DEFAULT_TOKENS = 255  # JSON-mode output width without max_tokens: one 256-token canvas with the EOS


def _char_class(c: str):
    if c in _STRUCT:
        return c
    if c == " ":
        return " "
    if c in "\t\n\r":
        return "w"  # whitespace that is not allowed raw inside a string
    if c == "0":
        return "0"
    if "1" <= c <= "9":
        return "1"
    if ord(c) < 0x20:
        return None
    return "*"


def signature(text: str):
    """A token's text -> its tuple of character classes (see the module doc), None if never allowed."""
    out, run = [], []

    def flush():
        if run and run[0] in _ESCAPES and (not out or out[-1] == "\\"):
            out.append(run.pop(0))  # maybe an escape's letter (after a backslash, perhaps the previous token's)
        if run:
            word = "".join(run)
            if word.isascii() and word.isalpha() and any(word in lit for lit in _LITERALS):
                out.extend(word)
            elif not out or out[-1] != "*":
                out.append("*")
            run.clear()

    for c in text:
        k = _char_class(c)
        if k is None:
            return None
        if k == "*":
            run.append(c)
            continue
        flush()
        if k in (" ", "w", "1") and out and out[-1] == k:
            continue
        out.append(k)
    flush()
    return tuple(out)


class _JsonChars:
    """The character automaton. A state is (stack, mode): stack a str of 'o' / 'a' (open objects and
    arrays, innermost last), mode where the text stands."""

    def __init__(self, max_depth: int, top: str):
        self.max_depth, self.top = max_depth, _TOPS[top]

    def start(self):
        return ("", "top")

    def accept(self, state) -> bool:
        stack, mode = state
        return stack == "" and (mode == "end" or (self.top == "any" and mode in ("zero", "int", "frac")))

    def _done(self, stack):  # a value just ended
        return (stack, "end" if stack == "" else "after")

    def _open(self, stack, kind):
        if len(stack) >= self.max_depth:
            return None
        return (stack + kind, "okey" if kind == "o" else "aval")

    def _value_start(self, stack, c):
        if c == "{":
            return self._open(stack, "o")
        if c == "[":
            return self._open(stack, "a")
        if c == '"':
            return (stack, "vstr")
        if c == "-":
            return (stack, "minus")
        if c == "0":
            return (stack, "zero")
        if c == "1":
            return (stack, "int")
        for lit in _LITERALS:
            if c == lit[0]:
                return (stack, f"l{lit}1")
        return None

    def _after(self, stack, c):  # after a value inside a container
        if c in " w":
            return (stack, "after")
        top = stack[-1]
        if c == ",":
            return (stack, "key" if top == "o" else "val")
        if (c == "}" and top == "o") or (c == "]" and top == "a"):
            return self._done(stack[:-1])
        return None

    def step(self, state, c):
        stack, mode = state
        ws = c in " w"
        if mode == "top":
            if ws:
                return state
            if self.top != "any" and c != self.top:
                return None
            return self._value_start(stack, c)
        if mode == "end":
            return state if ws else None
        if mode in ("vstr", "kstr"):
            if c == '"':
                return self._done(stack) if mode == "vstr" else (stack, "colon")
            if c == "\\":
                return (stack, mode[0] + "esc")
            return state if c != "w" else None
        if mode in ("vesc", "kesc"):
            return (stack, mode[0] + "str") if c in _ESCAPES else None
        if mode == "okey":
            if ws:
                return state
            if c == '"':
                return (stack, "kstr")
            return self._done(stack[:-1]) if c == "}" else None
        if mode == "key":
            if ws:
                return state
            return (stack, "kstr") if c == '"' else None
        if mode == "colon":
            if ws:
                return state
            return (stack, "val") if c == ":" else None
        if mode in ("val", "aval"):
            if ws:
                return state
            if mode == "aval" and c == "]":
                return self._done(stack[:-1])
            return self._value_start(stack, c)
        if mode == "after":
            return self._after(stack, c)
        if mode == "minus":
            return (stack, "zero" if c == "0" else "int") if c in "01" else None
        if mode in ("zero", "int", "frac"):
            if c in "01" and mode != "zero":
                return state
            if c == "." and mode != "frac":
                return (stack, "dot")
            return self._number_end(stack, c)
        if mode == "dot":
            return (stack, "frac") if c in "01" else None
        if mode[0] == "l":  # inside a literal: l<word><letters matched>
            word, i = mode[1:-1], int(mode[-1])
            if c != word[i]:
                return None
            return self._done(stack) if i + 1 == len(word) else (stack, f"l{word}{i + 1}")
        raise AssertionError(mode)

    def _number_end(self, stack, c):
        if stack == "":
            return (stack, "end") if c in " w" else None
        return self._after(stack, c)


def lift(vocab: Vocab, key, chars: _JsonChars, deadline: float | None = None, limit: int = MAX_STATES) -> TokenDFA:
    """The token automaton of `chars` over `vocab` (cached on the vocab under `key`)."""
    hit = vocab.dfas.get(key)
    if hit is not None:
        return hit
    sym = torch.full((vocab.V,), -1, dtype=torch.long)
    sigs: dict = {}
    children, ends = [{}], [[]]  # trie of signatures: node -> {class: node}, node -> symbols ending there
    for i, s in enumerate(vocab.strings):
        sig = signature(s) if s else None
        if not sig:
            continue
        g = sigs.get(sig)
        if g is None:
            g = sigs[sig] = len(sigs)
            node = 0
            for c in sig:
                nxt = children[node].get(c)
                if nxt is None:
                    nxt = children[node][c] = len(children)
                    children.append({})
                    ends.append([])
                node = nxt
            ends[node].append(g)
        sym[i] = g
    memo: dict = {}

    def step(s, c):
        k = (s, c)
        if k not in memo:
            memo[k] = chars.step(s, c)
        return memo[k]

    def row_of(s0, intern) -> list:  # (symbol, next state) pairs: a walk of the token trie from s0
        out, todo = [], [(0, s0)]
        while todo:
            node, s = todo.pop()
            if ends[node]:
                t = intern(s)
                out.extend((g, t) for g in ends[node])
            for c, child in children[node].items():
                nxt = step(s, c)
                if nxt is not None:
                    todo.append((child, nxt))
        return out

    order, rows = explore_states(chars.start(), row_of, limit, deadline, "JSON", "lower the depth")
    src = [r for r, row in enumerate(rows) for _ in row]
    syms = [g for row in rows for g, _ in row]
    tgt = [t for row in rows for _, t in row]
    trans = torch.full((len(order), max(len(sigs), 1)), -1, dtype=torch.long)
    long = dict(dtype=torch.long)
    trans[torch.tensor(src, **long), torch.tensor(syms, **long)] = torch.tensor(tgt, **long)
    accept = torch.tensor([chars.accept(s) for s in order])
    return vocab.dfas.put(key, TokenDFA(sym, trans, 0, accept))


def json_dfa(vocab: Vocab, top: str = "object", max_depth: int = DEFAULT_DEPTH,
             deadline: float | None = None) -> TokenDFA:
    """Tokens spelling one JSON value (`top`: "object", "array" or "any") nested at most `max_depth`
    containers deep, then JSON whitespace."""
    if top not in _TOPS:
        raise ConstraintError(f"JSON automaton top must be one of {sorted(_TOPS)}, got {top!r}")
    if not isinstance(max_depth, int) or not 1 <= max_depth <= 8:
        raise ConstraintError(f"JSON nesting depth must be an integer in [1, 8], got {max_depth!r}")
    return lift(vocab, ("json", top, max_depth), _JsonChars(max_depth, top), deadline)


class JsonObjectConstraint(PaddedSlotConstraint):
    """Output = one JSON object (nested at most `max_depth` deep) in up to `width` tokens, then EOS."""

    def __init__(self, tokenizer, width: int, field: str = "response_format", max_depth: int = DEFAULT_DEPTH,
                 timeout: float | None = None):
        if not isinstance(width, int) or width < 2:
            raise ConstraintError(f"{field}: a JSON object needs at least 2 tokens, got room for {width}")
        eos = output_eos(tokenizer, field)
        deadline = None if timeout is None else time.monotonic() + timeout
        dfa = json_dfa(Vocab.of(tokenizer), "object", max_depth, deadline)
        super().__init__(dfa, width, eos, f"{field}: no JSON object fits in {width} tokens with this tokenizer; "
                                          "raise max_tokens")


__all__ = ["JsonObjectConstraint", "json_dfa", "signature", "DEFAULT_DEPTH", "DEFAULT_TOKENS"]
