"""Images in prompts, side by side with the `transformers` reference: soft tokens in place of the image
placeholders, an image's tokens seeing each other both ways in the encoder, the engine keeping an image in
one encoder call and prefix caching telling images apart."""

from __future__ import annotations

import pytest
import torch

from canvaslm.checkpoint import load_model
from canvaslm.kv_cache import KVCache

from conftest import PROCESSOR_70, build_mm_reference

TOL = 1e-4
V = 384
IMG, BOI, EOI = V - 1, V - 3, V - 2  # build_mm_reference's defaults


def image_prompt(counts, text_len=5, seed=0):
    """Token ids with text, then per image boi + IMG * n + eoi and more text; and mm_token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 4, (text_len,), generator=g).tolist()
    for n in counts:
        ids += [BOI] + [IMG] * n + [EOI] + torch.randint(3, V - 4, (3,), generator=g).tolist()
    return ids


@pytest.fixture(scope="module", params=[True, False], ids=["bidirectional", "causal"])
def mm_reference(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("mm")
    return request.param, out, build_mm_reference(out, bidirectional=request.param)


@torch.no_grad()
def test_soft_tokens_and_image_attention_match_the_reference(mm_reference):
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    bidirectional, path, ref = mm_reference
    model = load_model(path)
    cfg = model.cfg
    assert cfg.bidirectional_vision is bidirectional and cfg.image_token_id == IMG
    ids = image_prompt([6, 4], text_len=11)  # longer than the sliding window (8)
    n = len(ids)
    mask = torch.tensor([[t == IMG for t in ids]])
    feats = torch.randn(int(mask.sum()), cfg.hidden_size, generator=torch.Generator().manual_seed(5)) * 3
    cache_ref = DynamicCache(config=ref.config.get_text_config(decoder=True))
    # the masks as the reference's generate builds them (its encoder forward drops the ones it builds itself)
    masks = ref.model.encoder.create_masks_for_generate(
        config=ref.config, inputs_embeds=torch.empty(1, n, 0), attention_mask=None, past_key_values=cache_ref,
        position_ids=torch.arange(n)[None], mm_token_type_ids=mask.long())
    out = ref.model.encoder(input_ids=torch.tensor([ids]), past_key_values=cache_ref, position_ids=torch.arange(n)[None],
                            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
                            attention_mask=masks)
    cache = KVCache(cfg, 1, n + cfg.canvas_length)
    hidden = model.encode(torch.tensor([ids]), torch.arange(n)[None], torch.tensor([0]), cache,
                          image_embeds=feats, image_mask=mask)
    assert (hidden - out.last_hidden_state).abs().max() <= TOL * max(1.0, hidden.abs().max().item())
    canvas = torch.randint(0, V, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(2))
    want = ref(decoder_input_ids=canvas, past_key_values=cache_ref).logits
    got = model.denoise(canvas, torch.tensor([0]), cache)
    assert (got - want).abs().max() <= TOL
    # the soft tokens matter, and so does the mask: a causal encode differs from the reference's where
    # the config asks for bidirectional image attention
    cache2 = KVCache(cfg, 1, n + cfg.canvas_length)
    plain = model.encode(torch.tensor([ids]), torch.arange(n)[None], torch.tensor([0]), cache2)
    assert (plain - hidden).abs().max() > 1e-2
    if bidirectional:
        first = ids.index(IMG)
        model.cfg.__dict__["bidirectional_vision"] = False
        try:
            causal = model.encode(torch.tensor([ids]), torch.arange(n)[None], torch.tensor([0]),
                                  KVCache(cfg, 1, n + cfg.canvas_length), image_embeds=feats, image_mask=mask)
        finally:
            model.cfg.__dict__["bidirectional_vision"] = True
        assert (causal[0, first] - hidden[0, first]).abs().max() > 1e-3  # the first image token saw the others
        assert (causal[0, :first] - hidden[0, :first]).abs().max() <= 1e-5  # text before it did not


def test_image_blocks_are_runs_of_image_tokens():
    from canvaslm.model.diffusion_gemma import DiffusionGemma

    m = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert DiffusionGemma.image_blocks(m).tolist() == [[-1, 1, 1, -1, 2, -1], [1, 1, 1, 1, -1, -1]]


# ---------------------------------------------------------------- the engine


def fake_images(ids, d, seed, digest_base="img"):
    """ImageInputs for the IMG runs of `ids` with random soft tokens (what the vision tower would give)."""
    from canvaslm.multimodal import ImageInputs, image_spans

    pos = [i for i, t in enumerate(ids) if t == IMG]
    spans = image_spans(pos)
    emb = torch.randn(len(pos), d, generator=torch.Generator().manual_seed(seed)) * 3
    return ImageInputs(emb, tuple(pos), tuple(spans), tuple(f"{digest_base}{k}" for k in range(len(spans))))


class Served:
    """Scheduler + Runner on the multimodal model, one batch of requests at a time; records the plans."""

    def __init__(self, llm, prefill_chunk, caching=False, slots=2, max_model_len=128):
        from canvaslm.engine.runner import Runner
        from canvaslm.engine.scheduler import Scheduler

        self.llm, self.n, self.plans = llm, 0, []
        self.runner = Runner(llm.model, num_slots=slots, max_model_len=max_model_len, prefix_caching=caching)
        self.sched = Scheduler(slots, slots * max_model_len, slots, prefill_chunk, llm.cfg.canvas_length,
                               prefix_caching=caching)

    def run(self, specs):
        from canvaslm.engine.request import RequestState

        states = []
        for ids, images, sp in specs:
            p = sp.resolve(self.llm.defaults)
            st = RequestState(f"r{self.n}", tuple(ids), p.max_new_tokens, self.llm.cfg.canvas_length,
                              p.max_denoising_steps, images=images)
            self.n += 1
            self.sched.add(st)
            self.runner.add(st.request_id, p, sp.seed, self.llm.eos_ids, images=images)
            states.append(st)
        while (plan := self.sched.plan()) is not None:
            self.plans.append(plan)
            self.sched.update(plan, self.runner.execute(plan).result)
        for st in states:
            self.runner.remove(st.request_id)
        return states


@pytest.fixture(scope="module")
def mm_llm(tmp_path_factory):
    from canvaslm.llm import LLM

    out = tmp_path_factory.mktemp("mm_llm")
    build_mm_reference(out, bidirectional=True, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM(out, device="cpu")
    torch.set_num_threads(threads)


def test_the_engine_keeps_an_image_in_one_encoder_call_and_matches_generate(mm_llm):
    from canvaslm.generate import RowRequest, generate_rows
    from canvaslm.llm import SamplingParams

    llm = mm_llm
    ids = image_prompt([6, 5], text_len=5, seed=1)  # chunks of 8: both images straddle a chunk boundary
    images = fake_images(ids, llm.cfg.hidden_size, seed=4)
    sp = SamplingParams(seed=3, max_new_tokens=2 * llm.cfg.canvas_length, max_denoising_steps=4)
    served = Served(llm, prefill_chunk=8)
    (state,) = served.run([(ids, images, sp)])
    cuts = [(i.start, i.end) for p in served.plans for i in p.encode if i.kind == "prefill"]
    assert cuts[0][0] == 0 and cuts[-1][1] == len(ids)
    for start, end in cuts:  # no call cuts an image in two
        assert not any(a < end < b for a, b in images.spans), (cuts, images.spans)
    assert any(end - start > 8 for start, end in cuts)  # a chunk grew to hold an image
    row = RowRequest(ids, sp.resolve(llm.defaults), llm.eos_ids, llm.pad_id, images=images)
    want = generate_rows(llm.model, [row], [torch.Generator().manual_seed(3)])[0]
    assert list(state.output_ids) == want.token_ids
    # and the images changed the output: the same prompt with other soft tokens writes something else
    other = RowRequest(ids, sp.resolve(llm.defaults), llm.eos_ids, llm.pad_id,
                       images=fake_images(ids, llm.cfg.hidden_size, seed=5))
    assert generate_rows(llm.model, [other], [torch.Generator().manual_seed(3)])[0].token_ids != want.token_ids


def test_prefix_caching_tells_images_apart(mm_llm):
    from canvaslm.llm import SamplingParams

    llm = mm_llm
    ids = image_prompt([6], text_len=17, seed=2)  # two whole text chunks before the image
    first = ids.index(IMG)
    sp = SamplingParams(seed=1, max_new_tokens=llm.cfg.canvas_length, max_denoising_steps=3)
    x, y = fake_images(ids, llm.cfg.hidden_size, 6, "x"), fake_images(ids, llm.cfg.hidden_size, 7, "y")
    served = Served(llm, prefill_chunk=8, caching=True, slots=1)
    a = served.run([(ids, x, sp)])[0]
    b = served.run([(ids, y, sp)])[0]  # same tokens, another image: only the text before it is shared
    assert 0 < b.cached_len <= first
    c = served.run([(ids, y, sp)])[0]  # the same image again: the whole prompt is reused
    assert c.cached_len == len(ids)
    assert c.output_ids == b.output_ids
    fresh = Served(llm, prefill_chunk=8).run([(ids, y, sp)])[0]
    assert b.output_ids == fresh.output_ids and a.cached_len == 0


# ---------------------------------------------------------------- images end to end (vision tower included)


def random_image(w, h, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    import json

    out = tmp_path_factory.mktemp("mm_vision")
    ref = build_mm_reference(out, bidirectional=True, seed=4, vision_std=0.5)  # the images matter
    (out / "processor_config.json").write_text(json.dumps(PROCESSOR_70))
    return out, ref


@pytest.mark.parametrize("seed", [0, 1])
def test_llm_generate_with_images_matches_the_reference(vision_checkpoint, seed):
    """Pixels in, tokens out: our processor, vision tower, placeholder expansion, masks and sampler against
    the reference's generate given the same pixels."""
    from canvaslm.images import preprocess, stack
    from canvaslm.llm import LLM, SamplingParams

    path, ref = vision_checkpoint
    llm = LLM(path, device="cpu", sampler_impl="reference")  # transformers' draws
    imgs = [random_image(70, 50, seed), random_image(40, 90, seed + 10)]
    text = image_prompt([], text_len=4, seed=seed)
    ids = text + [IMG] + text[:2] + [IMG] + text[:3]
    C = llm.cfg.canvas_length
    sp = SamplingParams(max_new_tokens=2 * C, max_denoising_steps=5, seed=seed)
    got = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}, sp)[0]
    full = got.prompt_ids  # the placeholders expanded: boi + IMG * n + eoi per image
    processed = [preprocess(im, llm.vision.processor) for im in imgs]
    assert full.count(IMG) == sum(p.num_soft_tokens for p in processed) and full.count(BOI) == 2
    pixels, pos = stack(processed)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = ref.generate(torch.tensor([full]), pixel_values=pixels, image_position_ids=pos,
                           mm_token_type_ids=torch.tensor([[int(t == IMG) for t in full]]),
                           max_new_tokens=2 * C, max_denoising_steps=5)
    want = out.sequences[0, len(full):].tolist()
    cut = next((i for i, t in enumerate(want) if t in llm.eos_ids), None)
    want = want if cut is None else want[:cut + 1]
    shared = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}, sp,
                          generator=torch.Generator().manual_seed(seed))[0]  # the reference's batch generator
    assert shared.token_ids == want
    # through the serving engine (per-request generator): the same tokens as generate with that seed
    assert llm.generate_continuous([{"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}], sp,
                                   prefill_chunk=16)[0].token_ids == got.token_ids
    other = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs[::-1]}}, sp)[0]
    assert other.token_ids != got.token_ids  # the pixels matter


