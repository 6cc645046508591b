"""Token automata for value slots, built from a tokenizer's vocabulary (any tokenizer, BPE included).

`Vocab` holds each token's decoded text in context (cached per tokenizer). `char_dfa` lifts a
character-level automaton to tokens: tokens are grouped by the sequence of character classes they
spell (e.g. "12" and "40" both spell "digit digit"), so a 262k vocabulary collapses to a few thousand
symbols, and a multi-character token moves the automaton over all of its characters. `literal_dfa`
accepts one of several exact token sequences (enum values), padded with whitespace tokens. `union_dfa`
accepts what any of several token automata accepts (a slot that takes any alternative of a union).
`sequence_dfa` accepts a fixed-width template of pinned tokens and slots (one alternative of a union of
objects, arrays or other templates).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from typing import Callable, Hashable

import torch

from .constraints import ConstraintError, TokenDFA

JSON_WS = " \t\n\r"


class DFACache:
    """The most recently used token automata of one vocabulary: at most `size` of them and `max_bytes` of their
    tensors together. A server sees endless distinct patterns, choice lists and length bounds, and one automaton
    holds a [V] symbol table (2 MB at a 262k vocabulary) and a dense [S, G] transition table that can reach
    a hundred MB (a pattern of many character classes over a 65k vocabulary: G near V), so a count alone
    does not bound the memory. An automaton larger than `max_bytes` alone is returned but not kept. Safe
    across threads."""

    def __init__(self, size: int = 64, max_bytes: int = 256 << 20):
        self.size, self.max_bytes, self.bytes = size, max_bytes, 0
        self._items, self._lock = OrderedDict(), threading.Lock()  # key -> (value, its bytes)

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key, value):
        nbytes = _nbytes(value)  # outside the lock: `edges` may be computed here
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if nbytes > self.max_bytes:
                return value
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            while len(self._items) > self.size or self.bytes > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1][1]
        return value

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)


def _nbytes(value) -> int:
    """Bytes of the tensors a cached value holds: a TokenDFA's tables and its sparse `edges` (computed now, as
    every use of the automaton needs them), or those of a tuple's items (a union entry keeps its members)."""
    if isinstance(value, TokenDFA):
        return sum(t.nbytes for t in (value.sym_of_token, value.trans, value.accept, *value.edges))
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class Vocab:
    """Decoded text of every token of a tokenizer ('' for special tokens and partial UTF-8 bytes)."""

    _cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Decode after an anchor token, so tokenizers that drop a leading space at the start of a text
        # still show the space a token carries mid-text.
        anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
        base = tokenizer.decode(anchor) if anchor else ""
        strings, self.special_ids = [], []
        seqs = [anchor + [i] for i in range(tokenizer.vocab_size)]
        batch = getattr(tokenizer, "decode_batch", None)  # one call: seconds saved at a 262k vocabulary
        decoded = batch(seqs) if batch is not None else [tokenizer.decode(q) for q in seqs]
        for i, s in enumerate(decoded):
            s = s[len(base):] if s.startswith(base) else ""
            if s == "":
                self.special_ids.append(i)  # decodes to nothing: a special / control token
            strings.append("" if "\ufffd" in s else s)
        self.strings = strings
        self.chars = frozenset("".join(strings))  # the characters some token writes whole
        self.V = len(strings)
        self.longest = max(1, max(map(len, strings), default=1))  # characters of the longest token
        ws = [i for i, s in enumerate(strings) if s and all(c in JSON_WS for c in s)]
        self.ws_ids = ws
        space = [i for i in ws if strings[i] == " "]
        self.pad_id = space[0] if space else (min(ws, key=lambda i: len(strings[i])) if ws else None)
        self.dfas = DFACache()

    _lock = threading.Lock()

    @classmethod
    def of(cls, tokenizer) -> "Vocab":
        """The tokenizer's Vocab, built once (threads asking at the same time wait for the one build)."""
        v = cls._cache.get(tokenizer)
        if v is None:
            with cls._lock:
                v = cls._cache.get(tokenizer)
                if v is None:
                    v = cls._cache[tokenizer] = cls(tokenizer)
        return v

    def text(self, ids) -> str:
        return "".join(self.strings[i] for i in ids)

    def encode(self, text: str) -> list:
        """Token ids of a text whose tokens spell it exactly (leading/trailing whitespace aside)."""
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except ValueError as e:  # e.g. a character outside a char-level vocabulary
            raise ConstraintError(f"cannot tokenize {text!r}: {e}") from e
        if self.text(ids).strip(JSON_WS) != text.strip(JSON_WS):
            missing = sorted(set(text) - self.chars)
            if missing:  # e.g. a byte-level BPE writing a rare character as several partial UTF-8 byte tokens
                raise ConstraintError(f"no token of this tokenizer writes the character(s) "
                                      f"{', '.join(map(repr, missing[:8]))} (it spells {text!r} with partial UTF-8 "
                                      "byte tokens, which constrained output cannot use); cannot pin it")
            raise ConstraintError(f"the tokenizer does not spell {text!r} back exactly "
                                  f"(got {self.text(ids)!r}); cannot pin it")
        return ids


