"""Images over HTTP: OpenAI chat `image_url` parts (data URLs, http URLs, allowed local files) through the
official client, against the same request through `LLM.chat`; clear 400s for bad images. Then the other
APIs, sent as their official clients send them: Anthropic `image` blocks, Ollama `images`, Responses
`input_image` parts and /tokenize messages. Each is translated into the chat route's image parts, so a
request must mean exactly what its /v1/chat/completions twin means (same reply for the same seed, same
prompt length with the images' soft tokens); a bad image is a 400 in the API's own error body naming the
field it came from, and the server goes on serving."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import re
import threading

import httpx
import pytest
import torch
from conftest import IMAGE_SPECIALS, build_vision_chat_checkpoint, data_url, png

from canvaslm.config import DiffusionParams
from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state

MODEL = "tiny-vision"


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_chat")
    build_vision_chat_checkpoint(out)
    (out / "pics").mkdir()
    (out / "pics" / "a.png").write_bytes(png(60, 40, 1))
    return out


DEFAULTS = DiffusionParams(max_new_tokens=16, max_denoising_steps=4, eos_token_ids=(1, 4), pad_token_id=0)


@pytest.fixture(scope="module")
def server(vision_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = build_state(vision_dir, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=512, prefill_chunk=32,
                                                                   prefix_store_len=300),  # room: 261 soft tokens
                        served_model_name=MODEL, defaults=DEFAULTS,
                        allowed_local_media_path=str(vision_dir / "pics"))
    with BackgroundServer(state) as srv:
        yield srv
    torch.set_num_threads(threads)


def client_of(srv):
    import openai

    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def messages(image_url: str, text: str = "What is in it?") -> list:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def test_chat_with_an_image_matches_llm_chat(server, vision_dir):
    from canvaslm.llm import LLM, SamplingParams

    client = client_of(server)
    picture = png(50, 70, 3)
    r = client.chat.completions.create(model=MODEL, messages=messages(data_url(picture)), seed=5, max_tokens=16)
    llm = LLM(vision_dir, device="cpu")
    llm.defaults = DEFAULTS
    want = llm.chat(messages(data_url(picture)), SamplingParams(seed=5, max_new_tokens=16))
    assert r.choices[0].message.content == want.text
    # the prompt counts the image's soft tokens (boi + n + eoi), as vLLM's usage does
    assert r.usage.prompt_tokens == len(want.prompt_ids)
    text_only = len(llm.tokenizer.encode_chat([{"role": "user", "content": "What is in it?\n<|image|>"}]))
    assert r.usage.prompt_tokens > text_only + 2
    # another picture, same words: another prompt (the soft tokens differ, not the ids)
    other = client.chat.completions.create(model=MODEL, messages=messages(data_url(png(50, 70, 4))), seed=5,
                                           max_tokens=16)
    want_other = llm.chat(messages(data_url(png(50, 70, 4))), SamplingParams(seed=5, max_new_tokens=16))
    assert other.choices[0].message.content == want_other.text


def test_props_says_vision(server):
    import httpx

    assert httpx.get(server.base_url + "/props").json()["modalities"] == {"vision": True, "audio": False}


def test_image_urls_files_and_streaming(server, vision_dir):
    client = client_of(server)
    picture = (vision_dir / "pics" / "a.png").read_bytes()
    base = client.chat.completions.create(model=MODEL, messages=messages(data_url(picture)), seed=1, max_tokens=16)
    # the same picture as an allowed local file, and over http
    local = client.chat.completions.create(model=MODEL, messages=messages(f"file://{vision_dir / 'pics' / 'a.png'}"),
                                           seed=1, max_tokens=16)
    assert local.choices[0].message.content == base.choices[0].message.content

    with served_png(picture) as url:
        fetched = client.chat.completions.create(model=MODEL, messages=messages(url), seed=1, max_tokens=16)
    assert fetched.choices[0].message.content == base.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages(data_url(picture)), seed=1, max_tokens=16,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == base.choices[0].message.content


def test_bad_images_get_a_400_that_names_the_problem(server, vision_dir):
    import openai

    client = client_of(server)
    cases = [
        (messages("data:image/png;base64,bm90IGFuIGltYWdl"), "image 0: the data URL is not an image"),
        (messages(str(vision_dir / "tokenizer.json")), "allowed"),  # outside --allowed-local-media-path
        (messages("http://127.0.0.1:9/none.png"), "image 0: "),  # nothing listens on port 9
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                       {"type": "image_url", "image_url": {"url": data_url(png(8, 8, 0))}}]}],
         "image 0"),
    ]
    for msgs, needle in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
        assert needle in str(e.value) and e.value.body["param"] == "messages", (str(e.value), e.value.body)
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        client.chat.completions.create(model=MODEL, messages=messages(data_url(png(8, 8, 0))), max_tokens=4,
                                       extra_body={"truncate_prompt_tokens": 5})
    # and the server still serves
    ok = client.chat.completions.create(model=MODEL, messages=messages(data_url(png(20, 20, 0))), max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_a_text_only_model_refuses_images(tiny_checkpoint):
    import openai

    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=64),
                        served_model_name="tiny")
    with BackgroundServer(state) as srv:
        with pytest.raises(openai.BadRequestError, match="no vision tower"):
            client_of(srv).chat.completions.create(model="tiny", messages=messages(data_url(png(8, 8, 0))),
                                                        max_tokens=4)


def test_terminal_chat_attaches_images_and_reuses_them_across_turns(vision_dir, monkeypatch, capsys, tmp_path):
    import re

    from canvaslm.cli import main
    from canvaslm.llm import LLM, SamplingParams
    from canvaslm.multimodal import image_parts_to_placeholders

    pic = vision_dir / "pics" / "a.png"
    not_an_image = vision_dir / "tokenizer.json"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {pic}\nwhat is it?\nand the colours?\n/image nowhere.png\n"
                                                 f"/image {not_an_image}\nthis turn fails\nthis one does not\n"))
    assert main(["chat", str(vision_dir), "--seed", "2", "--max-new-tokens", "16", "--prefill-chunk", "16",
                 "--stats", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "/image nowhere.png: no such file" in err
    stats = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens, (\d+) from the cache", err)]
    assert len(stats) == 3 and stats[1][1] > stats[0][0] // 2  # turn 2 reuses turn 1's prompt, image included
    assert f"error: image 1: {not_an_image} is not an image" in err  # (image 0: turn 1's) fails its turn only
    llm = LLM(vision_dir, device="cpu")
    first = [{"role": "user", "content": [{"type": "image", "image": pic.read_bytes()},
                                          {"type": "text", "text": "what is it?"}]}]
    msgs, images = image_parts_to_placeholders(first, llm.image_placeholder)
    ids = llm.tokenizer.encode_chat(msgs)
    want = llm.generate_continuous([{"prompt_token_ids": ids, "multi_modal_data": {"image": images}}],
                                   SamplingParams(max_new_tokens=16, seed=2), max_batch=1,
                                   max_model_len=llm.cfg.max_position_embeddings, prefill_chunk=16, use_tqdm=False)[0]
    assert out.splitlines()[0] == want.text and stats[0][0] == len(want.prompt_ids)


# ---------------------------------------------------------------- the other APIs


NOT_AN_IMAGE = base64.b64encode(b"not an image").decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.contextmanager
def served_png(data: bytes):
    """An http URL that serves `data` as a PNG."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/pic.png"
    finally:
        httpd.shutdown()


