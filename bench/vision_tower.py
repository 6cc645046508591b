"""The vision tower: ours (canvaslm/model/vision.py) against the reference (`transformers`' Gemma 4 vision
model and DiffusionGemma's projection) with the same random weights, in the same run.

    python bench/vision_tower.py [--soft-tokens 70] [--images 1] [--device cpu] [--dtype float32] [--repeat 3]

Builds the Gemma 4 vision config's default shape (what DiffusionGemma 26B-A4B's config.json names: 16 layers,
width 768) with random weights, copies them into our module, and encodes `--images` random images preprocessed
to `--soft-tokens` soft tokens each (70 / 140 / 280 / 560 / 1120; 280 is the checkpoint's default). Printed:
milliseconds per call for each (median of `--repeat` after one warm-up), the ratio, and the largest
difference between the two outputs relative to the largest output. transformers is a test dependency: this script needs it installed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeat: int, device: str) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--soft-tokens", type=int, default=70)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    from canvaslm.bench import exit_unless_device

    exit_unless_device(args.device)  # `error: ...`, exit 2: not a traceback
    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image
    from transformers import Gemma4VisionConfig, Gemma4VisionModel
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (DiffusionGemmaMultimodalEmbedder,
                                                                              DiffusionGemmaTextConfig)

    from canvaslm.checkpoint import parse_dtype
    from canvaslm.images import ImageProcessorConfig, preprocess, stack
    from canvaslm.model.vision import VisionTower

    dtype = parse_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    vcfg, hidden = Gemma4VisionConfig(), 2816  # the 26B-A4B text width
    torch.manual_seed(0)
    ref_tower = Gemma4VisionModel(vcfg).eval()
    ref_embed = DiffusionGemmaMultimodalEmbedder(vcfg, DiffusionGemmaTextConfig(hidden_size=hidden)).eval()
    for m in (ref_tower, ref_embed):
        for t in m.parameters():
            t.normal_(0, 0.02)  # random weights, not the init's constants (buffers: clip bounds, std: as built)
    ours = VisionTower(vcfg.to_dict(), hidden).eval()
    ours.vision_tower.load_state_dict(ref_tower.state_dict())
    ours.embed_vision.load_state_dict(ref_embed.state_dict())
    for m in (ref_tower, ref_embed, ours):
        m.to(args.device, dtype)

    proc = ImageProcessorConfig(max_soft_tokens=args.soft_tokens)
    g = torch.Generator().manual_seed(1)
    imgs = [Image.fromarray(torch.randint(0, 256, (480, 640, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(args.images)]
    pixels, pos = stack([preprocess(im, proc) for im in imgs])
    pixels, pos = pixels.to(args.device, dtype), pos.to(args.device)

    def reference():
        return ref_embed(ref_tower(pixel_values=pixels, pixel_position_ids=pos).last_hidden_state)

    ms_ref, want = timed(reference, args.repeat, args.device)
    ms_ours, got = timed(lambda: ours(pixels, pos), args.repeat, args.device)
    diff = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
    print(f"vision tower, {args.images} image(s) x {got.shape[0] // args.images} soft tokens "
          f"({pixels.shape[1]} patches each), {args.device} {str(dtype).removeprefix('torch.')}:")
    print(f"  reference (transformers) {ms_ref:9.1f} ms")
    print(f"  canvaslm                 {ms_ours:9.1f} ms   ratio {ms_ref / ms_ours:.2f}x   max |diff| / max |ref| {diff:.1e}")


if __name__ == "__main__":
    main()
