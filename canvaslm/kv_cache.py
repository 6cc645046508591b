"""Static KV cache with batch slots.

Every layer owns K and V buffers `[num_slots, kv_heads, S, head_dim]`, allocated once. Full-attention
layers keep every position (S = max_len). Sliding layers keep a ring of the last `window - 1`
positions (S = window - 1): that is all the encoder's sliding mask and the decoder can ever see, and it
keeps long contexts cheap. A position table per layer type records which absolute position each row
holds (-1 = empty); attention masks are built from it, so the ring order never matters.

Writes need no host sync: each buffer has one scratch column past its S columns, and a token the
cache does not keep (padding, or a ring's overwritten positions) is written there instead of being
filtered out with a boolean mask, which would read the mask back to the host. Reads never see it.

With `prefix_store=True` (prefix caching) each sliding layer also writes every position to a second,
longer ring that attention never reads: the prefix store, `store_len` positions (default: all of
`max_len`). When a slot is handed to a request that reuses its first L positions, `keep_prefix`
rebuilds the sliding ring as it stood right after position L - 1 from the store: the later positions
the previous owner wrote had overwritten part of it. That needs the store to still hold positions
L - window + 1 .. L - 1, so a bounded store serves reuse up to `store_len - window + 1` positions
behind the last one written (a multi-turn chat's previous prompt, read back behind its reply); the
scheduler offers only such prefixes, and a restore that finds a position gone raises.
"""

from __future__ import annotations

import torch

from .config import FULL, SLIDING, ModelConfig


ATTN_BLOCK = 1024  # full layers past this length keep whole blocks of positions; a call reads the blocks it needs