def reference(server, msgs, seed: int, max_tokens: int = 16):
    return client_of(server).chat.completions.create(model=MODEL, messages=msgs, seed=seed, max_tokens=max_tokens)


def tokenized(server, msgs) -> dict:
    r = httpx.post(server.base_url + "/tokenize", json={"model": MODEL, "messages": msgs}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_anthropic_image_blocks(server):
    anthropic = pytest.importorskip("anthropic")
    a = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    small, big = png(50, 70, 3), png(100, 20, 6)  # 63 and 54 soft tokens

    def blocks(source):
        return [{"role": "user", "content": [{"type": "text", "text": "What is in it?"},
                                             {"type": "image", "source": source}]}]

    for pic, seed in ((small, 5), (big, 6)):
        msgs = blocks({"type": "base64", "media_type": "image/png", "data": b64(pic)})
        got = a.messages.create(model=MODEL, max_tokens=16, messages=msgs, extra_body={"seed": seed})
        want = reference(server, messages(data_url(pic)), seed)
        assert "".join(b.text for b in got.content) == want.choices[0].message.content
        assert got.usage.input_tokens + got.usage.cache_read_input_tokens == want.usage.prompt_tokens
        assert a.messages.count_tokens(model=MODEL, messages=msgs).input_tokens == want.usage.prompt_tokens
    # the wide picture has fewer soft tokens (54 to 63): a shorter prompt
    counts = [a.messages.count_tokens(model=MODEL, messages=blocks({"type": "base64", "media_type": "image/png",
                                                                    "data": b64(p)})).input_tokens
              for p in (small, big)]
    text_only = a.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "What is in it?"}])
    assert text_only.input_tokens < counts[1] < counts[0]
    with served_png(small) as url:  # a url source: the same image
        got = a.messages.create(model=MODEL, max_tokens=16, messages=blocks({"type": "url", "url": url}),
                                extra_body={"seed": 5})
    assert "".join(b.text for b in got.content) == reference(server, messages(data_url(small)), 5) \
        .choices[0].message.content
    # an image in a tool result goes where the tool message goes (before the turn's text), in block order
    history = [{"role": "user", "content": "look"},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "snap", "input": {}}]},
               {"role": "user", "content": [
                   {"type": "text", "text": "and this"},
                   {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(big)}},
                   {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                       {"type": "text", "text": "snapped"},
                       {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": b64(small)}}]}]}]
    chat = [{"role": "user", "content": "look"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "snap", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": [
                {"type": "text", "text": "snapped"}, {"type": "image_url", "image_url": {"url": data_url(small)}}]},
            {"role": "user", "content": [{"type": "text", "text": "and this"},
                                         {"type": "image_url", "image_url": {"url": data_url(big)}}]}]
    assert a.messages.count_tokens(model=MODEL, messages=history).input_tokens == tokenized(server, chat)["count"]
    # bad images: Anthropic's error body, naming the block the image came from
    history[2]["content"][2]["content"][1]["source"]["data"] = NOT_AN_IMAGE
    cases = [
        (history, "messages[2].content[2].content[1].source.data: the base64 data is not an image"),
        (blocks({"type": "base64", "media_type": "image/png", "data": NOT_AN_IMAGE}),
         "messages[0].content[1].source.data: the base64 data is not an image"),
        (blocks({"type": "file", "file_id": "file_011"}), "messages[0].content[1].source.type: 'file'"),
        (blocks({"type": "url"}), "messages[0].content[1].source: a url image source needs a url"),
        ([{"role": "assistant", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                          "data": b64(small)}}]}],
         "messages[0].content[0]: 'image' blocks are not supported in assistant turns"),
    ]
    for msgs, needle in cases:
        for call in (a.messages.create, a.messages.count_tokens):
            kw = {"max_tokens": 4} if call == a.messages.create else {}
            with pytest.raises(anthropic.BadRequestError) as e:
                call(model=MODEL, messages=msgs, **kw)
            assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
            assert needle in e.value.body["error"]["message"], e.value.body
    ok = a.messages.create(model=MODEL, max_tokens=4, messages=blocks(
        {"type": "base64", "media_type": "image/png", "data": b64(png(20, 20, 0))}))
    assert ok.stop_reason in ("end_turn", "max_tokens")