def explore_states(start: Hashable, row_of: Callable, limit: int, deadline: float | None, what: str, hint: str):
    """Breadth-first numbering of the states reachable from `start` (state 0). row_of(state, intern) -> that
    state's row of next-state numbers, where intern(t) numbers a successor state (None -> -1, dead).
    -> (states in order, rows). `deadline` (a time.monotonic() value) stops it with a ConstraintError once
    passed; more than `limit` states is a ConstraintError too (`what` names the automaton, `hint` the cure)."""
    index, order, rows = {start: 0}, [start], []

    def intern(t) -> int:
        if t is None:
            return -1
        if t not in index:
            if len(order) >= limit:
                raise ConstraintError(f"{what} automaton exceeds {limit} states; {hint}")
            index[t] = len(order)
            order.append(t)
        return index[t]

    while len(rows) < len(order):
        if deadline is not None and time.monotonic() > deadline:
            raise ConstraintError(f"building the {what} automaton ran out of time after {len(rows)} of "
                                  f"{len(order)}+ states")
        rows.append(row_of(order[len(rows)], intern))
    return order, rows


def _determinize(start: Hashable, n_symbols: int, step: Callable, accept: Callable, limit: int = 20000,
                 deadline: float | None = None, what: str = "value slot", hint: str = "lower the length bounds"):
    """Breadth-first over states reachable from `start`; -> (trans [S, G] long, accept [S] bool).
    `deadline`, `what`, `hint`: see explore_states."""
    order, rows = explore_states(start, lambda s, intern: [intern(step(s, g)) for g in range(n_symbols)], limit,
                                 deadline, what, hint)
    trans = torch.tensor(rows, dtype=torch.long).view(len(order), n_symbols)
    return trans, torch.tensor([bool(accept(s)) for s in order])


def char_dfa(vocab: Vocab, key: Hashable, classify: Callable, start: Hashable, step: Callable,
             accept: Callable, deadline: float | None = None) -> TokenDFA:
    """Lift a char automaton: classify(ch) -> class char or None (never allowed); step(state, class) ->
    state or None; accept(state) -> bool. Cached on the vocab under `key`. `deadline`: see _determinize."""
    hit = vocab.dfas.get(key)
    if hit is not None:
        return hit
    sigs: dict = {}
    sym = torch.full((vocab.V,), -1, dtype=torch.long)
    for i, s in enumerate(vocab.strings):
        if not s:
            continue
        sig = tuple(classify(c) for c in s)
        if None not in sig:
            sym[i] = sigs.setdefault(sig, len(sigs))
    sig_list = list(sigs)

    def sym_step(state, g):
        for c in sig_list[g]:
            state = step(state, c)
            if state is None:
                return None
        return state

    trans, acc = _determinize(start, len(sig_list), sym_step, accept, deadline=deadline)
    return vocab.dfas.put(key, TokenDFA(sym, trans, 0, acc))


def literal_dfa(vocab: Vocab, alternatives: list, deadline: float | None = None, what: str = "literal values'",
                hint: str = "use fewer or shorter values") -> TokenDFA:
    """Accept exactly one of the token sequences in `alternatives`, then whitespace tokens. `deadline`, `what`,
    `hint`: see explore_states."""
    key = ("literal", tuple(tuple(a) for a in alternatives))
    hit = vocab.dfas.get(key)
    if hit is not None:
        return hit
    # one symbol per token of an alternative, plus one shared symbol for the other whitespace tokens
    toks = sorted({t for a in alternatives for t in a})
    sym_index = {t: g for g, t in enumerate(toks)}
    ws_shared = len(toks)
    sym = torch.full((vocab.V,), -1, dtype=torch.long)
    if vocab.ws_ids:
        sym[torch.tensor(vocab.ws_ids, dtype=torch.long)] = ws_shared
    if toks:
        sym[torch.tensor(toks, dtype=torch.long)] = torch.arange(len(toks))
    ws_syms = {sym_index.get(t, ws_shared) for t in vocab.ws_ids}

    # nondeterministic states: (alternative, tokens matched) or "pad"; a DFA state is a set of them
    def step(state, g):
        tok, nxt = (toks[g] if g < ws_shared else None), set()
        for item in state:
            if item == "pad":
                if g in ws_syms:
                    nxt.add("pad")
                continue
            a, j = item
            alt = alternatives[a]
            if j < len(alt) and alt[j] == tok:
                nxt.add((a, j + 1))
            if j == len(alt) and g in ws_syms:
                nxt.add("pad")
        return frozenset(nxt) or None

    def accept(state):
        return any(item == "pad" or item[1] == len(alternatives[item[0]]) for item in state)

    start = frozenset((a, 0) for a in range(len(alternatives)))
    trans, acc = _determinize(start, len(toks) + 1, step, accept, deadline=deadline, what=what, hint=hint)
    return vocab.dfas.put(key, TokenDFA(sym, trans, 0, acc))


