"""Fine-tuning on examples with images (train/vision.py, data.py, objective.py): the loss of an image example
is the hand-built computation with the tower's soft tokens in place (and the image reaches it), image-token
targets are left out of the encoder's next-token loss, every image format gives the same example, a LoRA
run on image examples trains, resumes identically and keeps the checkpoint's vision tower, and bad images
are errors naming the example."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_vision_chat_checkpoint, data_url, png

from canvaslm.checkpoint import load_model
from canvaslm.kv_cache import KVCache
from canvaslm.multimodal import Vision, image_parts_to_placeholders
from canvaslm.tokenizer import Tokenizer
from canvaslm.train.data import DataError, ImageExample, load_examples
from canvaslm.train.objective import block_diffusion_loss, draw_noise, encoder_ar_loss, make_batch
from canvaslm.train.trainer import TrainConfig, Trainer
from canvaslm.train.vision import TrainVision


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_train")
    build_vision_chat_checkpoint(out)
    return out


@pytest.fixture(scope="module")
def setup(vision_dir):
    model = load_model(vision_dir, dtype="float32")
    return model, Tokenizer.from_dir(vision_dir), TrainVision(model, vision_dir)


def ask(image_part, text="What is it?", answer="a cat") -> list:
    return [{"role": "user", "content": [{"type": "text", "text": text}, image_part]},
            {"role": "assistant", "content": answer}]


def url_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def batch_of(setup, examples):
    model, _, vision = setup
    cfg = model.cfg
    return make_batch(examples, cfg.canvas_length, cfg.pad_token_id, cfg.eos_token_ids, images=vision.inputs(examples))


def test_loss_with_an_image_equals_the_direct_computation(setup, vision_dir, tmp_path):
    model, tok, vision = setup
    cfg, V, C = model.cfg, model.cfg.vocab_size, model.cfg.canvas_length
    picture = png(50, 70, 3)
    messages = ask(url_part(picture))
    (ex,) = load_examples(write_rows(tmp_path / "d.jsonl", [{"messages": messages}]), tok, vision=vision)
    assert isinstance(ex, ImageExample) and len(ex.images) == 1
    # the inference path's prompt and soft tokens (what LLM.chat encodes for the same messages)
    conv, sources = image_parts_to_placeholders(messages[:1], tok.id_to_token(cfg.image_token_id))
    ids, inputs = Vision(model, vision_dir).prepare(tok.encode_chat(conv), sources)
    assert ex[0] == ids and inputs.embeds.shape[0] == ex.images[0].num_soft_tokens > 1
    batch = batch_of(setup, [ex])
    torch.testing.assert_close(batch.image_embeds, inputs.embeds)
    noise = draw_noise(batch, torch.Generator().manual_seed(0), V, 0.5)
    noise.sc_taken[:] = True
    with torch.no_grad():
        out = block_diffusion_loss(model, batch, None, noise=noise)
        # by hand: prompt + response + EOS, EOS fill to whole canvases
        eos = cfg.eos_token_ids[0]
        response = ex[1] + ([] if ex[1][-1] in cfg.eos_token_ids else [eos])
        response += [eos] * (-len(response) % C)
        tokens = torch.tensor([ids + response])
        L, P = tokens.shape[1], len(ids)
        mask = tokens == cfg.image_token_id
        cache = KVCache(cfg, 1, L, keep_full_window=True)
        slots = torch.tensor([0])
        hidden = model.encode(tokens, torch.arange(L)[None], slots, cache, fresh=True, image_embeds=inputs.embeds,
                              image_mask=mask)
        start = P + noise.canvas_index * C
        clean = tokens[:, int(start):int(start) + C]
        noisy = torch.where(noise.replace, noise.random_tokens, clean)
        first = model.denoise(noisy, slots, cache, canvas_start=start)
        logits = model.denoise(noisy, slots, cache, sc_logits=first, sc_mask=noise.sc_taken, canvas_start=start)
        diffusion = F.cross_entropy(logits[0], clean[0])
        targets = tokens[0, 1:]
        keep = targets != cfg.image_token_id
        ar = F.cross_entropy(model.logits(hidden[0, :-1])[keep], targets[keep])
    torch.testing.assert_close(out.diffusion_loss, diffusion, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ar_loss, ar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, diffusion + ar, rtol=1e-5, atol=1e-5)
    # the image reaches the loss: another picture, same words and noise, another loss (both terms)
    (other,) = load_examples(write_rows(tmp_path / "o.jsonl", [{"messages": ask(url_part(png(50, 70, 4)))}]), tok,
                             vision=vision)
    assert other[0] == ex[0]
    with torch.no_grad():
        out2 = block_diffusion_loss(model, batch_of(setup, [other]), None, noise=noise)
    assert abs(float(out2.diffusion_loss - out.diffusion_loss)) > 1e-4 and abs(float(out2.ar_loss - out.ar_loss)) > 1e-4
    with pytest.raises(ValueError, match="shows images"):
        make_batch([ex], C, cfg.pad_token_id, cfg.eos_token_ids)  # without the soft tokens


def test_image_token_targets_are_left_out_of_the_encoder_loss(setup, tmp_path):
    model, tok, vision = setup
    cfg = model.cfg
    rows = [{"messages": ask(url_part(png(40, 40, 1)))}, {"messages": [{"role": "user", "content": "hi there"},
                                                                       {"role": "assistant", "content": "hello"}]}]
    examples = load_examples(write_rows(tmp_path / "d.jsonl", rows), tok, vision=vision)
    assert isinstance(examples[0], ImageExample) and type(examples[1]) is tuple  # text-only stays a plain pair
    batch = batch_of(setup, examples)
    assert batch.image_mask[1].sum() == 0 and int(batch.image_mask.sum()) == batch.image_embeds.shape[0]
    hidden = torch.randn(*batch.tokens.shape, cfg.hidden_size, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    loss = encoder_ar_loss(model, hidden, batch)
    loss.backward()
    targets = batch.tokens[:, 1:]
    img = targets == cfg.image_token_id
    assert img[0].sum() == examples[0].images[0].num_soft_tokens and not img[1].any()
    grad = hidden.grad[:, :-1].abs().sum(-1)  # [B, L-1]: the position predicting each target
    valid = batch.positions[:, 1:] >= 0
    assert (grad[img] == 0).all() and (grad[valid & ~img] > 0).all()
    boi, eoi = (int((targets[0] == t).nonzero()[0]) for t in (cfg.boi_token_id, cfg.eoi_token_id))
    assert grad[0, boi] > 0 and grad[0, eoi] > 0  # boi and eoi stay supervised
    with torch.no_grad():
        ce = F.cross_entropy(model.logits(hidden[:, :-1]).flatten(0, 1), targets.flatten(), reduction="none")
        ce = ce.view(targets.shape)
        keep = (valid & ~img).float()
        want = ((ce * keep).sum(1) / keep.sum(1)).mean()
        everything = ((ce * valid).sum(1) / valid.sum(1)).mean()
    torch.testing.assert_close(loss.detach(), want)
    assert abs(float(everything - want)) > 1e-3  # so leaving them out is what made the value
    # the AR-only baseline: the encoder with the soft tokens, the same exclusion
    with torch.no_grad():
        out = block_diffusion_loss(model, batch, None, ar_only=True)
        h = model.encode(batch.tokens, batch.positions, torch.arange(2), None, image_embeds=batch.image_embeds,
                         image_mask=batch.image_mask)
        torch.testing.assert_close(out.loss, encoder_ar_loss(model, h, batch))
        no_images = dataclasses.replace(batch, image_embeds=None, image_mask=None)
        assert abs(float(out.loss - block_diffusion_loss(model, no_images, None, ar_only=True).loss)) > 1e-4


def test_every_image_format_gives_the_same_example(setup, vision_dir, tmp_path, monkeypatch):
    """image_url data URL, {"type": "image"} with a path relative to the data file, Responses input_image,
    TRL's bare {"type": "image"} + row `images` (a path, PIL from a callable, as `datasets` gives), prompt
    text with the image token + `images`; a multi-turn conversation's turns share the loaded image."""
    model, tok, vision = setup
    picture = png(60, 40, 1)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(picture)
    bare = {"type": "image"}
    rows = [{"messages": ask(url_part(picture))},
            {"messages": ask({"type": "image", "image": "pics/a.png"})},
            {"messages": ask({"type": "input_image", "image_url": data_url(picture)})},
            {"messages": ask(bare), "images": ["pics/a.png"]},
            {"prompt": ask(bare)[:1], "completion": ask(bare)[1:], "images": ["pics/a.png"]}]
    got = load_examples(write_rows(tmp_path / "d.jsonl", rows), tok, vision=vision)
    (tmp_path / "pil_rows.py").write_text("from PIL import Image\n\n\ndef rows(path, messages):\n"
                                          "    return [{'messages': messages, 'images': [Image.open(path)]}]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    got += load_examples("pil_rows:rows", tok, {"path": str(tmp_path / "pics" / "a.png"), "messages": ask(bare)},
                         vision=vision)
    first = got[0]
    soft = vision.inputs([first])[0].embeds
    for ex in got:
        assert isinstance(ex, ImageExample) and ex == first
        torch.testing.assert_close(vision.inputs([ex])[0].embeds, soft, rtol=0, atol=0)
    # past the soft-token cache budget an image keeps its source and is encoded again, to the same numbers
    lean = TrainVision(model, vision_dir, cache_bytes=0)
    (ex,) = load_examples(write_rows(tmp_path / "p.jsonl", rows[1:2]), tok, vision=lean)
    assert ex.images[0].soft_tokens is None and lean.uncached == 1 and ex == first
    torch.testing.assert_close(lean.inputs([ex])[0].embeds, soft, rtol=0, atol=0)
    # prompt text with the image token (plain prompt/response rows)
    text_row = {"prompt": "<bos><start_of_turn>user\nWhat is it?\n<|image|><end_of_turn>\n<start_of_turn>model\n",
                "response": "a cat<end_of_turn>", "images": [data_url(picture)]}
    (ex,) = load_examples(write_rows(tmp_path / "t.jsonl", [text_row]), tok, vision=vision)
    assert ex[0] == first[0]
    # two trained turns, the image in the first user turn: both examples hold that one loaded image
    two = [{"role": "user", "content": [url_part(picture)]}, {"role": "assistant", "content": "cat"},
           {"role": "user", "content": "sure?"}, {"role": "assistant", "content": "yes"}]
    a, b = load_examples(write_rows(tmp_path / "two.jsonl", [{"messages": two}]), tok, vision=vision)
    assert a.images[0] is b.images[0] and b[0][:len(a[0])] == a[0]


