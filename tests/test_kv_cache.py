"""KV cache writes are free of data-dependent shapes (no host sync on a GPU) and keep exactly the
positions a layer type holds; the parity tests check the values against the reference."""

from __future__ import annotations

import pytest
import torch
from canvaslm.checkpoint import build_random_model
from canvaslm.kv_cache import CacheFullError, KVCache
from canvaslm.shapes import model_config
from canvaslm.testing import SyncRecorder

def _padded_batch(lengths, start=0):
    """Positions [B, T] right-padded with -1: row b holds start .. start + lengths[b] - 1."""
    T = max(lengths)
    pos = torch.full((len(lengths), T), -1)
    for b, n in enumerate(lengths):
        pos[b, :n] = torch.arange(start, start + n)
    return pos


def test_encode_writes_the_cache_without_syncing(monkeypatch):
    cfg = model_config("tiny", canvas_length=8)
    model = build_random_model(cfg)
    cache = KVCache(cfg, 3, 4 * cfg.sliding_window)
    recorder = SyncRecorder()
    for name in ("write", "commit_positions", "old_positions", "read"):
        method = getattr(cache, name)

        def recorded(*args, _method=method, **kwargs):
            with recorder:
                return _method(*args, **kwargs)
        monkeypatch.setattr(cache, name, recorded)
    slots = torch.tensor([2, 0])
    # a long prompt that wraps the sliding ring beside a short, right-padded one, then a second chunk
    pos = _padded_batch([cfg.sliding_window + 5, 3])
    with torch.no_grad():
        model.encode(torch.randint(0, cfg.vocab_size, pos.shape), pos, slots, cache,
                     max_position=cfg.sliding_window + 4)
        pos2 = torch.stack([torch.arange(cfg.sliding_window + 5, cfg.sliding_window + 9), torch.arange(3, 7)])
        model.encode(torch.randint(0, cfg.vocab_size, pos2.shape), pos2, slots, cache, max_position=int(pos2.max()))
    assert recorder.found == []
    assert cache.lengths.tolist() == [7, 0, cfg.sliding_window + 9]
    # every layer holds exactly what its type keeps, in position order; the scratch column never shows
    for layer, t in enumerate(cfg.layer_types):
        size = cache.size[t]
        for slot, n in ((2, cfg.sliding_window + 9), (0, 7)):
            _, _, kept = cache.layer_kv(layer, slot)
            assert kept.tolist() == list(range(max(0, n - size), n)), (layer, slot)
        assert cache.old_positions(slots)[t].shape == (2, size)
        assert cache.read(layer, slots)[0].shape[2] == size
    assert int(cache.old_positions(torch.tensor([1]))[cfg.layer_types[0]].max()) == -1  # untouched slot


def test_the_sync_recorder_sees_a_boolean_mask_write():
    """The recorder is what the test above relies on: the former masked write trips it."""
    buf, keep = torch.zeros(2, 4), torch.tensor([[True, False], [False, True]])
    recorder = SyncRecorder()
    with recorder:
        buf[torch.tensor([[0, 0], [1, 1]])[keep], torch.tensor([[1, 2], [3, 0]])[keep]] = torch.ones(2, 2)[keep]
    assert "index" in recorder.found


def test_check_fits_uses_a_given_top_and_names_the_limit():
    cfg = model_config("tiny", canvas_length=8)
    cache = KVCache(cfg, 1, 16)
    pos = torch.arange(20)[None]
    with pytest.raises(CacheFullError, match=r"position 19 .*max_len=16"):
        cache.check_fits(pos)
    with pytest.raises(CacheFullError, match=r"position 16 "):
        cache.check_fits(pos, top=16)
    cache.check_fits(pos[:, :16], top=15)


@pytest.mark.parametrize("threads", [1, 2])
def test_full_layers_read_only_the_blocks_a_call_needs_with_unchanged_results(threads):
    """Past one ATTN_BLOCK a full layer keeps whole blocks of positions, and a call that knows its bound
    reads only the blocks below it: attention costs follow the context in use, not max_len. The
    results are those of reading every column, bit for bit, so a short row's output does not depend on
    a longer row beside it (or on max_len)."""
    from canvaslm.kv_cache import ATTN_BLOCK, full_columns

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = model_config("tiny", canvas_length=16)
        model = build_random_model(cfg, seed=1).eval()
        cache = KVCache(cfg, 2, 3 * ATTN_BLOCK + 100)
        assert cache.size["full_attention"] == full_columns(3 * ATTN_BLOCK + 100) == 4 * ATTN_BLOCK
        assert KVCache(cfg, 2, 300).size["full_attention"] == 300  # a short cache is left as it is
        assert cache.span(None) is None and cache.span(5) == ATTN_BLOCK and cache.span(ATTN_BLOCK + 1) == 2 * ATTN_BLOCK
        assert cache.span(4 * ATTN_BLOCK) is None  # every block: no cut
        slots = torch.tensor([0, 1])
        g = torch.Generator().manual_seed(0)
        lens = [700, 2500]  # one block, and three
        pos = _padded_batch(lens)
        with torch.no_grad():
            model.encode(torch.randint(0, cfg.vocab_size, pos.shape, generator=g), pos, slots, cache, fresh=True)
            canvas = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
            starts = torch.tensor(lens)
            every = model.denoise(canvas, slots, cache, canvas_start=starts)
            cut = model.denoise(canvas, slots, cache, canvas_start=starts, max_start=max(lens))
            short = model.denoise(canvas[:1], slots[:1], cache, canvas_start=starts[:1], max_start=lens[0])
            chunk = torch.stack([torch.arange(lens[0], lens[0] + 8), torch.arange(lens[1], lens[1] + 8)])
            toks = torch.randint(0, cfg.vocab_size, chunk.shape, generator=g)
            enc_every = model.encode(toks, chunk, slots, cache, write=False)
            enc_cut = model.encode(toks, chunk, slots, cache, write=False, max_position=lens[1] + 7)
            enc_short = model.encode(toks[:1], chunk[:1], slots[:1], cache, write=False, max_position=lens[0] + 7)
        assert torch.equal(every, cut) and torch.equal(every[:1], short)
        assert torch.equal(enc_every, enc_cut) and torch.equal(enc_every[:1], enc_short)
    finally:
        torch.set_num_threads(old)


def test_keep_prefix_with_a_slot_named_twice_keeps_the_shorter_prefix():
    """A plan may name a slot twice (an owner cancelled before its first step, the slot retaken): the cache
    keeps what the two calls one after the other would, the shorter prefix, whichever order they come in, not
    what a repeated index write leaves (the later on a CPU; unspecified on CUDA)."""
    cfg = model_config("tiny", canvas_length=16)
    results = []
    for pairs in ([(0, 8), (0, 20)], [(0, 20), (0, 8)], [(0, 8)]):
        cache = KVCache(cfg, 2, 64, prefix_store=True)
        slots, pos = torch.tensor([0, 1]), torch.arange(40).expand(2, 40)
        for layer in range(len(cfg.layer_types)):
            shape = (2, cfg.num_kv_heads[layer], 40, cfg.head_dims[layer])
            cache.write(layer, slots, pos, torch.randn(shape), torch.randn(shape))
        cache.commit_positions(slots, pos)
        cache.keep_prefix([s for s, _ in pairs], [n for _, n in pairs])
        results.append((int(cache.lengths[0]), {t: sorted(p[0][p[0] >= 0].tolist()) for t, p in cache.pos.items()}))
    assert results[0] == results[1] == results[2]
    assert results[2][0] == 8 and all(max(p) == 7 for p in results[2][1].values())