# --- JSON value automata -----------------------------------------------------------------------

def _num_class(c: str):
    if c == "0":
        return "0"
    if "1" <= c <= "9":
        return "1"
    if c in "-.":
        return c
    return " " if c in JSON_WS else None


def number_dfa(vocab: Vocab, integer: bool, allow_minus: bool, max_digits: int | None = None) -> TokenDFA:
    """-?(0|[1-9][0-9]*)(.[0-9]+)? (no fraction when integer), then JSON whitespace; with max_digits, at
    most that many digits before the point (values stay under 10**max_digits in magnitude)."""
    digit = {"0", "1"}

    def step(s, c):
        if s == "start" and c == "-" and allow_minus:
            return "minus"
        if s in ("start", "minus") and c in digit:
            return "zero" if c == "0" else ("int" if max_digits is None else ("int", 1))
        if s == "int" and c in digit:
            return "int"
        if isinstance(s, tuple) and c in digit:
            return ("int", s[1] + 1) if s[1] < max_digits else None
        if isinstance(s, tuple):
            s = "int"
        if s in ("zero", "int") and c == "." and not integer:
            return "dot"
        if s in ("dot", "frac") and c in digit:
            return "frac"
        if s in ("zero", "int", "frac", "pad") and c == " ":
            return "pad"
        return None

    return char_dfa(vocab, ("number", integer, allow_minus, max_digits), _num_class, "start", step,
                    lambda s: isinstance(s, tuple) or s in ("zero", "int", "frac", "pad"))


def _str_class(c: str):
    if c == '"':
        return '"'
    if c == " ":
        return " "
    if c in "\t\n\r":
        return "\t"  # whitespace that may only pad after the closing quote
    if c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F:
        return None
    return "a"


def string_dfa(vocab: Vocab, min_len: int, max_len: int | None, quoted: bool = False) -> TokenDFA:
    """String content (opening quote pinned before the slot) of min_len..max_len characters without
    escapes or control characters, the closing quote, then JSON whitespace. `quoted`: the slot starts
    with the opening quote itself (a string alternative of a union slot)."""
    cap = max_len if max_len is not None else min_len  # counts saturate: states stay few

    def step(s, c):
        if s == "open":
            return 0 if c == '"' else None
        if s == "pad":
            return "pad" if c in " \t" else None
        if c == '"':
            return "pad" if s >= min_len else None
        if c in "a ":
            n = s + 1
            if max_len is not None:
                return n if n <= max_len else None
            return min(n, cap)
        return None

    return char_dfa(vocab, ("string", min_len, max_len, quoted), _str_class, "open" if quoted else 0, step,
                    lambda s: s == "pad")


def pattern_string_dfa(vocab: Vocab, fsm, key: Hashable, min_len: int, max_len: int | None, quoted: bool = False,
                       deadline: float | None = None) -> TokenDFA:
    """As string_dfa, the content also a whole match of a character automaton (`fsm`, a regex_fsm.CharFSM: a
    JSON schema's `pattern` or `format`), cached under `key`."""
    cap = max_len if max_len is not None else min_len

    def classify(c: str):
        base = _str_class(c)
        if base not in ("a", " "):
            return base  # the quote, padding-only whitespace, or never
        k = fsm.classify(c)
        return None if k is None and base == "a" else (base, k)  # a space the pattern refuses may still pad

    def step(s, c):
        if s == "open":
            return (fsm.initial, 0) if c == '"' else None
        if s == "pad":
            return "pad" if c == "\t" or (isinstance(c, tuple) and c[0] == " ") else None
        q, n = s
        if c == '"':
            return "pad" if n >= min_len and q in fsm.finals else None
        if not isinstance(c, tuple) or c[1] is None:
            return None
        q = fsm.step(q, c[1])
        if q is None:
            return None
        n += 1
        if max_len is not None:
            return (q, n) if n <= max_len else None
        return q, min(n, cap)

    return char_dfa(vocab, key, classify, "open" if quoted else (fsm.initial, 0), step, lambda s: s == "pad",
                    deadline)