def test_ollama_images(server, vision_dir):
    ollama = pytest.importorskip("ollama")
    from canvaslm.llm import LLM, SamplingParams

    o = ollama.Client(host=server.base_url, timeout=60)
    small, big = png(50, 70, 3), png(100, 20, 6)  # 63 and 54 soft tokens
    opts = {"seed": 7, "num_predict": 16}

    def image_first(pic):  # a message's images go before its text, as Ollama puts them
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(pic)}},
                                             {"type": "text", "text": "What is in it?"}]}]

    got = o.chat(model=MODEL, messages=[{"role": "user", "content": "What is in it?", "images": [small]}],
                 options=opts, stream=False)
    want = reference(server, image_first(small), 7)
    assert got.message.content == want.choices[0].message.content
    assert got.prompt_eval_count <= want.usage.prompt_tokens
    streamed = o.chat(model=MODEL, messages=[{"role": "user", "content": "What is in it?", "images": [small]}],
                      options=opts, stream=True)
    assert "".join(p.message.content for p in streamed) == got.message.content
    # /api/generate: the images go into the templated user message likewise; `context` holds the prompt's text
    # without the image (its begin marker, soft tokens and end marker), as Ollama's context keeps no image
    from canvaslm.config import ModelConfig

    IMAGE_TOKEN_ID = ModelConfig.from_dir(vision_dir).image_token_id  # noqa: N806
    for pic, soft in ((small, 63), (big, 54)):
        gen = o.generate(model=MODEL, prompt="What is in it?", images=[pic], options=opts)
        want = reference(server, image_first(pic), 7)
        assert gen.response == want.choices[0].message.content
        prompt = want.usage.prompt_tokens - soft - 2  # (a random model's reply may write the image token too)
        assert IMAGE_TOKEN_ID not in gen.context and prompt <= len(gen.context) <= prompt + gen.eval_count
    then = o.generate(model=MODEL, prompt="and then?", context=gen.context, options=opts)  # sent back: it goes on
    assert then.context[:len(gen.context)] == gen.context and then.eval_count > 0  # (it was a 400)
    with pytest.raises(ollama.ResponseError, match="context holds a turn that showed images.*/api/chat"):
        o.generate(model=MODEL, prompt="and then?", context=[2, IMAGE_TOKEN_ID, 3], options=opts)
    # raw: the images lead the prompt (or go where it holds the image token's text), as LLM.generate takes them
    llm = LLM(vision_dir, device="cpu")
    llm.defaults = DEFAULTS
    ref = llm.generate({"prompt": "<|image|>What is in it?", "multi_modal_data": {"image": small}},
                       SamplingParams(seed=7, max_new_tokens=16))[0]
    for prompt in ("What is in it?", "<|image|>What is in it?"):
        raw = o.generate(model=MODEL, prompt=prompt, images=[small], raw=True, options=opts)
        assert raw.response == ref.text and raw.eval_count == len(ref.token_ids)
    ref2 = llm.generate({"prompt": "Compare <|image|> with <|image|>", "multi_modal_data": {"image": [small, big]}},
                        SamplingParams(seed=7, max_new_tokens=16))[0]
    assert o.generate(model=MODEL, prompt="Compare <|image|> with <|image|>", images=[small, big], raw=True,
                      options=opts).response == ref2.text
    assert "vision" in o.show(MODEL).capabilities
    # bad images: Ollama's {"error"} body naming the image; the server still serves
    cases = [
        ("/api/chat", {"messages": [{"role": "user", "content": "x"},
                                    {"role": "user", "content": "y", "images": [b64(small), NOT_AN_IMAGE]}]},
         "messages[1].images[1]: the base64 image is not an image"),
        ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["%%%"]}]},
         "messages[0].images[0]: the base64 image is not valid base64"),
        ("/api/generate", {"prompt": "x", "images": [NOT_AN_IMAGE]}, "images[0]: the base64 image is not an image"),
        ("/api/generate", {"prompt": "x", "raw": True, "images": [b64(small), NOT_AN_IMAGE]},
         "images[1]: the base64 image is not an image"),
        ("/api/generate", {"prompt": "<|image|>x", "raw": True, "images": [b64(small)] * 2},
         "1 image placeholder token(s)"),
        ("/api/generate", {"prompt": "x", "suffix": "y", "images": [b64(small)]}, "images cannot be combined"),
    ]
    for route, body, needle in cases:
        r = httpx.post(server.base_url + route, json={"model": MODEL, "stream": False, **body}, timeout=60)
        assert r.status_code == 400 and set(r.json()) == {"error"} and needle in r.json()["error"], r.text
    assert o.chat(model=MODEL, messages=[{"role": "user", "content": "x", "images": [png(20, 20, 0)]}],
                  options={"num_predict": 4}).done