def test_image_prompt_errors_name_the_problem(vision_checkpoint):
    from canvaslm.generate import GenerationError
    from canvaslm.llm import LLM, SamplingParams

    path, _ = vision_checkpoint
    llm = LLM(path, device="cpu")
    img = random_image(30, 30, 0)
    sp = SamplingParams(max_new_tokens=4, max_denoising_steps=2)
    with pytest.raises(GenerationError, match="2 image placeholder token.*for 1 image"):
        llm.generate({"prompt_token_ids": [5, IMG, 6, IMG], "multi_modal_data": {"image": img}}, sp)
    with pytest.raises(GenerationError, match="image tokens .* but no image was given"):
        llm.generate([5, IMG, 6], sp)
    with pytest.raises(GenerationError, match="image 0: "):
        llm.generate({"prompt_token_ids": [5, IMG], "multi_modal_data": {"image": "data:image/png;base64,AAAA"}}, sp)
    with pytest.raises(GenerationError, match="only 'image'"):
        llm.generate({"prompt_token_ids": [5], "multi_modal_data": {"audio": b""}}, sp)
    with pytest.raises(GenerationError, match="one of 'prompt'"):
        llm.generate({"multi_modal_data": {"image": img}}, sp)


def test_cli_generate_with_an_image_file(vision_checkpoint, tmp_path, capsys):
    import json

    from canvaslm.cli import main
    from canvaslm.llm import LLM, SamplingParams

    path, _ = vision_checkpoint
    img = random_image(48, 64, 7)
    img.save(tmp_path / "pic.png")
    ids = [5, 9, IMG, 11]
    assert main(["generate", str(path), "--prompt-ids", ",".join(map(str, ids)), "--image", str(tmp_path / "pic.png"),
                 "--max-new-tokens", "20", "--steps", "3", "--seed", "4", "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    llm = LLM(path, device="cpu")
    want = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": (tmp_path / "pic.png").read_bytes()}},
                        SamplingParams(max_new_tokens=20, max_denoising_steps=3, seed=4))[0]
    assert got["token_ids"] == want.token_ids and got["prompt_tokens"] == len(want.prompt_ids) > len(ids)
    for local in (tmp_path / "pic.png", str(tmp_path / "pic.png")):  # the offline API reads local files
        same = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": local}},
                            SamplingParams(max_new_tokens=20, max_denoising_steps=3, seed=4))[0]
        assert same.token_ids == want.token_ids
    with pytest.raises(SystemExit, match="no such file"):
        main(["generate", str(path), "--prompt-ids", "5", "--image", str(tmp_path / "missing.png"), "--device", "cpu"])


