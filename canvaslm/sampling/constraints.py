"""Canvas constraints: pinned tokens and per-position allowed-token masks over a request's output.

A constraint is a layout over output offsets 0..L-1 (offsets run across canvases: canvas k holds
offsets k*C..k*C+C-1). Each offset is pinned (a fixed token id: always accepted, never renoised), free,
free with some ids banned, or part of a value slot. A slot is a fixed-width run of positions whose token
sequence must be accepted by a small automaton (`TokenDFA`, e.g. "a JSON integer then whitespace").

Positions are sampled in parallel, so a per-position mask alone cannot enforce a sequence language
(leading zeros, "1 2", a mix of two enum values). The mask is only the tight per-position envelope
(tokens that some accepted sequence has there). What is committed is decided at the end of the canvas
by `commit`: the most likely accepted sequence under the final per-position distributions (Viterbi
over automaton states x positions). It equals the argmax whenever the argmax is already valid, and is
always valid. A slot that straddles a canvas boundary carries its automaton state into the next canvas.

Runner contract: call `c = constraint.for_row()` once per request, `c.canvas(k, C, V)` before the
denoising steps of canvas k, and `c.commit(k, ids, logits)` on the argmax canvas before it is encoded.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

_NEG = -1e9  # finite stand-in for -inf log-probs so path sums stay comparable


class ConstraintError(ValueError):
    """A constraint cannot be built or applied as asked (unsupported schema feature, too long, bad pin)."""


@dataclass(frozen=True)
class TokenDFA:
    """Automaton over token symbols: token id -> symbol (-1: never allowed), trans[state, symbol] -> state."""

    sym_of_token: torch.Tensor  # [V] long, -1 = not allowed
    trans: torch.Tensor  # [S, G] long, -1 = dead
    start: int
    accept: torch.Tensor  # [S] bool

    @property
    def num_states(self) -> int:
        return self.trans.shape[0]

    @functools.cached_property
    def edges(self) -> tuple:
        """The live transitions as (src, sym, tgt) long tensors, ordered by (src, sym). Automata for JSON or
        a regex over a large vocabulary are sparse (a few percent of [S, G] is live), so the passes below
        walk these instead of the dense table."""
        src, sym = (self.trans >= 0).nonzero(as_tuple=True)
        return src, sym, self.trans[src, sym]

    def coreach(self, n: int) -> torch.Tensor:
        """[n + 1, S] bool: co[j, s] = some accepted state is reached from s in exactly j more tokens."""
        rows = self.coreach_rows(n)
        return torch.stack([rows[j] for j in range(n + 1)])

    def coreach_rows(self, n: int) -> "CoreachRows":
        """coreach(n)'s rows, indexable as co[j] for j <= n, stored only until they start to repeat."""
        return CoreachRows(self, n)

    def symbol_masks(self, state: int, n: int, remaining: int, co=None) -> torch.Tensor:
        """[n, G] bool: symbols allowed at the next n positions, from `state`, with `remaining` positions left
        in the slot (>= n): reachable from the left and still able to finish within the slot. `co`: this
        automaton's coreach rows for at least `remaining` (computed here when not given)."""
        co = self.coreach_rows(remaining) if co is None else co
        src, sym, tgt = self.edges
        fw = torch.zeros(self.num_states, dtype=torch.bool)
        fw[state] = True
        out = torch.zeros(n, self.trans.shape[1], dtype=torch.bool)
        for i in range(n):
            good = fw[src] & co[remaining - i - 1][tgt]
            out[i].index_fill_(0, sym[good], True)
            fw = torch.zeros_like(fw).index_fill_(0, tgt[good], True)
        return out

    def token_masks(self, state: int, n: int, remaining: int, V: int, co=None) -> torch.Tensor:
        """[n, V] bool allowed tokens for the next n positions (`co`: see symbol_masks)."""
        sym = self.symbol_masks(state, n, remaining, co)
        t = self.sym_of_token
        t = torch.cat([t, t.new_full((max(0, V - t.numel()),), -1)])[:V]
        return sym[:, t.clamp(min=0)] & (t >= 0)[None, :]

    def best_path(self, state: int, logp: torch.Tensor, remaining: int, co=None) -> tuple[list[int], int]:
        """Most likely token sequence for the next n = logp.shape[0] positions (logp [n, V] log-probs) that
        starts in `state` and can still be accepted with `remaining` (>= n) positions; -> (ids, end state).
        `co`: see symbol_masks."""
        n, V = logp.shape
        S, G = self.trans.shape
        co = self.coreach_rows(remaining) if co is None else co
        t = self.sym_of_token.to(logp.device)
        t = torch.cat([t, t.new_full((max(0, V - t.numel()),), -1)])[:V]
        col = torch.where(t >= 0, t, G)  # disallowed tokens go to a dropped column
        logp = logp.float().clamp(min=_NEG)
        # best log-prob per symbol, on the logits' device; only [n, G] comes to the host
        best = torch.full((n, G + 1), 2 * _NEG, device=logp.device).scatter_reduce(
            1, col[None].expand(n, V), logp, "amax")[:, :G].cpu().double()  # [n, G]
        score = torch.full((S,), 4 * _NEG * (n + 1), dtype=torch.float64)
        score[state] = 0.0
        reach = torch.zeros(S, dtype=torch.bool)
        reach[state] = True
        src, sym, tgt = self.edges
        E = src.numel()
        back = []  # per position: [S] index of the edge that reached each state best
        for i in range(n):
            e = (reach[src] & co[remaining - i - 1][tgt]).nonzero(as_tuple=True)[0]
            if e.numel() == 0:
                raise ConstraintError("no valid token sequence fits this slot (internal: dead automaton state)")
            to, val = tgt[e], score[src[e]] + best[i][sym[e]]
            new = torch.full((S,), 8 * _NEG * (n + 1), dtype=torch.float64).scatter_reduce(0, to, val, "amax")
            winners = val >= new[to]  # ties go to the first edge in (src, sym) order
            bp = torch.full((S,), E).scatter_reduce(0, to[winners], e[winners], "amin")
            reach = torch.zeros(S, dtype=torch.bool).index_fill_(0, to, True)
            score = new
            back.append(bp)
        end_ok = reach & co[remaining - n]
        end = int(torch.where(end_ok, score, torch.full_like(score, float("-inf"))).argmax())
        syms, s = [], end
        for bp in reversed(back):
            f = int(bp[s])
            s, g = int(src[f]), int(sym[f])
            syms.append(g)
        syms.reverse()
        chosen = torch.tensor(syms, device=logp.device)
        ids = logp.masked_fill(t[None, :] != chosen[:, None], float("-inf")).argmax(dim=-1)  # [n]
        return ids.tolist(), end


