"""The public API on a tiny checkpoint: padding, per-request seeds, defaults, text in / text out."""

from __future__ import annotations

import pytest
import torch

from canvaslm import LLM, SamplingParams
from canvaslm.generate import GenerationError


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu")


def test_left_and_right_padding_match_unpadded(llm):
    a, b = [10, 11, 12], [20, 21, 22, 23, 24, 25]
    params = [SamplingParams(seed=3, max_new_tokens=20), SamplingParams(seed=4, max_new_tokens=20)]
    want = [r.token_ids for r in llm.generate([a, b], params)]
    left = torch.tensor([[0, 0, 0] + a, b]), torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    right = torch.tensor([a + [0, 0, 0], b]), torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    for ids, mask in (left, right):
        assert [r.token_ids for r in llm.generate(ids, params, attention_mask=mask)] == want
    with pytest.raises(GenerationError, match="padding in the middle"):
        llm.generate(torch.tensor([[5, 0, 6]]), attention_mask=torch.tensor([[1, 0, 1]]))


def test_per_request_seed_gives_each_row_its_own_stream(llm):
    """Two copies of a request in one batch, next to a request that runs longer, come out identical:
    rows draw only from their own generator, and stop drawing when they stop."""
    hello = SamplingParams(seed=7, max_new_tokens=24)
    out = llm.generate(["Hello", "a longer prompt", "Hello"],
                       [hello, SamplingParams(seed=1, max_new_tokens=40), hello])
    assert out[0].token_ids == out[2].token_ids and out[0].text == out[2].text
    again = llm.generate(["Hello", "a longer prompt", "Hello"],
                         [hello, SamplingParams(seed=1, max_new_tokens=40), hello])
    assert [r.token_ids for r in again] == [r.token_ids for r in out]
    assert llm.generate("Hello", hello)[0].token_ids == llm.generate("Hello", hello)[0].token_ids


def test_long_prompt_lists_run_in_batches_with_the_same_outputs(llm, tiny_checkpoint, capsys):
    """More prompts than max_batch run in batches (the last one a single row): seeded outputs do not change,
    and a progress bar counts the requests."""
    prompts = ["Hello", "a longer prompt here", "x", "yy", "the last one"]
    params = [SamplingParams(seed=10 + i, max_new_tokens=24 + 8 * (i % 2)) for i in range(5)]
    want = [r.token_ids for r in llm.generate(prompts, params)]
    small = LLM(tiny_checkpoint, device="cpu", max_batch=2)
    assert [r.token_ids for r in small.generate(prompts, params)] == want
    assert "5/5" in capsys.readouterr().err  # 3 batches: the bar shows by default
    small.generate(prompts, params, use_tqdm=False)
    assert "5/5" not in capsys.readouterr().err
    with pytest.raises(GenerationError, match="max_batch"):
        LLM(tiny_checkpoint, device="cpu", max_batch=0)


def test_rows_that_stop_leave_the_decoder_call_and_no_output_changes(llm, tiny_checkpoint, monkeypatch):
    """With per-request seeds, a row whose canvas stopped (or whose request ended) is no longer run through
    the decoder; every output (and its decoder passes) is still what the row gets alone in that geometry,
    with biases, penalties, min_tokens and pins on some rows."""
    from canvaslm.sampling.constraints import PinnedConstraint

    prompts = ["Hello", "a longer prompt here", "x", "yy"]
    params = [SamplingParams(seed=1, max_new_tokens=40, max_denoising_steps=2),
              SamplingParams(seed=2, max_new_tokens=40, max_denoising_steps=9, logit_bias={5: 3.0}),
              SamplingParams(seed=3, max_new_tokens=24, max_denoising_steps=5, repetition_penalty=1.5,
                             min_tokens=20),
              SamplingParams(seed=4, max_new_tokens=40, max_denoising_steps=7,  # EOS banned: it reaches 20
                             constraint=PinnedConstraint({3: 7, 20: 9}, ban_ids=llm.eos_ids, ban_until=21))]
    rows_per_call = []
    denoise = llm.model.denoise

    def spy(canvas, *a, **kw):
        rows_per_call.append(canvas.shape[0])
        return denoise(canvas, *a, **kw)

    monkeypatch.setattr(llm.model, "denoise", spy)
    together = llm.generate(prompts, params)
    assert rows_per_call[0] == 4 and min(rows_per_call) == 1  # the batch shrinks as rows stop
    monkeypatch.setattr(llm.model, "denoise", denoise)
    alone = LLM(tiny_checkpoint, device="cpu", max_batch=1).generate(prompts, params)  # the list's geometry
    assert [(r.token_ids, r.decoder_passes) for r in together] == [(r.token_ids, r.decoder_passes) for r in alone]
    assert together[3].token_ids[3] == 7 and together[3].token_ids[20] == 9