def test_lora_run_on_image_examples_trains_resumes_and_keeps_the_vision_tower(vision_dir, tmp_path):
    from .helpers import vision_tensors

    rows = []
    for i in range(6):
        pic = png(40 + 8 * i, 56 - 4 * i, 10 + i)
        rows.append({"messages": ask(url_part(pic), answer="abcdefgh"[i:i + 3])})
        rows.append({"messages": ask({"type": "image"}, text="And this?", answer="xyz"[i % 3]),
                     "images": [data_url(pic)]})
    rows.append({"messages": [{"role": "user", "content": "no image"}, {"role": "assistant", "content": "ok"}]})
    data = write_rows(tmp_path / "d.jsonl", rows)

    def config(name, **kw):
        return TrainConfig.from_dict({**dict(out_dir=str(tmp_path / name), max_steps=4, model=str(vision_dir),
                                             data={"train": data, "eval_size": 2}, lr=1e-2, batch_size=4,
                                             save_every=2, lora={"rank": 4, "alpha": 8}, progress=False, plot=False),
                                      **kw})

    full = Trainer(config("full"))
    assert full.vision.uncached == 0 and full.vision._vision._tower is None  # every image's soft tokens cached, tower gone
    hist = full.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in hist) and "eval_loss" in hist[-1]
    assert hist[-1]["loss"] < hist[0]["loss"]
    killed = config("killed")
    Trainer(killed).train(stop_at=3)
    resumed = Trainer(killed, resume=True)
    assert resumed.step == 2
    again = resumed.train()
    assert [r["loss"] for r in again] == [r["loss"] for r in hist]  # exact on CPU
    assert [r.get("eval_loss") for r in again] == [r.get("eval_loss") for r in hist]
    src = vision_tensors(vision_dir)
    for d in (tmp_path / "full" / "final", tmp_path / "killed" / "final"):
        got = vision_tensors(d)
        assert src and sorted(got) == sorted(src) and all(torch.equal(got[k], src[k]) for k in src), d
        assert (d / "processor_config.json").read_text() == (vision_dir / "processor_config.json").read_text()
    # lengths count the soft tokens: a max_length below an image's leaves the image examples out
    small = Trainer(config("small", max_length=64, max_steps=1, data={"train": data}))
    assert len(small.train_examples) == 1 and not isinstance(small.train_examples[0], ImageExample)