def test_the_server_loads_the_tower_at_start_and_limits_images(vision_checkpoint):
    from canvaslm.config import ModelConfig
    from canvaslm.engine.engine import EngineConfig
    from canvaslm.memory import plan, vision_bytes
    from canvaslm.multimodal import ImageError
    from canvaslm.server.launch import build_state

    path, _ = vision_checkpoint
    img = random_image(30, 30, 1)
    for limit in (1, 0):
        state = build_state(path, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=256), max_images=limit)
        try:
            tower = state.vision._tower
            assert (tower is not None) == (limit == 1)  # loaded before the engine sized its KV cache
            with pytest.raises(ImageError, match=f"2 images in one prompt, over the limit of {limit}"):
                state.vision.prepare([5, IMG, IMG], [img, img])
            if limit == 0:
                with pytest.raises(ImageError, match="^1 image in one prompt, over the limit of 0"):
                    state.vision.prepare([5, IMG], [img])
            if tower is not None:  # `canvaslm memory` counts what the server holds
                held = sum(t.numel() * t.element_size() for t in (*tower.parameters(), *tower.buffers()))
                cfg = ModelConfig.from_dir(path)
                assert vision_bytes(cfg, torch.float32) == held > 0
                with_tower, without = plan(cfg, 8, torch.float32), plan(cfg, 8, torch.float32, images=False)
                assert without["free"] - with_tower["free"] == held and without["vision"] == 0
        finally:
            state.engine.shutdown()


