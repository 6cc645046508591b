"""Images over HTTP: OpenAI chat `image_url` parts (data URLs, http URLs, allowed local files) through the
official client, against the same request through `LLM.chat`; clear 400s for bad images."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from conftest import build_mm_reference

from canvaslm.config import DiffusionParams
from canvaslm.engine.engine import EngineConfig
from canvaslm.server.launch import BackgroundServer, build_state
from canvaslm.testing import CHARS, CHAT_TEMPLATE, SPECIALS
from canvaslm.tokenizer import build_char_tokenizer

IMAGE_SPECIALS = ["<|image>", "<|image|>", "<image|>"]  # boi, image, eoi (the Gemma 4 strings)
MODEL = "tiny-vision"


def png(w, h, seed) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_chat")
    specials = SPECIALS + IMAGE_SPECIALS
    boi, img, eoi = (specials.index(t) for t in IMAGE_SPECIALS)
    ref = build_mm_reference(out, vocab=len(specials) + len(CHARS), image_ids=(img, boi, eoi), seed=2)
    with torch.no_grad():  # a tower whose output depends on the pixels
        g = torch.Generator().manual_seed(4)
        for p in ref.model.encoder.vision_tower.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    ref.save_pretrained(out)
    build_char_tokenizer(CHARS, specials, out, chat_template=CHAT_TEMPLATE, bos_token="<bos>", eos_token="<eos>",
                         pad_token="<pad>")
    (out / "processor_config.json").write_text(json.dumps({"image_processor": {
        "image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 70, "patch_size": 16,
        "pooling_kernel_size": 3}}))
    (out / "pics").mkdir()
    (out / "pics" / "a.png").write_bytes(png(60, 40, 1))
    return out


DEFAULTS = DiffusionParams(max_new_tokens=16, max_denoising_steps=4, eos_token_ids=(1, 4), pad_token_id=0)


@pytest.fixture(scope="module")
def server(vision_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = build_state(vision_dir, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=512, prefill_chunk=32),
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
    import http.server
    import threading

    client = client_of(server)
    picture = (vision_dir / "pics" / "a.png").read_bytes()
    base = client.chat.completions.create(model=MODEL, messages=messages(data_url(picture)), seed=1, max_tokens=16)
    # the same picture as an allowed local file, and over http
    local = client.chat.completions.create(model=MODEL, messages=messages(f"file://{vision_dir / 'pics' / 'a.png'}"),
                                           seed=1, max_tokens=16)
    assert local.choices[0].message.content == base.choices[0].message.content

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(picture)))
            self.end_headers()
            self.wfile.write(picture)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/a.png"
        fetched = client.chat.completions.create(model=MODEL, messages=messages(url), seed=1, max_tokens=16)
    finally:
        httpd.shutdown()
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
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {pic}\nwhat is it?\nand the colours?\n/image nowhere.png\n"))
    assert main(["chat", str(vision_dir), "--seed", "2", "--max-new-tokens", "16", "--prefill-chunk", "16",
                 "--stats", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "/image nowhere.png: no such file" in err
    stats = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens, (\d+) from the cache", err)]
    assert len(stats) == 2 and stats[1][1] > stats[0][0] // 2  # turn 2 reuses turn 1's prompt, image included
    llm = LLM(vision_dir, device="cpu")
    first = [{"role": "user", "content": [{"type": "image", "image": pic.read_bytes()},
                                          {"type": "text", "text": "what is it?"}]}]
    msgs, images = image_parts_to_placeholders(first, llm.image_placeholder)
    ids = llm.tokenizer.encode_chat(msgs)
    want = llm.generate_continuous([{"prompt_token_ids": ids, "multi_modal_data": {"image": images}}],
                                   SamplingParams(max_new_tokens=16, seed=2), max_batch=1,
                                   max_model_len=llm.cfg.max_position_embeddings, prefill_chunk=16, use_tqdm=False)[0]
    assert out.splitlines()[0] == want.text and stats[0][0] == len(want.prompt_ids)