class CoreachRows:
    """TokenDFA.coreach(n) as rows co[j], j <= n. Each row follows from the one before, so once a row equals
    an earlier one the rows cycle from there: they are stored up to that point and row j is read from the
    cycle. A slot as wide as max_tokens then costs its rows once (usually a few dozen), not per canvas."""

    def __init__(self, dfa: TokenDFA, n: int):
        src, _, tgt = dfa.edges
        rows, seen = [dfa.accept.clone()], {}  # seen: hash of a row's bytes -> indices of the rows with it
        self.n, self.cycle = n, None  # cycle: (first row of the cycle, its length)
        while len(rows) <= n:
            key = hash(rows[-1].numpy().tobytes())
            twin = next((i for i in seen.get(key, ()) if torch.equal(rows[i], rows[-1])), None)
            if twin is not None:
                rows.pop()
                self.cycle = (twin, len(rows) - twin)
                break
            seen.setdefault(key, []).append(len(rows) - 1)
            rows.append(torch.zeros_like(rows[0]).index_fill_(0, src[rows[-1][tgt]], True))
        self.rows = torch.stack(rows)  # [R, S] bool, R <= n + 1

    def __getitem__(self, j: int) -> torch.Tensor:
        """[S] bool: the states from which an accepted state is reached in exactly j more tokens."""
        if not 0 <= j <= self.n:
            raise IndexError(f"coreach row {j} is outside 0..{self.n}")
        R = self.rows.shape[0]
        if j >= R:
            first, length = self.cycle
            j = first + (j - first) % length
        return self.rows[j]


@dataclass
class Slot:
    """A value slot: `width` positions from output offset `start` accepted by `dfa`. `finish`, if set,
    repairs the whole slot's ids at commit (e.g. clamps a number into its range); the layout then
    keeps the slot inside one canvas."""

    start: int
    width: int
    dfa: TokenDFA
    finish: Callable[[list], list] | None = None


@dataclass
class Layout:
    """What a constraint asks of the output offsets 0..length-1 (offsets past it are unconstrained)."""

    pinned: list  # [length] token id or -1
    slots: list = field(default_factory=list)
    banned: list = field(default_factory=list)  # (start, end, ids): free offsets [start, end) never take ids

    @property
    def length(self) -> int:
        return len(self.pinned)


