"""The server through the official `openai` client (sync and async, streaming and not), on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from canvaslm.llm import SamplingParams
from canvaslm.server.serving import GREEDY_TEMPERATURE

from .conftest import CANVAS, MAX_TOKENS, MODEL, PROMPT_LEN, chat_messages, probe_prompt, seed_with


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(llm, prompt, seed, **kw):
    """LLM.generate for a text prompt or token ids, with the server's defaults for what is not given."""
    return llm.generate(prompt, SamplingParams(**{"seed": seed, "max_new_tokens": MAX_TOKENS, **kw}))[0]


def collect_stream(stream):
    text, finish, usage, drafts, chunks = {}, {}, None, [], 0
    for chunk in stream:
        chunks += 1
        extra = chunk.model_extra or {}
        if extra.get("draft"):
            drafts.append(extra["draft"])
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            piece = ch.delta.content if hasattr(ch, "delta") else ch.text
            text[ch.index] = text.get(ch.index, "") + (piece or "")
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return text, finish, usage, drafts, chunks


def test_completion_matches_llm_generate(client, llm):
    prompt = probe_prompt(llm)
    want = reference(llm, prompt, seed=5)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=5)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(want.prompt_ids) == 32
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_extensions_and_temperature_reach_the_sampler(client, llm):
    prompt = probe_prompt(llm, 1)
    want = reference(llm, prompt, seed=8, max_denoising_steps=3, temperature=0.5, entropy_bound=0.3)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=8, temperature=0.5,
                                    extra_body={"max_denoising_steps": 3, "entropy_bound": 0.3,
                                                "sampler": "entropy_bound"})
    assert got.choices[0].text == want.text
    # temperature 0 is near-greedy (the schedule scaled by GREEDY_TEMPERATURE): LLM.generate's reply
    greedy = llm.generate(prompt, SamplingParams(seed=8, max_new_tokens=16, temperature=GREEDY_TEMPERATURE))[0]
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, seed=8)
    assert got.choices[0].text == greedy.text and got.usage.completion_tokens == len(greedy.token_ids)
    assert greedy.token_ids != llm.generate(prompt, SamplingParams(seed=8, max_new_tokens=16))[0].token_ids


def test_top_p_top_k_min_p_match_llm(client, llm):
    """OpenAI's top_p and vLLM's top_k / min_p (extra_body) cut each position as SamplingParams does;
    top_k -1 means no cut, as in vLLM."""
    prompt = probe_prompt(llm, 3)
    want = reference(llm, prompt, seed=9, top_p=0.7, top_k=6, min_p=0.02)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=9, top_p=0.7,
                                    extra_body={"top_k": 6, "min_p": 0.02})
    assert got.choices[0].text == want.text
    assert want.token_ids != reference(llm, prompt, seed=9).token_ids  # the cut changed something
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=9, top_p=1,
                                      extra_body={"top_k": -1})
    assert plain.choices[0].text == reference(llm, prompt, seed=9).text


def test_penalties_match_llm(client, llm):
    """OpenAI's frequency_penalty / presence_penalty and vLLM's repetition_penalty (extra_body) reach the
    sampler as SamplingParams' do; a repetition_penalty that is not > 0 is a 400 naming it."""
    import openai

    prompt = probe_prompt(llm, 4)
    plain = reference(llm, prompt, seed=3).token_ids
    for kw, extra in [(dict(frequency_penalty=1.5, presence_penalty=0.5), {}),
                      ({}, {"repetition_penalty": 1.4})]:
        want = reference(llm, prompt, seed=3, **kw, **extra)
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=3, **kw,
                                        extra_body=extra)
        assert got.choices[0].text == want.text and want.token_ids != plain
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, extra_body={"repetition_penalty": 0})
    assert e.value.body["param"] == "repetition_penalty"


def test_stop_token_ids_match_llm(client, llm):
    """vLLM's stop_token_ids reach the engine as extra EOS ids: the same cut as LLM.generate's."""
    prompt = probe_prompt(llm, 2)
    seed, base = seed_with(lambda s: reference(llm, prompt, seed=s).token_ids,
                           lambda ids: any(t not in llm.eos_ids for t in ids[2:]), range(6, 100))
    stop = next(t for t in base[2:] if t not in llm.eos_ids)
    want = reference(llm, prompt, seed=seed, stop_token_ids=[stop])
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=seed,
                                    extra_body={"stop_token_ids": [stop]})
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    assert len(want.token_ids) == base.index(stop) + 1 and got.choices[0].finish_reason == "stop"
    # the stop token's text is not part of the reply (vLLM's way), unless include_stop_str_in_output
    assert got.choices[0].text == llm.tokenizer.decode(want.token_ids[:-1])
    kept = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=seed,
                                     extra_body={"stop_token_ids": [stop], "include_stop_str_in_output": True})
    assert kept.choices[0].text == llm.tokenizer.decode(want.token_ids) != got.choices[0].text