# --- unions ------------------------------------------------------------------------------------

def unique_columns(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(rows, dim=1, return_inverse=True) for a [k, n] long tensor of values >= -1, through k
    one-dimensional uniques (each column's tuple folded into a number, renumbered after every row): the
    dim=1 kind sorts whole columns and was 5 ms a call on 2k columns, the most of a union's compile."""
    key = torch.zeros(rows.shape[1], dtype=torch.long)
    for row in rows:
        key = key * (int(row.max()) + 2 if row.numel() else 1) + (row + 1)
        key = torch.unique(key, return_inverse=True)[1]
    n = int(key.max()) + 1 if key.numel() else 0
    first = torch.full((n,), rows.shape[1], dtype=torch.long).scatter_reduce(
        0, key, torch.arange(rows.shape[1]), "amin")
    order = torch.argsort(first)  # columns numbered by where they first appear (any fixed order will do)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    return rows[:, first[order]], rank[key]


def _padded(sym_of_token: torch.Tensor, V: int) -> torch.Tensor:
    """A token -> symbol table over exactly V tokens (-1 for tokens past its own)."""
    return torch.cat([sym_of_token, sym_of_token.new_full((max(0, V - sym_of_token.numel()),), -1)])[:V]


def _joint_symbols(rows: torch.Tensor, dfas: list) -> tuple[torch.Tensor, torch.Tensor, list]:
    """rows [k, V]: per token, what it is to each of k tables (its symbol in each of `dfas`, first, then any other
    classification), -1 for nothing. -> (token -> joint symbol [V], -1 where every row says nothing; the joint
    symbols' columns [k, G]; per automaton of `dfas`, its [S, G] next state under each joint symbol)."""
    cols, inv = unique_columns(rows)  # cols [k, G']: the distinct tuples
    live = (cols >= 0).any(0)
    remap = torch.full((cols.shape[1],), -1, dtype=torch.long)
    remap[live] = torch.arange(int(live.sum()))
    cols = cols[:, live]
    nxt = []
    for d, c in zip(dfas, cols):
        t = d.trans[:, c.clamp(min=0)]
        t[:, c < 0] = -1  # no such token for this automaton
        nxt.append(t)
    return remap[inv], cols, nxt


def union_dfa(vocab: Vocab, dfas: list, deadline: float | None = None, limit: int = 20000) -> TokenDFA:
    """Accept what any of `dfas` accepts: their product automaton, with one symbol per distinct tuple of
    the members' symbols for a token and one state per tuple of their states (-1 once a member is dead).
    Members that share a first character die apart after it, so the states stay about the members' sum.
    Cached on the vocab per tuple of members (the cache entry keeps them, so their ids stay theirs)."""
    dfas = list({id(d): d for d in dfas}.values())
    if len(dfas) == 1:
        return dfas[0]
    key = ("union", tuple(id(d) for d in dfas))
    hit = vocab.dfas.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], dfas)):
        return hit[1]
    V = max(d.sym_of_token.numel() for d in dfas)
    sym, cols, nxt = _joint_symbols(torch.stack([_padded(d.sym_of_token, V) for d in dfas]), dfas)
    G = cols.shape[1]
    dead = torch.full((G,), -1, dtype=torch.long)
    start = tuple(d.start for d in dfas)

    def row_of(state, intern):
        if G == 0:
            return dead
        cur = torch.stack([nxt[k][s] if s >= 0 else dead for k, s in enumerate(state)])  # [k, G]
        targets, back = unique_columns(cur)
        ids = [intern(t if max(t) >= 0 else None) for t in map(tuple, targets.t().tolist())]
        return torch.tensor(ids, dtype=torch.long)[back]

    order, rows = explore_states(start, row_of, limit, deadline, "union slot", "simplify the alternatives")
    acc = torch.tensor([any(s >= 0 and bool(d.accept[s]) for d, s in zip(dfas, state)) for state in order])
    dfa = TokenDFA(sym, torch.stack(rows), 0, acc)
    vocab.dfas.put(key, (tuple(dfas), dfa))
    return dfa