def test_a_bad_processor_config_stops_the_server_unless_images_are_off(vision_checkpoint, tmp_path):
    import shutil

    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.launch import build_state

    path, _ = vision_checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "processor_config.json").write_text('{"image_processor": {"max_soft_tokens": 100}}')
    with pytest.raises(ValueError, match=r"processor_config\.json.*max_soft_tokens.*70, 140, 280"):
        build_state(bad, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=256))
    state = build_state(bad, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=256), max_images=0)
    state.engine.shutdown()  # text only: the processor settings are not even read


@pytest.mark.parametrize("field,value", [("patch_size", 14), ("pooling_kernel_size", 2)])
def test_a_processor_that_disagrees_with_the_tower_stops_the_server(vision_checkpoint, tmp_path, field, value):
    """processor_config.json cutting patches other than config.json's vision_config reads them used to start a
    server on which every image was a 500; it is refused at start, naming both files' values."""
    import json
    import shutil

    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.launch import build_state

    path, _ = vision_checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    settings = json.loads((bad / "processor_config.json").read_text())
    settings["image_processor"][field] = value
    (bad / "processor_config.json").write_text(json.dumps(settings))
    want = json.loads((bad / "config.json").read_text())["vision_config"].get(field, 16 if field == "patch_size" else 3)
    with pytest.raises(ValueError, match=rf"processor_config\.json: image_processor\.{field}={value} disagrees with "
                                         rf"config\.json's vision_config\.{field}={want}\b"):
        build_state(bad, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=256))
    state = build_state(bad, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=256), max_images=0)
    state.engine.shutdown()  # text only: not read


