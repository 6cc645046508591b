"""Side-by-side parity with the `transformers` reference: encoder KV, decoder logits, seeded generation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from canvaslm import LLM, SamplingParams
from canvaslm.checkpoint import load_model
from canvaslm.kv_cache import KVCache

TOL = 1e-4


def _ref_cache(ref):
    from transformers.cache_utils import DynamicCache
    return DynamicCache(config=ref.config.get_text_config(decoder=True))


def _prompt(n, vocab, seed):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_encoder_kv_and_decoder_logits(reference):
    name, path, ref = reference
    model = load_model(path)
    cfg = model.cfg
    n = 3 * cfg.sliding_window + 5  # context longer than the sliding window
    ids = torch.tensor([_prompt(n, cfg.vocab_size, 1)])
    cache_ref = _ref_cache(ref)
    enc_ref = ref.model.encoder(input_ids=ids, past_key_values=cache_ref, position_ids=torch.arange(n)[None])
    cache = KVCache(cfg, 1, n + cfg.canvas_length)
    slots = torch.tensor([0])
    hidden = model.encode(ids, torch.arange(n)[None], slots, cache)
    assert (hidden - enc_ref.last_hidden_state).abs().max() <= TOL * max(1.0, hidden.abs().max().item())
    for layer in range(cfg.num_layers):
        k, v, pos = cache.layer_kv(layer, 0)
        rk, rv = cache_ref.layers[layer].keys[0], cache_ref.layers[layer].values[0]
        assert k.shape == rk.shape, f"layer {layer}: kept {k.shape[1]} positions, reference {rk.shape[1]}"
        assert (k - rk).abs().max() <= TOL and (v - rv).abs().max() <= TOL, f"layer {layer}"
        assert pos.tolist() == list(range(n - k.shape[1], n))
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(2))
    sc = torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=torch.Generator().manual_seed(3)) * 4
    for sc_logits in (None, sc):
        want = ref(decoder_input_ids=canvas, past_key_values=cache_ref, self_conditioning_logits=sc_logits).logits
        got = model.denoise(canvas, slots, cache, sc_logits=sc_logits)
        assert (got - want).abs().max() <= TOL
    # the decoder read the cache and wrote nothing
    assert int(cache.lengths[0]) == n and cache_ref.get_seq_length() == n


@torch.no_grad()
def test_fresh_encode_forgets_the_slot_and_skips_its_empty_rows(reference, monkeypatch):
    """encode(fresh=True) on a slot that holds an earlier prompt: the slot starts over, attention never
    reads its (now empty) cache rows, and encoder and decoder still equal the reference."""
    name, path, ref = reference
    model = load_model(path)
    cfg = model.cfg
    n = cfg.sliding_window + 7
    ids, pos, slots = torch.tensor([_prompt(n, cfg.vocab_size, 4)]), torch.arange(n)[None], torch.tensor([0])
    cache_ref = _ref_cache(ref)
    want = ref.model.encoder(input_ids=ids, past_key_values=cache_ref, position_ids=pos).last_hidden_state
    cache = KVCache(cfg, 1, 2 * n + cfg.canvas_length)  # holds an earlier, longer prompt:
    model.encode(torch.tensor([_prompt(2 * n, cfg.vocab_size, 5)]), torch.arange(2 * n)[None], slots, cache)
    with monkeypatch.context() as m:
        m.setattr(cache, "read", lambda *a: pytest.fail("a fresh encode read the cache"))
        got = model.encode(ids, pos, slots, cache, fresh=True)
    assert (got - want).abs().max() <= TOL * max(1.0, got.abs().max().item())
    assert int(cache.lengths[0]) == n
    assert all(int(p.max()) == n - 1 for p in cache.old_positions(slots).values())  # the longer prompt is gone
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(6))
    logits = model.denoise(canvas, slots, cache)
    assert (logits - ref(decoder_input_ids=canvas, past_key_values=cache_ref).logits).abs().max() <= TOL


@torch.no_grad()
def test_batched_rows_match_single_reference_rows(reference):
    """Two prompts of different lengths in one batch: every row equals the reference run on it alone."""
    name, path, ref = reference
    model = load_model(path)
    cfg = model.cfg
    prompts = [_prompt(5, cfg.vocab_size, 4), _prompt(2 * cfg.sliding_window + 3, cfg.vocab_size, 5)]
    T = max(map(len, prompts))
    tokens = torch.zeros(2, T, dtype=torch.long)
    pos = torch.full((2, T), -1)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)], pos[b, :len(p)] = torch.tensor(p), torch.arange(len(p))
    cache = KVCache(cfg, 2, T + cfg.canvas_length)
    slots = torch.arange(2)
    model.encode(tokens, pos, slots, cache)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=torch.Generator().manual_seed(6))
    got = model.denoise(canvas, slots, cache)
    for b, p in enumerate(prompts):
        cache_ref = _ref_cache(ref)
        ref.model.encoder(input_ids=torch.tensor([p]), past_key_values=cache_ref)
        want = ref(decoder_input_ids=canvas[b:b + 1], past_key_values=cache_ref).logits
        assert (got[b:b + 1] - want).abs().max() <= TOL


def _cut(ids, n, eos):
    ids = ids[:n]
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    return ids if cut is None else ids[:cut + 1]


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("steps", [3, 10])
def test_seeded_generation_is_token_identical(reference, seed, steps):
    name, path, ref = reference
    llm = LLM(path, device="cpu", sampler_impl="reference")  # transformers' draws (auto draws by inverse CDF)
    C = llm.cfg.canvas_length
    n_new = 3 * C + C // 2  # several canvases, the last one partial
    prompt = _prompt(2 * llm.cfg.sliding_window + 1, llm.cfg.vocab_size, seed + 10)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n_new, max_denoising_steps=steps)
    want = _cut(out.sequences[0, len(prompt):].tolist(), n_new, set(llm.eos_ids))
    got = llm.generate(prompt, SamplingParams(max_new_tokens=n_new, max_denoising_steps=steps, seed=seed))[0]
    assert got.token_ids == want
    assert got.finish_reason == ("stop" if want[-1] in llm.eos_ids else "length")
    assert got.decoder_passes >= 1


@pytest.mark.parametrize("seed", [0, 3])
def test_batch_generation_matches_left_padded_reference(reference, seed):
    name, path, ref = reference
    llm = LLM(path, device="cpu", sampler_impl="reference")
    C, V = llm.cfg.canvas_length, llm.cfg.vocab_size
    a, b = _prompt(4, V, seed + 20), _prompt(11, V, seed + 21)
    ids = torch.tensor([[0] * 7 + a, b])
    mask = torch.tensor([[0] * 7 + [1] * 4, [1] * 11])
    n_new = 2 * C + 3
    torch.manual_seed(seed)
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=n_new, max_denoising_steps=5)
    got = llm.generate([a, b], SamplingParams(max_new_tokens=n_new, max_denoising_steps=5),
                       generator=torch.Generator().manual_seed(seed))
    for row in range(2):
        assert got[row].token_ids == _cut(out.sequences[row, 11:].tolist(), n_new, set(llm.eos_ids))


def test_cli_generate_matches_reference(reference):
    name, path, ref = reference
    if name != "window8_canvas16":
        pytest.skip("one config is enough for the CLI round trip")
    prompt = _prompt(9, 384, 30)
    for seed, steps, n_new in ((5, 4, 40), (6, 7, 20)):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=n_new, max_denoising_steps=steps)
        want = _cut(out.sequences[0, 9:].tolist(), n_new, {1})
        res = subprocess.run([sys.executable, "-m", "canvaslm.cli", "generate", str(path), "--prompt-ids",
                              ",".join(map(str, prompt)), "--max-new-tokens", str(n_new), "--steps", str(steps),
                              "--seed", str(seed), "--device", "cpu", "--json", "--sampler-impl", "reference"],
                             capture_output=True, text=True, check=True)
        got = json.loads(res.stdout)
        assert got["token_ids"] == want
        assert set(got) >= {"token_ids", "text", "tokens_per_forward"}