def test_seeds_beyond_32_bits_match_llm(client, llm):
    """The engine seeds its generators as LLM.generate does: all 64 bits of a seed count, also on a CPU."""
    prompt = probe_prompt(llm, 2)
    texts = []
    for seed in (7, 7 + 2**32, 2**63 - 1):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=seed)
        assert got.choices[0].text == reference(llm, prompt, seed=seed).text
        texts.append(got.choices[0].text)
    assert texts[0] != texts[1]


def test_streamed_text_equals_non_streamed_with_usage(client, llm):
    prompt = probe_prompt(llm, 2)
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=3)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=3, stream=True,
                                       stream_options={"include_usage": True})
    text, finish, usage, drafts, chunks = collect_stream(stream)
    assert text[0] == full.choices[0].text == reference(llm, prompt, seed=3).text
    assert finish[0] == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert not drafts and chunks >= 2


def test_continuous_usage_stats_counts_as_the_text_arrives(client, llm):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far; completion tokens
    never go down and end at the non-streamed count, and the prompt count is there from the start."""
    prompt = probe_prompt(llm, 2)
    seed, _ = seed_with(lambda s: reference(llm, prompt, seed=s).token_ids, lambda ids: len(ids) > CANVAS,
                        range(3, 100))  # text in more than one commit
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=seed)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=seed, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [ch.usage.completion_tokens for ch in chunks]
    assert all(ch.usage.prompt_tokens == full.usage.prompt_tokens for ch in chunks)
    assert counts == sorted(counts) and counts[-1] == full.usage.completion_tokens and len(set(counts)) >= 2
    # the decoder passes so far too (they stayed 0 until the end): rising, ending at the whole reply's
    passes = [ch.usage.model_extra["decoder_passes"] for ch in chunks]
    assert passes == sorted(passes) and passes[-1] == full.usage.model_extra["decoder_passes"]
    first_text = next(i for i, ch in enumerate(chunks) if ch.choices and ch.choices[0].text)
    assert passes[first_text] > 0


def test_chat_sync_and_stream_match_llm(client, llm):
    messages = chat_messages(llm)
    ids = llm.tokenizer.encode_chat(messages)
    want = reference(llm, ids, seed=21)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=MAX_TOKENS, seed=21)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids)
    text, finish, usage, _, _ = collect_stream(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, seed=21, stream=True))
    assert text[0] == want.text and finish[0] == want.finish_reason and usage is None


def test_drafts_arrive_between_commits(client, llm):
    prompt = probe_prompt(llm, 3)
    want = reference(llm, prompt, seed=4, max_denoising_steps=6)
    stream = client.chat.completions.create(model=MODEL, messages=chat_messages(llm, 3), max_tokens=MAX_TOKENS,
                                            seed=4, stream=True, extra_body={"stream_drafts": True,
                                                                             "max_denoising_steps": 6})
    text, finish, _, drafts, _ = collect_stream(stream)
    assert drafts and {"index", "canvas_index", "denoise_step", "text"} <= set(drafts[0])
    assert all(1 <= d["denoise_step"] <= 6 for d in drafts)
    last_of_canvas = {}
    for d in drafts:
        last_of_canvas[d["canvas_index"]] = d["text"]
    assert "".join(last_of_canvas[k] for k in sorted(last_of_canvas)) == text[0]  # the last draft is committed
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=4, stream=True,
                                           extra_body={"stream_drafts": True, "max_denoising_steps": 6})
    text, _, _, drafts, _ = collect_stream(completion)
    assert drafts and text[0] == want.text


def test_n_choices_use_consecutive_seeds(client, llm):
    prompt = probe_prompt(llm, 4)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=40, n=2)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].text == reference(llm, prompt, seed=40).text
    assert got.choices[1].text == reference(llm, prompt, seed=41).text


def test_stop_string_cuts_text_streamed_and_not(server, client, llm):
    """A stop string ends the reply there; the request is a finished one ("stop" in /metrics, its prompt counted),
    not a cancelled one, and its usage keeps its decoder passes. The reply's tokens end at the one that completed
    the stop string (the rest of its canvas is not counted, nor scored by logprobs)."""
    prompt = probe_prompt(llm, 5)
    seed, want = seed_with(lambda s: reference(llm, prompt, seed=s), lambda w: len(w.text) >= 22, range(6, 100))
    full = want.text
    stop = full[20:22]
    cut = full[:full.find(stop)]
    used = next(k for k in range(len(want.token_ids) + 1) if stop in llm.decode(want.token_ids[:k]))
    assert used < len(want.token_ids)
    stats = server.state.engine.stats
    before = dict(stats.requests_finished), stats.prompt_tokens
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=seed, stop=[stop, "\x00"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.usage.model_extra["decoder_passes"] > 0 and got.usage.completion_tokens == used
    text, finish, usage, _, _ = collect_stream(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=seed, stop=stop, stream=True,
        stream_options={"include_usage": True}))
    assert text[0] == cut and finish[0] == "stop" and usage.completion_tokens == used
    assert stats.requests_finished["stop"] == before[0].get("stop", 0) + 2
    assert stats.requests_finished["cancelled"] == before[0].get("cancelled", 0)
    assert stats.prompt_tokens == before[1] + 2 * PROMPT_LEN
    messages = chat_messages(llm, 5)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, seed=seed)
    content = reply.choices[0].message.content
    stop = content[len(content) // 2]
    scored = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, seed=seed,
                                            stop=[stop], logprobs=True)
    entries = scored.choices[0].logprobs.content
    assert scored.choices[0].message.content == content[:content.find(stop)]
    shown = "".join(e.token for e in entries if not (len(e.token) > 1 and e.token[0] + e.token[-1] == "<>"))
    assert shown == content[:content.find(stop) + 1]  # one character per token, special tokens left out
    assert len(entries) == scored.usage.completion_tokens < reply.usage.completion_tokens


def test_async_concurrent_requests_match_llm(server, llm):
    """Probes run while other requests (other lengths, steps, streams) share the batch."""

    async def main():
        aclient = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        probes = [aclient.completions.create(model=MODEL, prompt=probe_prompt(llm, 10 + i), max_tokens=MAX_TOKENS,
                                             seed=100 + i) for i in range(3)]
        stream_probe = aclient.chat.completions.create(model=MODEL, messages=chat_messages(llm, 7), seed=77,
                                                       max_tokens=MAX_TOKENS, stream=True,
                                                       extra_body={"stream_drafts": True})
        others = [aclient.completions.create(model=MODEL, prompt="x" * (3 + 5 * i), max_tokens=16 * (1 + i % 2),
                                             seed=i, extra_body={"max_denoising_steps": 2 + i}) for i in range(5)]

        async def drain(coro):
            text = ""
            async for chunk in await coro:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            return text

        results = await asyncio.gather(*probes, drain(stream_probe), *others)
        await aclient.close()
        return results

    results = asyncio.run(main())
    for i in range(3):
        assert results[i].choices[0].text == reference(llm, probe_prompt(llm, 10 + i), seed=100 + i).text
    ids = llm.tokenizer.encode_chat(chat_messages(llm, 7))
    assert results[3] == reference(llm, ids, seed=77).text
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results[4:])


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    import canvaslm

    assert httpx.get(server.base_url + "/version").json() == {"version": canvaslm.__version__}
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("canvaslm_queue_depth", "canvaslm_running_requests", "canvaslm_denoising_steps_per_second",
                 "canvaslm_tokens_per_second", "canvaslm_time_to_first_token_seconds_bucket",
                 "canvaslm_tokens_per_forward", "canvaslm_generated_tokens_total"):
        assert name in text, name
    assert json.loads(httpx.get(server.base_url + "/openapi.json").text)["paths"]["/v1/completions"]


def test_client_disconnect_cancels_and_frees_the_slot(server, llm):
    engine = server.state.engine
    before = engine.stats.requests_finished["cancelled"]
    body = {"model": MODEL, "prompt": probe_prompt(llm, 9), "max_tokens": MAX_TOKENS, "stream": True,
            "seed": 1, "max_denoising_steps": 64, "confidence_threshold": 1e-9, "stream_drafts": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.base_url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: ") and "draft" in line:
                    break  # the request is running: hang up mid-stream
    deadline = time.monotonic() + 20
    while engine.stats.requests_finished["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats.requests_finished["cancelled"] == before + 1
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_running == 0 and engine.scheduler.num_free_slots == engine.config.slots
    assert engine.scheduler.kv_used == 0


def test_a_non_streamed_request_whose_client_left_is_cancelled(server, llm, monkeypatch):
    """The client of a non-streamed request hangs up (a timeout): the request is cancelled within a check
    interval, its slot freed, rather than run to its end (a middleware once hid the disconnect)."""
    monkeypatch.setattr("canvaslm.server.serving.DISCONNECT_CHECK_S", 0.05)
    engine = server.state.engine
    before = dict(engine.stats.requests_finished)
    body = {"model": MODEL, "prompt": probe_prompt(llm, 9), "max_tokens": MAX_TOKENS, "seed": 1,
            "max_denoising_steps": 64, "confidence_threshold": 1e-9, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 30
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    after = engine.stats.requests_finished
    assert after["cancelled"] == before.get("cancelled", 0) + 1
    assert after["length"] == before.get("length", 0) and engine.scheduler.num_free_slots == engine.config.slots


def test_a_stop_string_in_the_last_canvas_counts_as_stop(server, client, llm):
    """A stop string found in a reply's last canvas: the engine has ended the request at its length before the
    server's stop-cancel arrives; /metrics still counts it as "stop", as its client was told."""
    prompt = probe_prompt(llm, 6)
    seed, want = seed_with(lambda s: client.completions.create(model=MODEL, prompt=prompt, max_tokens=CANVAS,
                                                               seed=s).choices[0],
                           lambda c: c.finish_reason == "length" and len(c.text) > 4, range(1, 100))
    stats = server.state.engine.stats
    before = dict(stats.requests_finished)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=CANVAS, seed=seed, stop=[want.text[4]])
    assert got.choices[0].finish_reason == "stop"
    deadline = time.monotonic() + 10
    while stats.requests_finished["stop"] == before.get("stop", 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.requests_finished["stop"] == before.get("stop", 0) + 1
    assert stats.requests_finished["length"] == before.get("length", 0)