def test_defaults_come_from_generation_config(llm):
    res = llm.generate("Hi", SamplingParams(seed=0))[0]
    assert len(res.token_ids) <= llm.defaults.max_new_tokens == 32
    assert res.decoder_passes <= 8 * 2  # 8 steps per canvas, 16-token canvases
    if res.finish_reason == "stop":
        assert res.token_ids[-1] in llm.eos_ids and not set(res.token_ids[:-1]) & set(llm.eos_ids)


def test_max_new_tokens_spans_canvases_and_eos_ends_output(llm):
    for seed in range(6):
        res = llm.generate("abc", SamplingParams(seed=seed, max_new_tokens=45, max_denoising_steps=4))[0]
        eos = [i for i, t in enumerate(res.token_ids) if t in llm.eos_ids]
        assert eos == ([len(res.token_ids) - 1] if res.finish_reason == "stop" else [])
        assert res.finish_reason == "stop" or len(res.token_ids) == 45
        assert res.text == llm.tokenizer.decode(res.token_ids)


def test_temperature_scales_the_schedule(llm):
    p = SamplingParams(temperature=0.5).resolve(llm.defaults)
    assert (p.t_min, p.t_max) == pytest.approx((0.2, 0.4))


def test_cli_chat_and_text_prompts(tiny_checkpoint):
    import json
    import subprocess
    import sys

    from canvaslm.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tiny_checkpoint)
    r = subprocess.run([sys.executable, "-m", "canvaslm.cli", "generate", str(tiny_checkpoint), "--prompt", "hi",
                        "--chat", "--seed", "1", "--json"], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] == len(tok.encode_chat([{"role": "user", "content": "hi"}]))
    assert out["text"] == tok.decode(out["token_ids"])
    llm = LLM(tiny_checkpoint)
    assert out["token_ids"] == llm.chat([{"role": "user", "content": "hi"}], SamplingParams(seed=1)).token_ids


def test_cli_sampling_cuts(tiny_checkpoint):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "canvaslm.cli", "generate", str(tiny_checkpoint), "--prompt", "hi", "--seed", "4",
           "--max-new-tokens", "20", "--json"]
    r = subprocess.run(cmd + ["--top-k", "3", "--top-p", "0.9", "--min-p", "0.01", "--frequency-penalty", "0.5",
                              "--presence-penalty", "0.2", "--repetition-penalty", "1.2"],
                       capture_output=True, text=True, check=True)
    want = LLM(tiny_checkpoint).generate("hi", SamplingParams(seed=4, max_new_tokens=20, top_k=3, top_p=0.9,
                                                               min_p=0.01, frequency_penalty=0.5, presence_penalty=0.2,
                                                               repetition_penalty=1.2))[0]
    assert json.loads(r.stdout)["token_ids"] == want.token_ids
    for flag, value, name in [("--top-p", "2", "top_p"), ("--repetition-penalty", "-1", "repetition_penalty")]:
        bad = subprocess.run(cmd + [flag, value], capture_output=True, text=True)
        assert bad.returncode != 0 and name in bad.stderr and "Traceback" not in bad.stderr


def test_stop_token_ids_end_the_output(llm):
    """An extra stop id cuts the output right after its first occurrence, as an EOS would."""
    base = llm.generate("Hello", SamplingParams(seed=2, max_new_tokens=32))[0].token_ids
    t = next(x for x in base[3:] if x not in llm.eos_ids)
    cut = llm.generate("Hello", SamplingParams(seed=2, max_new_tokens=32, stop_token_ids=[t]))[0]
    assert cut.token_ids == base[:base.index(t) + 1] and cut.finish_reason == "stop"
    with pytest.raises(GenerationError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[-1])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        llm.generate("Hello", SamplingParams(stop_token_ids=[10**6]))


