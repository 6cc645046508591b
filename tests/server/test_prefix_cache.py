"""Prefix caching over HTTP: a chat's next turn reuses the KV its previous turn left, reports it in
`usage.prompt_tokens_details.cached_tokens` and /metrics, and answers exactly what a server without
the cache answers."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state

CHUNK = 8


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, one_thread):
    def start(caching):
        state = build_state(tiny_checkpoint, "cpu", "float32",
                            EngineConfig(max_batch=2, max_model_len=256, prefill_chunk=CHUNK, prefix_caching=caching),
                            served_model_name="tiny", max_denoising_steps=64)
        return BackgroundServer(state)

    with start(True) as on, start(False) as off:
        yield on, off


def chat(srv, messages, seed):
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=seed,
                                          extra_body={"max_denoising_steps": 6})


def test_next_chat_turn_reuses_the_previous_prompt(servers, llm):
    on, off = servers
    first = [{"role": "system", "content": "You are a terse assistant who answers in one line."},
             {"role": "user", "content": "Name a colour."}]
    r1 = chat(on, first, seed=1)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And another one?"}]
    r2 = chat(on, second, seed=2)
    p1 = len(llm.tokenizer.encode_chat(first, add_generation_prompt=True))
    p2 = len(llm.tokenizer.encode_chat(second, add_generation_prompt=True))
    assert r2.usage.prompt_tokens == p2 and p1 >= CHUNK
    assert r2.usage.prompt_tokens_details.cached_tokens == p1 - p1 % CHUNK  # whole chunks of turn one
    plain = chat(off, second, seed=2)
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.choices[0].message.content == plain.choices[0].message.content
    metrics = httpx.get(on.base_url + "/metrics").text
    hits = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("canvaslm_prefix_cache_hit_tokens_total"))
    assert hits >= p1 - p1 % CHUNK
    assert "canvaslm_prompt_tokens_total" in metrics


def test_serve_flag_turns_prefix_caching_off(monkeypatch, tiny_checkpoint):
    """`canvaslm serve --[no-]enable-prefix-caching` reaches the engine config (None: the engine decides)."""
    from canvaslm.cli import build_parser
    from canvaslm.server import launch

    seen = []

    def fake_build_state(model_dir, device, dtype, config, *args, **kwargs):
        seen.append(config.prefix_caching)
        raise SystemExit(0)  # stop before serving

    monkeypatch.setattr(launch, "build_state", fake_build_state)
    for flags, want in [((), None), (("--no-enable-prefix-caching",), False), (("--enable-prefix-caching",), True)]:
        args = build_parser().parse_args(["serve", str(tiny_checkpoint), *flags])
        with pytest.raises(SystemExit):
            args.func(args)
        assert seen.pop() is want


def test_choices_of_one_prompt_share_its_encode(servers, llm):
    on, off = servers
    body = dict(model="tiny", prompt="Tell me a story about a fox and a crow.", max_tokens=12, n=3, seed=5,
                extra_body={"max_denoising_steps": 6})
    got = OpenAI(base_url=on.base_url + "/v1", api_key="unused", max_retries=0).completions.create(**body)
    want = OpenAI(base_url=off.base_url + "/v1", api_key="unused", max_retries=0).completions.create(**body)
    assert got.usage.prompt_tokens_details.cached_tokens == got.usage.prompt_tokens  # choices 2 and 3
    assert want.usage.prompt_tokens_details.cached_tokens == 0
    assert [c.text for c in got.choices] == [c.text for c in want.choices]