def test_responses_input_image_parts(server):
    import openai

    client = client_of(server)
    pic = png(50, 70, 3)

    def parts(url, text="What is in it?"):
        return [{"role": "user", "content": [{"type": "input_text", "text": text},
                                             {"type": "input_image", "image_url": url, "detail": "auto"}]}]

    r = client.responses.create(model=MODEL, input=parts(data_url(pic)), max_output_tokens=16, extra_body={"seed": 8})
    want = reference(server, messages(data_url(pic)), 8)
    assert r.output_text == want.choices[0].message.content
    assert r.usage.input_tokens == want.usage.prompt_tokens
    with served_png(pic) as url:  # an http(s) URL: the same image
        fetched = client.responses.create(model=MODEL, input=parts(url), max_output_tokens=16, extra_body={"seed": 8})
    assert fetched.output_text == r.output_text
    other = client.responses.create(model=MODEL, input=parts(data_url(png(100, 20, 6))), max_output_tokens=16,
                                    extra_body={"seed": 8})
    assert other.usage.input_tokens < r.usage.input_tokens  # fewer soft tokens
    # the stored turns keep the image: a follow-up means the whole conversation
    follow = client.responses.create(model=MODEL, input="And the colours?", previous_response_id=r.id,
                                     max_output_tokens=16, extra_body={"seed": 9})
    whole = messages(data_url(pic)) + [{"role": "assistant", "content": r.output_text},
                                       {"role": "user", "content": "And the colours?"}]
    want = reference(server, whole, 9)
    assert follow.output_text == want.choices[0].message.content
    assert follow.usage.input_tokens == want.usage.prompt_tokens
    cases = [
        (parts(data_url(b"not an image")), "input[0].content[1]: the data URL is not an image"),
        ([{"role": "user", "content": [{"type": "input_image", "file_id": "file-abc", "detail": "auto"}]}],
         "input[0].content[0]: an input_image with only a file_id"),
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": [
            {"type": "input_image", "image_url": data_url(pic), "detail": "low"},
            {"type": "input_image", "image_url": "http://127.0.0.1:9/none.png", "detail": "high"}]}],
         "input[1].content[1]: fetching"),
    ]
    for items, needle in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input=items, max_output_tokens=4)
        assert needle in e.value.body["message"] and e.value.body["param"] == "input", e.value.body
    with served_png(pic) as url:
        gone = client.responses.create(model=MODEL, input=parts(url), max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:  # an earlier turn's image that no longer loads
        client.responses.create(model=MODEL, input="more", previous_response_id=gone.id, max_output_tokens=4)
    assert e.value.body["message"].startswith("previous_response_id: an image of an earlier turn: fetching")
    assert client.responses.create(model=MODEL, input=parts(data_url(png(20, 20, 0))), max_output_tokens=4).output


def test_tokenize_expands_images(server):
    from canvaslm.testing import SPECIALS

    boi, img, eoi = ((SPECIALS + IMAGE_SPECIALS).index(t) for t in IMAGE_SPECIALS)
    pic = png(50, 70, 3)
    got = tokenized(server, messages(data_url(pic)))
    want = reference(server, messages(data_url(pic)), 1, max_tokens=4)
    assert got["count"] == len(got["tokens"]) == want.usage.prompt_tokens
    text = tokenized(server, [{"role": "user", "content": "What is in it?\n<|image|>"}])["tokens"]  # as a text
    at, n = text.index(img), got["count"] - len(text) - 1  # the placeholder became boi + n image tokens + eoi
    assert n > 1 and got["tokens"] == text[:at] + [boi] + [img] * n + [eoi] + text[at + 1:]
    r = httpx.post(server.base_url + "/tokenize", json={"messages": messages(data_url(b"nope"))}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "image 0: the data URL is not an image" in r.json()["error"]["message"]


def test_logprobs_of_an_image_prompt_read_the_image(server, vision_dir):
    """Chat `logprobs` and vLLM's `prompt_logprobs` score under the same encoder pass the reply was made with:
    the image's soft tokens in place (not the placeholder embeddings)."""
    from canvaslm.llm import LLM
    from canvaslm.multimodal import image_parts_to_placeholders
    from canvaslm.scoring import batch_token_logprobs

    picture = data_url(png(40, 40, 11))
    r = client_of(server).chat.completions.create(model=MODEL, messages=messages(picture), seed=2, max_tokens=16,
                                                  logprobs=True, extra_body={"prompt_logprobs": 0})
    got = [e.logprob for e in r.choices[0].logprobs.content]
    llm = LLM(vision_dir, device="cpu")
    msgs, srcs = image_parts_to_placeholders(messages(picture), llm.image_placeholder)
    ids, images = llm.vision.prepare(llm.tokenizer.encode_chat(msgs), srcs)
    out = [llm.tokenizer.token_to_id(e.token) for e in r.choices[0].logprobs.content]
    assert len(got) == len(out) > 0
    want, _ = batch_token_logprobs(llm.model, [ids + out], [len(ids)], images=[images])[0]
    assert got == pytest.approx(want, abs=1e-4)
    blind, _ = batch_token_logprobs(llm.model, [ids + out], [len(ids)])[0]  # placeholders only
    assert max(abs(a - b) for a, b in zip(blind, want)) > 1e-3
    prompt_lp = r.model_extra["prompt_logprobs"]
    assert len(prompt_lp) == len(ids) and prompt_lp[0] is None
    first_after = next(i for i, t in enumerate(ids) if t == llm.cfg.eoi_token_id) + 1  # the text after the image
    p_want, _ = batch_token_logprobs(llm.model, [ids], [1], images=[images])[0]
    assert prompt_lp[first_after][str(ids[first_after])]["logprob"] == pytest.approx(p_want[first_after - 1], abs=1e-4)


def test_mm_processor_kwargs_on_the_chat_route(server, vision_dir, monkeypatch):
    import openai

    from canvaslm.llm import LLM, SamplingParams

    client, picture = client_of(server), data_url(png(160, 120, 8))
    base = client.chat.completions.create(model=MODEL, messages=messages(picture), seed=3, max_tokens=8)
    big = client.chat.completions.create(model=MODEL, messages=messages(picture), seed=3, max_tokens=8,
                                         extra_body={"mm_processor_kwargs": {"max_soft_tokens": 140}})
    assert big.usage.prompt_tokens > base.usage.prompt_tokens
    llm = LLM(vision_dir, device="cpu")
    llm.defaults = DEFAULTS
    from canvaslm.multimodal import image_parts_to_placeholders

    msgs, srcs = image_parts_to_placeholders(messages(picture), llm.image_placeholder)
    want = llm.generate({"prompt_token_ids": llm.tokenizer.encode_chat(msgs), "multi_modal_data": {"image": srcs},
                         "mm_processor_kwargs": {"max_soft_tokens": 140}}, SamplingParams(seed=3, max_new_tokens=8))[0]
    assert big.usage.prompt_tokens == len(want.prompt_ids) and big.choices[0].message.content == want.text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages(picture), max_tokens=4,
                                       extra_body={"mm_processor_kwargs": {"max_soft_tokens": 3}})
    assert "mm_processor_kwargs.max_soft_tokens must be one of 70, 140, 280, 560, 1120" in str(e.value)
    towers = []  # refused before the vision tower runs, as a prompt over the context is
    monkeypatch.setattr(server.state.vision, "encode", lambda processed: towers.append(processed))
    with pytest.raises(openai.BadRequestError, match=r"an image of \d+ soft tokens is over the 261 this server's "
                                                     r"prefix store has room for"):
        client.chat.completions.create(model=MODEL, messages=messages(data_url(png(170, 120, 9))), max_tokens=4,
                                       extra_body={"mm_processor_kwargs": {"max_soft_tokens": 280}})
    assert towers == []
    monkeypatch.undo()
    with pytest.raises(openai.BadRequestError, match=r"maximum context length is 512 tokens.*The prompt has \d+ "
                                                     r"tokens"):  # 560 soft tokens: refused before the tower
        client.chat.completions.create(model=MODEL, messages=messages(picture), max_tokens=4,
                                       extra_body={"mm_processor_kwargs": {"max_soft_tokens": 560}})
    with pytest.raises(openai.BadRequestError, match=r"the image is 210 patches along one side, over the vision "
                                                     r"tower's 64 positions"):  # the tiny tower's position table
        client.chat.completions.create(model=MODEL, messages=messages(data_url(png(2200, 10, 8))), max_tokens=4)


PARTS_TEMPLATE = (  # loops over content parts, as multimodal HF templates do: it writes the image token itself
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|image|>{% else %}"
    "{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_template_that_renders_parts_gets_the_image_parts(vision_dir):
    """vLLM's content formats: a template that loops over content gets a message with images as parts and
    places the image token itself (no separators of ours), and text-only parts as parts; a string template gets
    the parts joined."""
    from canvaslm.llm import LLM, SamplingParams
    from canvaslm.server.protocol import ChatCompletionRequest

    llm = LLM(vision_dir, device="cpu")
    conv = [{"role": "user", "content": [{"type": "text", "text": "What"},
                                         {"type": "image_url", "image_url": {"url": data_url(png(30, 30, 2))}},
                                         {"type": "text", "text": "now"}]}]
    body = ChatCompletionRequest(model="m", messages=conv)
    assert not llm.tokenizer.renders_parts
    joined = llm.tokenizer.apply_chat_template(body.message_dicts(llm.image_placeholder))
    assert "What\n<|image|>\nnow" in joined
    llm.tokenizer.set_chat_template(PARTS_TEMPLATE)
    assert llm.tokenizer.renders_parts
    parts = llm.tokenizer.apply_chat_template(body.message_dicts(llm.image_placeholder))
    assert "<start_of_turn>user\nWhat<|image|>now<end_of_turn>" in parts
    text_only = llm.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}])
    assert "user\nab<end_of_turn>" in text_only  # text-only parts stay parts too, as transformers passes them
    going_on = llm.chat([conv[0], {"role": "assistant", "content": [
        {"type": "text", "text": "Look "}, {"type": "image_url", "image_url": {"url": data_url(png(30, 30, 3))}},
        {"type": "text", "text": " at this"}]}], SamplingParams(max_new_tokens=4, max_denoising_steps=2, seed=0),
        continue_final_message=True)  # the cut follows the last text part, as HF's
    assert llm.tokenizer.decode(going_on.prompt_ids).endswith(" at this")
    out = llm.chat(conv, SamplingParams(max_new_tokens=4, max_denoising_steps=2, seed=0))
    img, boi, eoi = llm.cfg.image_token_id, llm.cfg.boi_token_id, llm.cfg.eoi_token_id
    ids = out.prompt_ids
    at = ids.index(boi)
    assert llm.tokenizer.decode(ids[:at], skip_special_tokens=False).endswith("user\nWhat")
    end = ids.index(eoi)
    assert set(ids[at + 1:end]) == {img} and llm.tokenizer.decode(ids[end + 1:end + 4]) == "now"