def test_a_tower_that_cannot_take_the_patches_is_an_image_error(vision_checkpoint):
    """Whatever the vision tower refuses (a ValueError) is an ImageError, which the routes answer with a 400,
    never a 500."""
    import dataclasses

    from canvaslm.multimodal import ImageError, Vision

    path, _ = vision_checkpoint
    vision = Vision(load_model(path, device="cpu", dtype=torch.float32), path)
    vision.processor = dataclasses.replace(vision.processor, patch_size=14)  # past the start-up check
    with pytest.raises(ImageError, match=r"the vision tower cannot read the image: pixel_values must be"):
        vision.prepare([5, IMG], [random_image(30, 30, 1)])


def test_a_text_only_checkpoint_ignores_an_unrelated_preprocessor_config(tiny_checkpoint, tmp_path):
    """No vision_config: the processor settings are not read, so a preprocessor_config.json for another model
    (a SigLIP one here) does not stop the server."""
    import json
    import shutil

    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.launch import build_state

    text = tmp_path / "text"
    shutil.copytree(tiny_checkpoint, text)
    cfg = json.loads((text / "config.json").read_text())
    cfg.pop("vision_config", None)
    (text / "config.json").write_text(json.dumps(cfg))
    (text / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor",
                                                                "patch_size": 14}))
    state = build_state(text, "cpu", "float32", EngineConfig(max_batch=1, max_model_len=256))
    try:
        assert state.vision is None or not state.vision.available
    finally:
        state.engine.shutdown()


def test_allowed_media_domains_stop_fetches_to_other_hosts(vision_checkpoint, monkeypatch):
    import io

    from canvaslm.checkpoint import load_model
    from canvaslm.multimodal import ImageError, Vision
    from canvaslm.cli import build_parser

    path, _ = vision_checkpoint
    model = load_model(path)
    buf = io.BytesIO()
    random_image(20, 20, 0).save(buf, format="PNG")
    local = buf.getvalue()
    for allowed, url, ok in ((["images.example.org"], "https://elsewhere.example.org/a.png", False),
                             ([], "http://images.example.org/a.png", False),
                             (["images.example.org"], local, True)):  # not a URL: no host to check
        vision = Vision(model, path, allowed_media_domains=allowed)
        if ok:
            assert vision.prepare([5, IMG], [url])[1] is not None
        else:
            with pytest.raises(ImageError, match=r"image 0: '.*example.org' is not among the allowed media domains"):
                vision.prepare([5, IMG], [url])  # refused before any connection is tried
    import canvaslm.images

    seen, real = [], canvaslm.images.load_image  # under an allow-list, redirects (to any host) are not followed
    monkeypatch.setattr(canvaslm.images, "load_image", lambda src, **kw: seen.append(kw["follow_redirects"])
                        or real(src, **kw))
    Vision(model, path, allowed_media_domains=["x.org"]).load([local])
    Vision(model, path).load([local])
    assert seen == [False, True]
    args = build_parser().parse_args(["serve", str(path), "--allowed-media-domains", "a.org", "b.org"])
    assert args.allowed_media_domains == ["a.org", "b.org"]
    assert build_parser().parse_args(["serve", str(path)]).allowed_media_domains is None