class CanvasConstraint:
    """A request's constraint. Subclasses provide `layout(C)`; this class maps it onto canvases."""

    def layout(self, C: int) -> Layout:
        raise NotImplementedError

    def min_new_tokens(self, C: int) -> int:
        """Tokens the output needs so that every constrained offset is generated."""
        return self.layout(C).length

    def for_row(self) -> "CanvasConstraint":
        """A fresh per-request copy (slot states are per request; the spec may be shared by many)."""
        c = copy.copy(self)
        c._states = {}
        c._coreach = self.__dict__.setdefault("_coreach", {})  # shared by the spec's rows
        return c

    def coreach_of(self, slot: "Slot") -> CoreachRows:
        """The coreach rows of a slot's automaton over the slot's width, computed once per constraint (not
        per canvas: a slot as wide as max_tokens made every canvas an O(max_tokens) host pass)."""
        tables = self.__dict__.setdefault("_coreach", {})
        hit = tables.get(id(slot.dfa))  # the value keeps the automaton alive, so its id stays its own
        if hit is None or hit[0] is not slot.dfa or hit[1].n < slot.width:
            hit = tables[id(slot.dfa)] = (slot.dfa, slot.dfa.coreach_rows(slot.width))
        return hit[1]

    def canvas(self, k: int, C: int, V: int):
        """(pinned LongTensor [C] with -1 for free positions, or None; allowed BoolTensor [C, V] or None)."""
        if k == 0 or not hasattr(self, "_states"):
            self._states = {}
        lay = self.layout(C)
        lo, hi = k * C, (k + 1) * C
        if lo >= lay.length:
            return None, None
        pins = lay.pinned[lo:hi]
        bad = [t for t in pins if not -1 <= t < V]
        if bad:
            raise ConstraintError(f"pinned token ids {bad[:5]} are outside the vocabulary [0, {V})")
        bad = sorted({t for _, _, ids in lay.banned for t in ids if t >= V})
        if bad:
            raise ConstraintError(f"banned token ids (ban_ids) {bad[:5]} are outside the vocabulary [0, {V})")
        pinned = torch.full((C,), -1, dtype=torch.long)
        pinned[:len(pins)] = torch.tensor(pins, dtype=torch.long)
        allowed = None
        for start, end, ids in lay.banned:
            a, b = max(start, lo), min(end, hi)
            if a < b and ids:
                allowed = torch.ones(C, V, dtype=torch.bool) if allowed is None else allowed
                allowed[a - lo:b - lo, torch.tensor(list(ids))] = False
        for i, slot in enumerate(lay.slots):
            a, b = max(slot.start, lo), min(slot.start + slot.width, hi)
            if a >= b:
                continue
            allowed = torch.ones(C, V, dtype=torch.bool) if allowed is None else allowed
            state = self._states.get(i, slot.dfa.start)
            remaining = slot.start + slot.width - a
            allowed[a - lo:b - lo] = slot.dfa.token_masks(state, b - a, remaining, V, self.coreach_of(slot))
        return (pinned if bool((pinned >= 0).any()) else None), allowed

    def commit(self, k: int, ids: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """Final ids [C] of canvas k: pins restored, every slot part replaced by its most likely valid
        sequence under logits [C, V] (the last step's processed logits)."""
        C = ids.shape[0]
        lay = self.layout(C)
        lo, hi = k * C, (k + 1) * C
        if lo >= lay.length:
            return ids
        ids = ids.clone()
        pins = torch.tensor(lay.pinned[lo:hi], dtype=torch.long, device=ids.device)
        head = ids[:pins.numel()]
        ids[:pins.numel()] = torch.where(pins >= 0, pins, head)
        if not lay.slots:
            return ids
        for i, slot in enumerate(lay.slots):
            a, b = max(slot.start, lo), min(slot.start + slot.width, hi)
            if a >= b:
                continue
            state = self._states.get(i, slot.dfa.start)
            remaining = slot.start + slot.width - a
            if logits is None:  # no logits kept: the argmax counts as certain
                part = ids[a - lo:b - lo].cpu()
                lp = torch.full((b - a, max(slot.dfa.sym_of_token.numel(), int(part.max()) + 1)), _NEG)
                lp[torch.arange(b - a), part] = 0.0
            else:
                lp = torch.log_softmax(logits[a - lo:b - lo].float(), dim=-1)  # [n, V] on the logits' device
            path, state = slot.dfa.best_path(state, lp, remaining, self.coreach_of(slot))
            if slot.finish is not None and a == slot.start and b == slot.start + slot.width:
                path = slot.finish(path)
            ids[a - lo:b - lo] = torch.tensor(path, dtype=torch.long, device=ids.device)
            self._states[i] = state
        return ids


def output_eos(tokenizer, field: str) -> int:
    """The EOS id a constrained output ends with; ConstraintError naming `field` if the tokenizer has none."""
    if not tokenizer.eos_ids:
        raise ConstraintError(f"{field}: the tokenizer has no EOS token to end the output with")
    return tokenizer.eos_ids[0]


class OneSlotConstraint(CanvasConstraint):
    """Output = one slot of `width` tokens accepted by `dfa` (which ends its values with EOS padding),
    then a pinned EOS: choice and regex output."""

    def __init__(self, dfa: TokenDFA, width: int, eos_id: int):
        self.dfa, self.width, self.eos_id = dfa, width, eos_id

    def layout(self, C: int) -> Layout:
        return Layout([-1] * self.width + [self.eos_id], [Slot(0, self.width, self.dfa)])


class SparsePins:
    """A layout's `pinned` list stored as {offset: id}: reads as a list of `length` ids with -1 where free
    (len, slices and indices), in memory proportional to the pins, not to the last offset (a pin at offset
    10**9 takes no 10**9-long list before the context check refuses it)."""

    def __init__(self, pins: dict, length: int):
        self.pins, self.length = pins, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self.pins.get(i, -1) for i in range(*key.indices(self.length))]
        i = key + self.length if key < 0 else key
        if not 0 <= i < self.length:
            raise IndexError(key)
        return self.pins.get(i, -1)

    def __iter__(self):
        return iter(self[:])

    def __eq__(self, other):
        return list(self) == list(other)