def test_from_model_wraps_a_model_in_memory(tiny_checkpoint):
    from canvaslm.llm import LLM, GenerationError, SamplingParams

    loaded = LLM(tiny_checkpoint, device="cpu")
    mem = LLM.from_model(loaded.model, loaded.defaults, max_batch=4)
    ids = loaded.encode_prompt("Hello there, general Kenobi")
    sp = SamplingParams(seed=3, max_new_tokens=24)
    assert mem.generate(ids, sp)[0].token_ids == loaded.generate(ids, sp)[0].token_ids
    assert mem.generate_continuous([ids, ids[:8]], sp)[0].token_ids == loaded.generate_continuous(ids, sp)[0].token_ids
    with pytest.raises(GenerationError, match=r"the in-memory model \(LLM.from_model\) has no tokenizer.json"):
        mem.generate("text needs a tokenizer")
    with pytest.raises(GenerationError, match="max_batch"):
        LLM.from_model(loaded.model, max_batch=0)


def test_chat_takes_a_batch_of_conversations(tiny_checkpoint):
    """vLLM's LLM.chat(list of conversations): one batch (LLM.generate of the templated prompts, whose outputs
    follow the batch's KV geometry), one result each (per-conversation params, forced tool calls too); a bad
    conversation is named."""
    import json

    from canvaslm.generate import GenerationError

    llm = LLM(tiny_checkpoint, device="cpu")
    convs = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "terse"}, {"role": "user", "content": "yo"}]]
    sps = [SamplingParams(seed=1, max_new_tokens=16), SamplingParams(seed=2, max_new_tokens=16)]
    batch = llm.chat(convs, sps)
    want = llm.generate([llm.tokenizer.encode_chat(c) for c in convs], sps)
    assert isinstance(batch, list) and [r.token_ids for r in batch] == [r.token_ids for r in want]
    assert llm.chat(convs[:1], sps[:1])[0].token_ids == llm.chat(convs[0], sps[0]).token_ids  # a batch of one
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}
    calls = llm.chat(convs, SamplingParams(seed=3, max_new_tokens=48), tools=[tool], tool_choice="required")
    assert all(isinstance(json.loads(r.tool_calls[0]["function"]["arguments"])["n"], int) for r in calls)
    with pytest.raises(GenerationError, match=r"chat \(conversation 1\): messages\[0\]\.role"):
        llm.chat([convs[0], [{"role": 3, "content": "x"}]])


def test_seeds_beyond_32_bits_count_on_cpu(llm):
    """torch's CPU generator keeps a seed's low 32 bits: seeds 7, 7 + 2**32 and 7 + 2**40 drew alike, and a
    thought's answer (answer_seed: + 2**62) reused its thought's stream. Seeds below 2**32 are as torch's."""
    from canvaslm.sampling.thinking import answer_seed

    def state(seed):
        return llm._generator(seed).get_state()

    assert torch.equal(state(7), torch.Generator().manual_seed(7).get_state())  # transformers' draws
    states = [state(s) for s in (7, 7 + 2**32, 7 + 2**40, answer_seed(7), 2**64 - 1)]
    assert all(not torch.equal(a, b) for i, a in enumerate(states) for b in states[i + 1:])
    outs = [llm.generate("Hi", SamplingParams(seed=s, max_new_tokens=16))[0].token_ids for s in (7, 7 + 2**32)]
    assert outs[0] != outs[1]