def test_bad_images_and_count_mismatches_are_errors_naming_the_example(setup, tmp_path):
    model, tok, vision = setup
    good = {"messages": ask(url_part(png(30, 30, 0)))}
    text_only = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}

    def fails(row, *needles, v=vision):
        path = write_rows(tmp_path / "bad.jsonl", [text_only, row])
        with pytest.raises(DataError) as e:
            load_examples(path, tok, vision=v)
        for needle in ("bad.jsonl:2", *needles):
            assert needle in str(e.value), (needle, str(e.value))

    fails({"messages": ask(url_part(b"not an image at all"))}, "image 0", "not an image")
    fails({"messages": ask({"type": "image"}), "images": ["data:x", "data:y"]}, "1 {'type': 'image'} part",
          "2 image(s)")
    fails({"messages": ask({"type": "image"})}, "1 {'type': 'image'} part", "0 image(s)")
    fails({"messages": ask({"type": "image", "image": "pics/missing.png"})}, "no such image file")
    fails({"messages": [{"role": "user", "content": "look"},
                        {"role": "assistant", "content": [url_part(png(30, 30, 0))]}]}, "messages[1]", "holds an image")
    fails({"prompt": "see <|image|> and <|image|>", "response": "x", "images": [data_url(png(30, 30, 0))]},
          "2 image token(s)", "1 image(s)")
    fails({"prompt": "see <|image|>", "response": "x"}, "1 image token(s)", "needs the image itself")
    fails(good, "takes text only", v=None)


def test_text_data_does_not_read_the_image_processor_settings(setup, vision_dir, tmp_path):
    """A checkpoint whose processor_config.json this code cannot honour still trains on text; an image
    example then fails naming the file."""
    import shutil

    model, tok, _ = setup
    bad = tmp_path / "ckpt"
    shutil.copytree(vision_dir, bad)
    (bad / "processor_config.json").write_text('{"image_processor": {"max_soft_tokens": 100}}')
    vision = TrainVision(model, bad)
    (tmp_path / "text.jsonl").write_text(json.dumps({"prompt": "hi", "response": "there"}) + "\n")
    text = load_examples(str(tmp_path / "text.jsonl"), tok, vision=vision)
    assert text == [(tok.encode("hi"), tok.encode("there", add_special_tokens=False))]
    row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(20, 20, 0))}}]},
                        {"role": "assistant", "content": "ok"}]}
    (tmp_path / "image.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"image 0: .*processor_config\.json: image_processor\.max_soft_tokens"):
        load_examples(str(tmp_path / "image.jsonl"), tok, vision=vision)