def _count(v) -> bool:
    """A non-negative int (not a bool: True would be token id 1)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class PinnedConstraint(CanvasConstraint):
    """Fixed token ids at output offsets; optionally ids banned from the free offsets before `ban_until`."""

    def __init__(self, pins: dict, ban_ids=(), ban_until: int = 0):
        """pins: {offset: id or list of ids (placed at offset, offset+1, ...)}."""
        flat = {}
        for off, val in pins.items():
            vals = [val] if isinstance(val, int) else list(val)
            if not _count(off):
                raise ConstraintError(f"pin offset must be a non-negative integer, got {off!r}")
            for j, t in enumerate(vals):
                if not _count(t):
                    raise ConstraintError(f"pinned token at offset {off + j} must be a non-negative id, got {t!r}")
                if off + j in flat and flat[off + j] != t:
                    raise ConstraintError(f"two pins disagree at output offset {off + j}")
                flat[off + j] = t
        if isinstance(ban_ids, (str, bytes)) or not hasattr(ban_ids, "__iter__") or \
                not all(_count(t) for t in ban_ids):
            raise ConstraintError(f"ban_ids must be a list of non-negative token ids, got {ban_ids!r}")
        if not _count(ban_until):
            raise ConstraintError(f"ban_until must be a non-negative output offset, got {ban_until!r}")
        self.ban_ids, self.ban_until = tuple(ban_ids), ban_until
        self._pins = flat
        length = max(max(flat, default=-1) + 1, ban_until)
        self._layout = Layout(SparsePins(flat, length), [],
                              [(0, ban_until, self.ban_ids)] if ban_until and self.ban_ids else [])

    def layout(self, C: int) -> Layout:
        return self._layout

    def early_end(self, ids) -> tuple[int, int] | None:
        """(offset, end) of the first pin of one of `ids` (EOS, stop ids) before the last pinned position `end`
        - 1: the output would end there and drop the later pins; None when there is none."""
        end, ends = max(self._pins, default=-1) + 1, set(ids)
        early = sorted(off for off, t in self._pins.items() if t in ends and off < end - 1)
        return (early[0], end) if early else None

    def banning(self, ids) -> "PinnedConstraint":
        """This constraint with `ids` banned too wherever it bans ids (a request's stop ids: a free offset that
        took one before the last pin would end the output there and drop the pins after it). As it is when it
        bans nothing, or already bans them all."""
        extra = tuple(t for t in ids if t not in self.ban_ids)
        if not (self.ban_until and self.ban_ids and extra):
            return self
        c = copy.copy(self)
        c.ban_ids = self.ban_ids + extra
        c._layout = Layout(self._layout.pinned, [], [(0, self.ban_until, c.ban_ids)])
        return c


def pins_from_text(tokenizer, spans: dict) -> dict:
    """{offset: text or ids} -> {offset: ids}, text tokenized without special tokens."""
    out = {}
    for off, val in spans.items():
        if isinstance(val, str):
            ids = tokenizer.encode(val, add_special_tokens=False)
            if not ids:
                raise ConstraintError(f"pin at offset {off}: text {val!r} encodes to no tokens")
            out[off] = ids
        else:
            out[off] = val
    return out