def test_temperature_and_schedule_stay_within_float32(llm):
    """t_max x temperature beyond float32's max was inf there: every output all pad, finish 'length'."""
    from canvaslm.config import ConfigError, DiffusionParams

    with pytest.raises(GenerationError, match=r"temperature=1e\+39 .* beyond float32"):
        llm.generate("Hi", SamplingParams(temperature=1e39, max_new_tokens=4))
    with pytest.raises(GenerationError, match=r"t_max=1e\+39 is beyond float32"):
        SamplingParams(t_max=1e39).resolve(llm.defaults)
    assert SamplingParams(temperature=1e30).resolve(llm.defaults).t_max == pytest.approx(0.8e30)
    for name in ("t_min", "t_max", "entropy_bound", "confidence_threshold"):
        with pytest.raises(ConfigError, match=f"{name} must be finite, got inf"):
            DiffusionParams(**{name: float("inf")})
        with pytest.raises(ConfigError, match=name):
            DiffusionParams(**{name: float("nan")})


def test_prompt_forms_and_bad_ids(llm):
    """A 1-D tensor or a list of numpy ints is one prompt; an id that is no integer is refused by value (2.7
    became 2); params must be SamplingParams."""
    import numpy as np

    sp = SamplingParams(seed=0, max_new_tokens=4)
    want = llm.generate([[2, 12, 13]], sp)[0].token_ids
    for prompt in (torch.tensor([2, 12, 13]), [np.int64(2), np.int64(12), 13], np.array([2, 12, 13]),
                   (2, 12, 13)):
        out = llm.generate(prompt, sp)
        assert len(out) == 1 and out[0].token_ids == want
    assert llm.generate([torch.tensor([2, 12, 13])], sp)[0].token_ids == want
    for bad, shown in (([[2.7, 12]], "2.7"), ([2.7, 12], "2.7"), ([[2, 2.0]], "2.0"), ([[True, 12]], "True")):
        with pytest.raises(GenerationError, match=f"prompt token ids must be integers, got {shown}"):
            llm.generate(bad, sp)
    with pytest.raises(GenerationError, match="a prompt is a string or a list of token ids, got 5"):
        llm.generate(["a", 5], sp)
    for params in ({"max_new_tokens": 3}, [{"max_new_tokens": 3}]):
        with pytest.raises(GenerationError, match="must be a SamplingParams or a list of them"):
            llm.generate(["a"], params)


def test_sampling_params_field_types():
    """A string or bool temperature, or stop ids that are no list of ints, name the field and the value (a
    string temperature was a TypeError, True was taken as 1, stop_token_ids=5 a TypeError)."""
    for kw, shown in ((dict(temperature="1"), "'1'"), (dict(temperature=True), "True"),
                      (dict(stop_token_ids=5), "5"), (dict(stop_token_ids="ab"), "'ab'"),
                      (dict(stop_token_ids=[1.0]), "1.0")):
        with pytest.raises(GenerationError, match=f"SamplingParams.{next(iter(kw))} must be") as e:
            SamplingParams(**kw)
        assert f"got {shown}" in str(e.value) or f"got ({shown}" in str(e.value)
    assert SamplingParams(temperature=1, stop_token_ids=[5]).stop_token_ids == (5,)


def test_a_stop_token_is_left_out_of_text(llm):
    """As vLLM: the stop id that ended the output stays in token_ids, its text is not in `text`."""
    c = llm.tokenizer.encode("c", add_special_tokens=False)[0]
    r = llm.generate("Hi", SamplingParams(seed=0, max_new_tokens=20, logit_bias={c: 100}, stop_token_ids=[c],
                                          min_tokens=3))[0]
    assert r.finish_reason == "stop" and r.token_ids[-1] == c and len(r.token_ids) == 4
    assert r.text == llm.decode(r.token_ids[:-1]) and not r.text.endswith("c")
    long = llm.generate("Hi", SamplingParams(seed=0, max_new_tokens=3, logit_bias={c: 100}))[0]
    assert long.finish_reason == "length" and long.text == "ccc"  # not a stop: every token's text


def test_top_k_minus_one_means_no_cut(llm):
    """vLLM's SamplingParams (and this server) read top_k=-1 as "all"; it was a ConfigError offline."""
    sp = dict(seed=3, max_new_tokens=8)
    assert SamplingParams(top_k=-1).resolve(llm.defaults).top_k == 0
    assert llm.generate([2, 10, 11], SamplingParams(top_k=-1, **sp))[0].token_ids == \
        llm.generate([2, 10, 11], SamplingParams(**sp))[0].token_ids