def test_mm_processor_kwargs_set_an_images_token_budget(vision_checkpoint):
    """vLLM's mm_processor_kwargs: max_soft_tokens over the checkpoint's 70, and the generation still equals
    the reference's from the pixels preprocessed at that budget."""
    import dataclasses

    from canvaslm.generate import GenerationError
    from canvaslm.images import preprocess, stack
    from canvaslm.llm import LLM, SamplingParams

    path, ref = vision_checkpoint
    llm = LLM(path, device="cpu", sampler_impl="reference")  # transformers' draws
    img = random_image(200, 120, 3)
    ids, C = [5, 9, IMG, 11], llm.cfg.canvas_length
    sp = SamplingParams(max_new_tokens=C, max_denoising_steps=4, seed=1)
    small = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img}}, sp)[0]
    big = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img},
                        "mm_processor_kwargs": {"max_soft_tokens": 280}}, sp,
                       generator=torch.Generator().manual_seed(1))[0]
    cfg = dataclasses.replace(llm.vision.processor, max_soft_tokens=280)
    processed = preprocess(img, cfg)
    assert big.prompt_ids.count(IMG) == processed.num_soft_tokens > small.prompt_ids.count(IMG) > 0
    pixels, pos = stack([processed])
    torch.manual_seed(1)
    with torch.no_grad():
        out = ref.generate(torch.tensor([big.prompt_ids]), pixel_values=pixels, image_position_ids=pos,
                           mm_token_type_ids=torch.tensor([[int(t == IMG) for t in big.prompt_ids]]),
                           max_new_tokens=C, max_denoising_steps=4)
    want = out.sequences[0, len(big.prompt_ids):].tolist()
    cut = next((i for i, t in enumerate(want) if t in llm.eos_ids), None)
    assert big.token_ids == (want if cut is None else want[:cut + 1])
    for kwargs, match in (({"max_soft_tokens": 100}, r"mm_processor_kwargs\.max_soft_tokens must be one of 70"),
                          ({"patch_size": 8}, "'patch_size' is not supported")):
        with pytest.raises(GenerationError, match=match):
            llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img}, "mm_processor_kwargs": kwargs},
                         sp)
    # the server-wide default: --mm-processor-kwargs
    from canvaslm.cli import build_parser
    from canvaslm.multimodal import ImageError, Vision

    parsed = build_parser().parse_args(["serve", str(path), "--mm-processor-kwargs", '{"max_soft_tokens": 560}'])
    assert Vision(llm.model, path, processor_kwargs=parsed.mm_processor_kwargs).processor.max_soft_tokens == 560
    with pytest.raises(ImageError, match=r"--mm-processor-kwargs\.max_soft_tokens must be one of"):
        Vision(llm.model, path, processor_kwargs={"max_soft_tokens": 7})


def test_recent_images_soft_tokens_come_from_the_cache_bit_for_bit(vision_checkpoint):
    """An API client resends a conversation's images every turn: the second time an image's soft tokens come
    from the cache (no tower call), equal to a fresh encoding; the cache keeps within its bytes."""
    from canvaslm.checkpoint import load_model
    from canvaslm.multimodal import Vision

    path, _ = vision_checkpoint
    model = load_model(path)
    a, b = random_image(40, 30, 1), random_image(30, 40, 2)
    fresh = Vision(model, path, cache_bytes=0)
    want_a, want_b = fresh.prepare([5, IMG], [a])[1].embeds, fresh.prepare([5, IMG], [b])[1].embeds
    assert fresh.cache_hits == 0
    vision = Vision(model, path)
    calls = []
    tower = vision.tower()
    forward = tower.forward
    tower.forward = lambda *args: calls.append(1) or forward(*args)  # count the tower's calls
    first = vision.prepare([5, IMG, 6, IMG], [a, b])[1].embeds
    again = vision.prepare([7, IMG], [a])[1].embeds
    assert len(calls) == 2 and vision.cache_hits == 1
    assert torch.equal(again, want_a) and torch.equal(first, torch.cat([want_a, want_b]))
    one = want_a.numel() * want_a.element_size()
    small = Vision(model, path, cache_bytes=one + 1)  # room for one image: b pushes a out
    small._tower = tower
    for img in (a, b, a):
        small.prepare([5, IMG], [img])
    assert small.cache_hits == 0 and len(calls) == 5


