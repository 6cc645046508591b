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