def test_slow_image_urls_do_not_hold_text_requests_back(server):
    """Image loading runs on the server's own pool: more hung image URLs than the default thread pool has
    threads, and a text request still gets its reply at once (it used to wait for a fetch deadline)."""
    import os
    import time

    release = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            release.wait(30)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/pic.png"
    c = client_of(server)
    hung = min(32, (os.cpu_count() or 1) + 4) + 2  # the default pool's threads, and more
    statuses = []

    def ask():
        try:
            c.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=4, seed=1)
            statuses.append(200)
        except Exception as e:  # the fetch fails (404 / deadline): a 400 naming the image
            statuses.append(getattr(e, "status_code", None))

    askers = [threading.Thread(target=ask) for _ in range(hung)]
    try:
        for t in askers:
            t.start()
        time.sleep(1.0)  # every image request is now inside its fetch
        t0 = time.perf_counter()
        text = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         seed=1, timeout=8)
        assert text.choices[0].finish_reason in ("stop", "length") and time.perf_counter() - t0 < 8
        assert not statuses  # the image requests were still waiting on their fetch meanwhile
    finally:
        release.set()
        for t in askers:
            t.join(60)
        httpd.shutdown()
    assert statuses == [400] * hung  # each got its answer once its fetch ended; the server kept serving