def test_prefix_reuse_never_stops_inside_an_image(mm_llm):
    """Two prompts share 20 text tokens and a 16-token image (longer than the sliding window of 8) and differ
    right after it, inside the same chunk of 8: reuse stops where a fresh run starts a call (16), not at the
    last whole chunk in common (32, inside the image), so B's output is the fresh run's bit for bit."""
    from canvaslm.llm import SamplingParams

    llm = mm_llm
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, V - 4, (20,), generator=g).tolist()
    a_ids = text + [BOI] + [IMG] * 16 + [EOI] + [7, 8]
    b_ids = a_ids[:-2] + [7, 9]
    pic = fake_images(a_ids, llm.cfg.hidden_size, 8, "p")
    sp = SamplingParams(seed=2, max_new_tokens=llm.cfg.canvas_length, max_denoising_steps=3)
    served = Served(llm, prefill_chunk=8, caching=True, slots=1)
    served.run([(a_ids, pic, sp)])
    b = served.run([(b_ids, pic, sp)])[0]
    assert b.cached_len == 16  # the last call start before the image; 32 would split it
    fresh = Served(llm, prefill_chunk=8).run([(b_ids, pic, sp)])[0]
    assert b.output_ids == fresh.output_ids
    assert [b.reuse_point(n, 8) for n in (0, 8, 16, 24, 32, 37, 39, 40)] == [0, 8, 16, 16, 16, 37, 37, 40]


def test_the_image_token_text_falls_back_where_the_tokenizer_lacks_it(tiny_checkpoint):
    import dataclasses

    from canvaslm.config import ModelConfig
    from canvaslm.multimodal import image_token_text
    from canvaslm.tokenizer import Tokenizer

    tok, cfg = Tokenizer.from_dir(tiny_checkpoint), ModelConfig.from_dir(tiny_checkpoint)
    assert image_token_text(tok, dataclasses.replace(cfg, image_token_id=6)) == tok.id_to_token(6)
    big = dataclasses.replace(cfg, vocab_size=tok.vocab_size + 50, image_token_id=tok.vocab_size + 10)
    assert image_token_text(tok, big) == "<|image|>"  # in the model's vocabulary, not the tokenizer's
    assert image_token_text(None, cfg) == "<|image|>"


def test_a_bounded_prefix_store_must_hold_an_images_whole_call(mm_llm):
    import asyncio

    from canvaslm.engine.engine import Engine, EngineConfig, GenerationRequest
    from canvaslm.llm import SamplingParams

    llm = mm_llm
    ring = llm.cfg.sliding_window - 1
    engine = Engine(llm.model, EngineConfig(max_batch=1, max_model_len=256, prefill_chunk=8, prefix_caching=True,
                                            prefix_store_len=ring + 8 + 4)).start()
    try:
        p = SamplingParams(max_new_tokens=llm.cfg.canvas_length, max_denoising_steps=2, seed=0).resolve(llm.defaults)
        for n, ok in ((4, True), (16, False)):
            ids = [5, 6, BOI] + [IMG] * n + [EOI, 7]
            images = fake_images(ids, llm.cfg.hidden_size, n)
            req = GenerationRequest(f"r{n}", tuple(ids), p, 0, llm.eos_ids, images=images)
            _, fin = asyncio.run(engine.run(req))
            assert (fin.reason != "error") == ok, fin.message
            if not ok:
                assert "an image of 16 soft tokens is over the 4 this server's prefix store has room for" in fin.message
    finally:
        engine.shutdown()


def test_responses_original_detail_is_the_largest_budget():
    """LLM.chat takes the server's parts: a Responses input_image with detail "original" is read as "high"
    (it raised 'not a detail'); a chat image_url keeps OpenAI's chat values only."""
    from canvaslm.multimodal import ImageError, checked_details, image_parts_to_placeholders
    url = "data:image/png;base64,AAAA"
    details = []
    image_parts_to_placeholders([{"role": "user", "content": [
        {"type": "input_image", "image_url": url, "detail": "original"},
        {"type": "input_image", "image_url": url, "detail": "low"},
        {"type": "image_url", "image_url": {"url": url, "detail": "original"}}]}], "<img>", details)
    assert details == ["high", "low", "original"]
    assert checked_details(details[:2], 2) == ["high", "low"]
    with pytest.raises(ImageError, match="'original' is not a detail"):
        checked_details(details, 3)