def _whole_blocks(n: int) -> int:
    return -(-n // ATTN_BLOCK) * ATTN_BLOCK


def full_columns(max_len: int) -> int:
    """Columns of a full layer's buffers: max_len, rounded up to whole ATTN_BLOCKs past one block."""
    return max_len if max_len <= ATTN_BLOCK else _whole_blocks(max_len)


def _is_fp8(t: torch.Tensor) -> bool:
    return t.element_size() == 1 and t.is_floating_point()


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A float8 buffer as bytes: indexed reads and writes move raw bytes (uint8 indexing is supported
    everywhere; float8 indexing is not on every backend and version). Other buffers as they are: a
    dtype view would cut autograd's graph, and training backpropagates through the cache."""
    return t.view(torch.uint8) if _is_fp8(t) else t


def _select(t: torch.Tensor, slots: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """t.index_select(dim, slots), through bytes for a float8 buffer (_raw)."""
    return t.view(torch.uint8).index_select(dim, slots).view(t.dtype) if _is_fp8(t) else t.index_select(dim, slots)


class CacheFullError(ValueError):
    """A request needs more positions than its cache slot holds."""


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype=torch.float32,
                 device="cpu", keep_full_window: bool = False, prefix_store: bool = False,
                 store_len: int | None = None, compute_dtype=None):
        """keep_full_window: sliding layers keep every position too (training decodes any canvas).
        prefix_store: sliding layers also keep the prefix store for `keep_prefix` (module docstring), of
        `store_len` positions (None: max_len; more than one encoder call writes, and at least the ring).
        dtype: what K and V are stored in; compute_dtype (default: dtype): what `read` returns. A narrower
        store (float8_e4m3fn: `--kv-cache-dtype fp8`) rounds K and V as they are written and widens
        them as they are read, for half the memory of bf16."""
        self.cfg, self.num_slots, self.max_len = cfg, num_slots, max_len
        self.dtype, self.compute_dtype = dtype, compute_dtype or dtype
        self.window = cfg.sliding_window
        self.size = {FULL: full_columns(max_len),
                     SLIDING: max_len if keep_full_window else min(self.window - 1, max_len)}
        self.store_len = min(max_len, store_len or max_len)
        if prefix_store and self.store_len < self.size[SLIDING]:
            raise ValueError(f"KVCache: store_len={store_len} is shorter than the sliding ring ({self.size[SLIDING]})")
        self.k, self.v = [], []
        # buffers hold size + 1 columns: the last one is the scratch column (module docstring)
        for i, t in enumerate(cfg.layer_types):
            shape = (num_slots, cfg.num_kv_heads[i], self.size[t] + 1, cfg.head_dims[i])
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.store = {}  # layer -> (k, v) [num_slots, kv_heads, store_len + 1, head_dim]: the prefix store
        for i, t in enumerate(cfg.layer_types):
            if prefix_store and t == SLIDING and self.size[t] < max_len:
                shape = (num_slots, cfg.num_kv_heads[i], self.store_len + 1, cfg.head_dims[i])
                self.store[i] = (torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device))
        # the position each store column holds (-1: none); the last column is the scratch column
        self.store_pos = (torch.full((num_slots, self.store_len + 1), -1, dtype=torch.long, device=device)
                          if self.store else None)
        self.pos = {t: torch.full((num_slots, self.size[t] + 1), -1, dtype=torch.long, device=device)
                    for t in set(cfg.layer_types)}
        # next free position of each slot = tokens already encoded
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)

    @staticmethod
    def position_bytes(cfg: ModelConfig, layer: int, dtype=torch.float32) -> int:
        """Bytes of K and V for one position of one slot in layer `layer`."""
        return 2 * cfg.num_kv_heads[layer] * cfg.head_dims[layer] * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def planned_bytes(cfg: ModelConfig, num_slots: int, max_len: int, dtype=torch.float32,
                      store_len: int | None = None) -> tuple[int, int]:
        """(bytes of the K/V buffers, bytes of the prefix store) a cache of this shape allocates."""
        ring = min(cfg.sliding_window - 1, max_len)
        stored = min(max_len, store_len or max_len)
        cache = store = 0
        for i, t in enumerate(cfg.layer_types):
            row = num_slots * KVCache.position_bytes(cfg, i, dtype)  # K and V, one position
            size = full_columns(max_len) if t == FULL else ring
            cache += row * (size + 1)
            if t == SLIDING and size < max_len:
                store += row * (stored + 1)
        return cache, store

    def bounded_store(self) -> tuple[int, int] | None:
        """(sliding ring positions, store positions) when the prefix store holds fewer positions than
        max_len, so only recent prefixes can be rebuilt (what `Scheduler(prefix_store=...)` takes); else None."""
        return (self.size[SLIDING], self.store_len) if self.store and self.store_len < self.max_len else None

    @property
    def device(self):
        return self.lengths.device

    def nbytes(self) -> int:  # the K/V buffers and the store (position tables left out)
        bufs = self.k + self.v + [x for kv in self.store.values() for x in kv]
        return sum(t.numel() * t.element_size() for t in bufs)

    def reset(self, slots=None):
        """Forget what the given slots (all if None) hold."""
        if slots is None:
            slots = torch.arange(self.num_slots, device=self.device)
        slots = torch.as_tensor(slots, device=self.device, dtype=torch.long)
        for t in self.pos:
            self.pos[t][slots] = -1
        if self.store_pos is not None:
            self.store_pos[slots] = -1
        self.lengths[slots] = 0

    def keep_prefix(self, slots: list[int], keep: list[int]) -> None:
        """Keep only positions < keep[i] of slot slots[i] (0 forgets everything): prefix caching hands a
        slot to a request whose prompt starts with those tokens. Full layers just forget the later
        positions; sliding rings are rebuilt from the prefix store (module docstring). A slot named twice keeps
        the shorter prefix, as the two calls one after the other would (one batched index write per table: a
        repeated index would leave which write lands to the device, and CUDA does not say)."""
        shortest: dict[int, int] = {}
        for slot, n in zip(slots, keep):
            shortest[slot] = min(n, shortest.get(slot, n))
        slots, keep = list(shortest), list(shortest.values())
        if self.store and any(n > 0 for n in keep):
            self._restore_rings(slots, keep)
        slot_t = torch.as_tensor(slots, device=self.device, dtype=torch.long)
        keep_t = torch.as_tensor(keep, device=self.device, dtype=torch.long)
        for p in (*self.pos.values(), *([self.store_pos] if self.store_pos is not None else [])):
            rows = p.index_select(0, slot_t)
            p.index_copy_(0, slot_t, torch.where(rows < keep_t[:, None], rows, -1))
        self.lengths.index_copy_(0, slot_t, keep_t)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the first n positions of slot src into slot dst (another request's prompt prefix); follow
        with `keep_prefix([dst], [n])`, which forgets the rest and rebuilds dst's rings. Of the sliding
        layers, the store columns of the last `store_len` positions before n are copied (with src's
        record of which of them it still holds)."""
        if any(t == SLIDING and self.size[t] < self.max_len for t in self.cfg.layer_types) and not self.store:
            raise ValueError("copy_prefix needs the prefix store for sliding layers (prefix_store=True)")
        cols = torch.arange(max(0, n - self.store_len), n, device=self.device) % self.store_len
        for layer, t in enumerate(self.cfg.layer_types):
            if layer in self.store:
                for b in map(_raw, self.store[layer]):
                    b[dst, :, cols] = b[src, :, cols]
            else:  # columns are positions
                for b in map(_raw, (self.k[layer], self.v[layer])):
                    b[dst, :, :n] = b[src, :, :n]
        if self.store:
            self.store_pos[dst] = -1
            self.store_pos[dst, cols] = self.store_pos[src, cols]
        for p in self.pos.values():
            p[dst] = p[src]
        self.lengths[dst] = self.lengths[src]

    def _restore_rings(self, slots: list[int], keep: list[int]) -> None:
        size = self.size[SLIDING]
        for slot, n in zip(slots, keep):
            if n <= 0:
                continue
            pos = torch.arange(max(0, n - size), n, device=self.device)  # what the ring held after n - 1
            cols, scols = pos % size, pos % self.store_len
            if not torch.equal(self.store_pos[slot, scols], pos):  # one host read per reuse
                raise RuntimeError(f"KVCache: slot {slot}'s prefix store no longer holds positions "
                                   f"{int(pos[0])}..{n - 1}; a prefix of {n} cannot be reused from it")
            for layer, (sk, sv) in self.store.items():
                _raw(self.k[layer])[slot][:, cols] = _raw(sk)[slot][:, scols]
                _raw(self.v[layer])[slot][:, cols] = _raw(sv)[slot][:, scols]
            self.pos[SLIDING][slot] = -1
            self.pos[SLIDING][slot, cols] = pos

    def span(self, needed: int | None) -> int | None:
        """How many leading columns of the full layers a call must read when its rows attend to cached
        positions < `needed` (a bound known on the host): whole ATTN_BLOCKs, or None for all of them.
        Reading fewer columns makes attention cost follow the context in use, not max_len; the columns
        left out only ever hold masked keys, and whole masked blocks leave attention's results as
        they were (tests/test_kv_cache.py checks it bit for bit), so a row's output does not depend on
        the longest row it is batched with."""
        cols = self.size[FULL]
        if needed is None or cols <= ATTN_BLOCK:
            return None
        upto = _whole_blocks(max(needed, 1))
        return upto if upto < cols else None

    def old_positions(self, slots: torch.Tensor, upto: int | None = None) -> dict:
        """Position tables of the given slots, read once per forward before any layer writes; the full
        layers' cut to `upto` columns (`span`)."""
        return {t: p[:, :upto if t == FULL and upto else self.size[t]].index_select(0, slots)
                for t, p in self.pos.items()}

    def read(self, layer: int, slots: torch.Tensor, upto: int | None = None):
        """K and V [B, Hk, S, D] of the given slots (without the scratch column); a full layer's cut to
        `upto` columns (`span`)."""
        t = self.cfg.layer_types[layer]
        size = upto if t == FULL and upto else self.size[t]
        k, v = (_select(b[:, :, :size], slots) for b in (self.k[layer], self.v[layer]))
        return k.to(self.compute_dtype), v.to(self.compute_dtype)  # no copy when stored as computed

    def _targets(self, layer_type: str, slots: torch.Tensor, q_pos: torch.Tensor):
        """(slot rows, cache columns, kept-token mask), all [B, T]: a token this layer type keeps goes to
        its ring column, any other token to the scratch column."""
        size = self.size[layer_type]
        end = q_pos.max(dim=1, keepdim=True).values + 1
        keep = (q_pos >= 0) & (q_pos >= end - size)  # a ring keeps only the newest `size` positions
        cols = torch.where(keep, q_pos % size, size)
        return slots[:, None].expand_as(q_pos), cols, keep

    def check_fits(self, q_pos: torch.Tensor, top: int | None = None):
        """Raise CacheFullError if a position is past max_len. `top` = q_pos.max() when the caller
        knows it on the host (reading it from a device tensor is a host sync)."""
        top = int(q_pos.max()) if top is None else top
        if top >= self.max_len:
            raise CacheFullError(f"position {top} does not fit the KV cache (max_len={self.max_len})")

    def write(self, layer: int, slots: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, Hk, T, D] for tokens at positions q_pos [B, T]."""
        rows, cols, _ = self._targets(self.cfg.layer_types[layer], slots, q_pos)
        kb, vb = self.k[layer], self.v[layer]
        k, v = k.transpose(1, 2).to(kb.dtype), v.transpose(1, 2).to(vb.dtype)  # [B, T, Hk, D]
        _raw(kb)[rows, :, cols, :] = _raw(k)
        _raw(vb)[rows, :, cols, :] = _raw(v)
        if layer in self.store:  # every position to its store column, padding to the scratch column
            sk, sv = self.store[layer]
            cols = self._store_columns(q_pos)
            _raw(sk)[rows, :, cols, :] = _raw(k)
            _raw(sv)[rows, :, cols, :] = _raw(v)

    def _store_columns(self, q_pos: torch.Tensor) -> torch.Tensor:
        """The prefix store column of each position [B, T]; padding (-1) goes to the scratch column."""
        return torch.where(q_pos >= 0, q_pos % self.store_len, self.store_len)

    def commit_positions(self, slots: torch.Tensor, q_pos: torch.Tensor):
        """After all layers wrote: record the new positions and advance slot lengths."""
        for t in self.pos:
            rows, cols, keep = self._targets(t, slots, q_pos)
            self.pos[t][rows, cols] = torch.where(keep, q_pos, -1)  # the scratch column stays empty
        if self.store_pos is not None:
            cols = self._store_columns(q_pos)
            self.store_pos[slots[:, None].expand_as(q_pos), cols] = torch.where(q_pos >= 0, q_pos, -1)
        new_len = torch.maximum(self.lengths.index_select(0, slots), q_pos.max(dim=1).values + 1)
        self.lengths.index_copy_(0, slots, new_len)

    def layer_kv(self, layer: int, slot: int):
        """(k, v, positions) of one slot and layer in position order (for tests and inspection)."""
        t = self.cfg.layer_types[layer]
        pos = self.pos[t][slot, :self.size[t]]
        order = torch.argsort(pos)
        order = order[pos[order] >= 0]
        k, v = (_select(b[slot], order, dim=1) for b in (self.k[layer], self.v[layer]))
        return k.to(self.compute_dtype), v.to(self.compute_dtype), pos[order]