def sequence_dfa(vocab: Vocab, parts: list, deadline: float | None = None, limit: int = 20000) -> TokenDFA:
    """Accept a template, then whitespace tokens: `parts` in order, each either a list of token ids (pinned text:
    exactly those tokens) or a (width, TokenDFA, counted) slot: with `counted`, exactly `width` tokens its
    automaton accepts (a slot at a fixed offset, which a whole-slot repair needs); else any run of tokens it
    accepts, ending at the first token it cannot take (which must begin the next part: the texts of a JSON
    template never begin with whitespace, the only token a finished value still takes). A state is (part,
    tokens into it or -1, the slot's automaton state); a token's symbol is the tuple of what it is to each
    slot automaton, which text token it is and whether it is whitespace. A union of templates (a JSON union of
    objects) is the union of these."""
    dfas = list({id(p[1]): p[1] for p in parts if isinstance(p, tuple)}.values())
    key = ("sequence", tuple(tuple(p) if isinstance(p, list) else (p[0], id(p[1]), p[2]) for p in parts))
    hit = vocab.dfas.get(key)  # the entry keeps its slot automata, so their ids stay theirs
    if hit is not None and all(a is b for a, b in zip(hit[0], dfas)):
        return hit[1]
    which = {id(d): k for k, d in enumerate(dfas)}
    V = vocab.V
    toks = sorted({t for p in parts if isinstance(p, list) for t in p})
    lit_index = {t: g for g, t in enumerate(toks)}
    lit = torch.full((V,), -1, dtype=torch.long)
    if toks:
        lit[torch.tensor(toks, dtype=torch.long)] = torch.arange(len(toks))
    ws = torch.full((V,), -1, dtype=torch.long)
    if vocab.ws_ids:
        ws[torch.tensor(vocab.ws_ids, dtype=torch.long)] = 0
    sym, cols, nxt = _joint_symbols(torch.stack([_padded(d.sym_of_token, V) for d in dfas] + [lit, ws]), dfas)
    G = cols.shape[1]
    lit_col, ws_col = cols[-2], cols[-1] >= 0
    dead = torch.full((G,), -1, dtype=torch.long)
    end = len(parts)

    def first(j: int):  # the state at the start of part j
        if j < end and isinstance(parts[j], tuple):
            return j, 0 if parts[j][2] else -1, parts[j][1].start
        return j, 0, 0

    def accepting(state) -> bool:
        j, k, s = state
        return j == end or (j == end - 1 and k < 0 and bool(parts[j][1].accept[s]))

    def row_of(state, intern):
        j, k, s = state
        if j == end:  # the template is written: whitespace pads the slot
            return torch.where(ws_col, torch.full_like(dead, intern(state)), dead)
        part = parts[j]
        if isinstance(part, list):
            after = first(j + 1) if k + 1 == len(part) else (j, k + 1, 0)
            return torch.where(lit_col == lit_index[part[k]], torch.full_like(dead, intern(after)), dead)
        width, d, counted = part
        inner = nxt[which[id(d)]][s]  # [G]
        targets, back = torch.unique(inner, return_inverse=True)
        ids = []
        for t in targets.tolist():
            if t < 0 or (counted and k + 1 == width and not bool(d.accept[t])):
                ids.append(-1)
            elif counted:
                ids.append(intern(first(j + 1) if k + 1 == width else (j, k + 1, t)))
            else:
                ids.append(intern((j, -1, t)))
        row = torch.tensor(ids, dtype=torch.long)[back]
        if not counted and bool(d.accept[s]):  # a finished value: what it cannot take begins the next part
            row = torch.where(row >= 0, row, row_of(first(j + 1), intern))
        return row

    order, rows_out = explore_states(first(0), row_of, limit, deadline, "union slot", "simplify the alternatives")
    trans = torch.stack(rows_out) if rows_out else torch.empty(0, G, dtype=torch.long)
    dfa = TokenDFA(sym, trans, 0, torch.tensor([accepting(s) for s in order]))
    vocab.dfas.put(key, (tuple(dfas), dfa))
    return dfa


def dfa_accepts(dfa: TokenDFA, ids: list) -> bool:
    """Whether `dfa` accepts the token sequence `ids` (from its start)."""
    s = dfa.start
    for t in ids:
        g = int(dfa.sym_of_token[t]) if 0 <= t < dfa.sym_of_token.numel() else -1
        s = int(dfa.trans[s, g]) if g >= 0 else -1
        if s < 0:
            return False
    return bool(dfa.accept[s])