def test_detail_low_gives_an_image_the_smallest_budget(server):
    """OpenAI's `detail`: "low" -> 70 soft tokens whatever the request's budget; "high" / "auto" keep it."""
    import httpx

    client, picture = client_of(server), data_url(png(160, 120, 8))

    def ask(detail, budget):
        msgs = [{"role": "user", "content": [{"type": "text", "text": "What is in it?"}, {
            "type": "image_url", "image_url": {"url": picture, **({"detail": detail} if detail else {})}}]}]
        extra = {"mm_processor_kwargs": {"max_soft_tokens": budget}} if budget else {}
        r = client.chat.completions.create(model=MODEL, messages=msgs, seed=3, max_tokens=8, extra_body=extra)
        count = httpx.post(server.base_url + "/tokenize", json={"model": MODEL, "messages": msgs, **extra}).json()
        return r.usage.prompt_tokens, r.choices[0].message.content, count["count"]

    small, big = ask(None, None), ask(None, 140)  # the server's budget is 70 soft tokens, the request's 140
    assert big[0] > small[0] and small[0] == small[2] and big[0] == big[2]  # /tokenize counts what chat runs
    assert ask("low", 140) == small and ask("high", 140) == big and ask("auto", 140) == big


def test_llm_chat_takes_detail_low_too(vision_dir):
    import dataclasses

    from canvaslm.llm import LLM, SamplingParams

    llm = LLM(vision_dir, device="cpu")
    llm.defaults = DEFAULTS
    llm.vision.processor = dataclasses.replace(llm.vision.processor, max_soft_tokens=140)  # a budget above low's
    picture = data_url(png(160, 120, 8))

    def prompt_len(detail):
        msgs = [{"role": "user", "content": [{"type": "text", "text": "What is in it?"}, {
            "type": "image_url", "image_url": {"url": picture, **({"detail": detail} if detail else {})}}]}]
        return len(llm.chat(msgs, SamplingParams(seed=1, max_new_tokens=4)).prompt_ids)

    low, default = prompt_len("low"), prompt_len(None)
    assert low < default and prompt_len("high") == default
    # LLM.generate's image_details: one entry per image, each an OpenAI detail, or a clear error
    from canvaslm.generate import GenerationError

    ids = llm.tokenizer.encode("a") + [llm.cfg.image_token_id] * 2
    ask = {"prompt_token_ids": ids, "multi_modal_data": {"image": [picture, picture]}}
    sp = SamplingParams(seed=1, max_new_tokens=4)
    both_low = llm.generate({**ask, "image_details": ["low", "low"]}, sp)[0]
    assert len(both_low.prompt_ids) < len(llm.generate({**ask, "image_details": ["low", None]}, sp)[0].prompt_ids)
    for bad, words in ((["low"], "one entry per image (2)"), ("low", "one entry per image (2)"),
                       (["LOW", "high"], "'LOW' is not a detail")):
        with pytest.raises(GenerationError, match=re.escape(words)):
            llm.generate({**ask, "image_details": bad}, sp)
