"""`canvaslm memory`: will a model fit a GPU, and with how much context? Arithmetic only: nothing is
loaded or allocated, so it answers on any machine before a download.

The weights are counted on a meta-device build of the model (the loader's own module swaps for `int4` /
`fp8`, `checkpoint.load_model`), so the figure is the bytes `load_model` would hold. The context comes
from the server's own planner (`engine.plan_max_model_len`) with the memory left after the weights and
a fixed overhead (the CUDA context and allocator slack, 1 GiB by default), exactly as `canvaslm serve`
would plan it on that device with those flags.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from .config import FULL, ModelConfig

GIB = 1 << 30


def _formats(cfg: ModelConfig, quantization: str | None) -> tuple[dict | None, str | None]:
    """(the checkpoint's own scheme, `quant_io.scheme_from_config`; the format the weights load in)."""
    from .quant_io import check_quantization, scheme_from_config

    scheme = scheme_from_config(cfg.raw or {})
    check_quantization(scheme, quantization)
    return scheme, scheme["fmt"] if scheme is not None else quantization


def stored_quantization(cfg: ModelConfig, quantization: str | None = None) -> str | None:
    """The format the weights load in: the checkpoint's own (its config.json's `quantization_config`), else
    `quantization`; a conflicting `quantization` is refused as `load_model` refuses it."""
    return _formats(cfg, quantization)[1]


def _stored_names(model_dir: str | Path | None) -> list[str] | None:
    """A checkpoint directory's tensor names, from its safetensors index or file headers (no tensor data is
    read); None without a directory or without weight files there (a config.json alone)."""
    from .checkpoint import INDEX_FILE, SINGLE_FILE, _all_names, _tensor_files

    if model_dir is None:
        return None
    model_dir = Path(model_dir)
    if not ((model_dir / INDEX_FILE).exists() or (model_dir / SINGLE_FILE).exists()):
        return None
    return _all_names(model_dir, _tensor_files(model_dir))


def weight_bytes(cfg: ModelConfig, dtype=torch.bfloat16, quantization: str | None = None,
                 model_dir: str | Path | None = None) -> int:
    """Bytes of the weights `load_model(..., dtype, quantization)` holds for a model of this config. A
    quantised checkpoint counts as stored: the modules with scales among `model_dir`'s tensor names (as
    the loader decides), or, without them, every attention, MLP and expert weight, except FP8 experts
    beside block or per-tensor scales (a checkpoint that loads has them in the model dtype)."""
    from .checkpoint import parse_dtype
    from .model.diffusion_gemma import DiffusionGemma
    from .quant_io import LoadHook

    dtype = parse_dtype(dtype)
    scheme, fmt = _formats(cfg, quantization)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    if scheme is not None:
        hook = LoadHook.for_checkpoint(model, lambda: _stored_names(model_dir), quantization)
    else:
        hook = LoadHook(model, "quantize", fmt=fmt) if fmt else None
    total = 0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if name.startswith("rotary."):
            continue  # computed at start-up, not loaded
        keep = hook is not None and hook.keeps_dtype(name)
        size = t.element_size() if keep or not t.is_floating_point() else torch.empty((), dtype=dtype).element_size()
        total += t.numel() * size
    return total


def vision_bytes(cfg: ModelConfig, dtype=torch.bfloat16) -> int:
    """Bytes of the vision tower the server loads at start-up (in the model's dtype; 0 without one). A
    checkpoint's config may name a tower its files lack: the server then loads none, so this is an upper bound."""
    from .checkpoint import parse_dtype
    from .model.vision import VisionTower

    vision = (cfg.raw or {}).get("vision_config")
    if not cfg.has_vision or vision is None:
        return 0
    size = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    with torch.device("meta"):
        tower = VisionTower(vision, cfg.hidden_size)
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
               for t in (*tower.parameters(), *tower.buffers()))


def plan(cfg: ModelConfig, gpu_gib: float, dtype=torch.bfloat16, quantization: str | None = None,
         max_batch: int = 8, kv_cache_dtype: str = "auto", max_model_len: int | None = None,
         utilization: float | None = None, overhead_gib: float = 1.0, prefix_caching: bool | None = None,
         images: bool = True, model_dir: str | Path | None = None) -> dict:
    """What `canvaslm serve` would get on a GPU of `gpu_gib` GiB: weights (the vision tower's apart, counted
    unless `images` is off: --limit-mm-per-prompt image=0), KV bytes, context, prefix caching. `model_dir`:
    the local checkpoint, whose tensor names say which modules a quantised one stores quantised."""
    from .checkpoint import parse_dtype
    from .engine.engine import AGENT_CONTEXT, EngineConfig, kv_dtype, plan_max_model_len, prefix_caching_fits
    from .kv_cache import KVCache

    if not (math.isfinite(gpu_gib) and gpu_gib > 0):
        raise ValueError(f"the GPU's memory (--gpu-memory) must be a finite number of GiB > 0, got {gpu_gib!r}")
    if not (math.isfinite(overhead_gib) and overhead_gib >= 0):
        raise ValueError(f"the overhead (--overhead) must be a finite number of GiB >= 0, got {overhead_gib!r}")
    dtype = parse_dtype(dtype)
    scheme, fmt = _formats(cfg, quantization)
    weights = weight_bytes(cfg, dtype, quantization, model_dir)
    vision = vision_bytes(cfg, dtype) if images else 0
    total = int(gpu_gib * GIB)
    free = total - weights - vision - int(overhead_gib * GIB)
    if free <= 0:
        hint = "; try --quantization int4" if scheme is None and fmt != "int4" else ""
        raise ValueError(f"the weights take {weights / GIB:.1f} GiB (+ {overhead_gib} GiB overhead), over the GPU's "
                         f"{gpu_gib} GiB{hint}")
    config = EngineConfig(max_batch=max_batch, max_model_len=max_model_len, kv_cache_dtype=kv_cache_dtype,
                          memory_utilization=utilization, prefix_caching=prefix_caching)
    store_dtype = kv_dtype(config, dtype)
    length, why = plan_max_model_len(cfg, config, "cuda", store_dtype, free_total=(free, total))
    config = dataclasses.replace(config, max_model_len=length)
    caching, caching_why = (prefix_caching, "as asked") if prefix_caching is not None else \
        prefix_caching_fits(cfg, config, "cuda", store_dtype, free_total=(free, total))
    one_slot = KVCache.planned_bytes(cfg, 1, length, store_dtype)[0]
    per_position = sum(KVCache.position_bytes(cfg, i, store_dtype) for i, t in enumerate(cfg.layer_types)
                       if t == FULL)
    agents = 0  # the most slots that still get the context agent frameworks check for (prefix caching off)
    for n in range(1, 257):
        try:
            trial = EngineConfig(max_batch=n, max_model_len=None, kv_cache_dtype=kv_cache_dtype,
                                 memory_utilization=utilization, prefix_caching=False)
            got, _ = plan_max_model_len(cfg, trial, "cuda", store_dtype, free_total=(free, total))
        except ValueError:
            break
        if got < min(AGENT_CONTEXT, cfg.max_position_embeddings):
            break
        agents = n
    return {"weights": weights, "quantization": fmt, "vision": vision, "free": free, "total": total,
            "max_model_len": length, "why": why, "agent_slots": agents, "prefix_caching": caching,
            "prefix_caching_why": caching_why, "kv_per_position": per_position, "kv_one_slot": one_slot,
            "slots": config.slots, "kv_dtype": store_dtype}


def _model_config(args) -> tuple[ModelConfig, Path | None]:
    """The config, and the local checkpoint directory (None for a shape or a repo id: config.json only)."""
    if args.shape and args.model:
        raise ValueError(f"memory: give a model ({args.model}) or --shape {args.shape}, not both")
    if args.shape:
        from .shapes import model_config

        return model_config(args.shape), None
    from .hub import is_repo_id

    if args.model and is_repo_id(args.model):  # only its config.json: no weights are needed for arithmetic
        from .hub import offline

        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise ValueError("a repo id needs huggingface_hub (pip install huggingface_hub)") from None
        try:
            path = hf_hub_download(args.model, "config.json", revision=args.revision, local_files_only=offline())
        except Exception as e:  # noqa: BLE001 - named for the user
            raise FileNotFoundError(f"{args.model}: cannot read its config.json ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0]})") from None
        return ModelConfig.from_dir(Path(path).parent), None
    if not args.model:
        raise ValueError("name a checkpoint directory, a repo id or --shape 26b-a4b")
    if args.revision is not None:  # as generate refuses it
        raise ValueError(f"--revision {args.revision} applies to a Hugging Face repo id, and {args.model} is a "
                         "local directory")
    return ModelConfig.from_dir(args.model), Path(args.model)


def _main(args) -> int:
    from .engine.engine import AGENT_CONTEXT

    cfg, model_dir = _model_config(args)
    out = plan(cfg, args.gpu_memory, args.dtype, args.quantization, args.max_batch, args.kv_cache_dtype,
               args.max_model_len, args.gpu_memory_utilization, args.overhead,
               images=args.limit_mm_per_prompt != 0, model_dir=model_dir)
    what = args.shape or args.model
    quant = out["quantization"] or args.dtype
    vision = f" + vision tower {out['vision'] / GIB:.2f} GiB ({args.dtype})" if out["vision"] else ""
    print(f"{what}: weights {out['weights'] / GIB:.1f} GiB ({quant}){vision}, {args.gpu_memory} GiB GPU, "
          f"{args.overhead} GiB overhead: {out['free'] / GIB:.1f} GiB left")
    kv = str(out["kv_dtype"]).removeprefix("torch.")
    print(f"KV cache ({kv}): {out['kv_per_position'] / 1024:.1f} KiB per position per slot in the full layers, "
          f"{out['kv_one_slot'] / GIB:.2f} GiB per slot at the planned context")
    print(f"context: {out['max_model_len']} positions for {out['slots']} slots ({out['why']})")
    print(f"prefix caching: {'on' if out['prefix_caching'] else 'off'} ({out['prefix_caching_why']})")
    print(f"requests at once with the {min(AGENT_CONTEXT, cfg.max_position_embeddings)} positions agent frameworks "
          f"check for: {out['agent_slots']} (--max-batch; prefix caching off)")
    return 0


def add_parser(subparsers) -> None:
    from .cli import add_kv_dtype_arg
    from .quant import QUANTIZATIONS
    from .server.vllm_compat import _share

    p = subparsers.add_parser("memory", help="will a model fit a GPU, and with how much context (no loading)")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory or Hugging Face repo id (reads its "
                                                          "config.json only)")
    p.add_argument("--shape", default=None, help="a named shape instead, e.g. 26b-a4b")
    p.add_argument("--revision", default=None)
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GIB", help="the GPU's memory, e.g. 24")
    p.add_argument("--dtype", default="bfloat16", type=lambda s: "bfloat16" if s == "auto" else s,
                   help="the unquantised weights' dtype: float32 | bfloat16 | float16 | auto (what serve runs on a "
                        "GPU: bfloat16; the default)")
    from .server.cli import _image_limit

    p.add_argument("--limit-mm-per-prompt", type=_image_limit, default=None, metavar="LIMIT",
                   help="image=0: the server leaves the vision tower unloaded, so it is not counted")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    p.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=_share, default=None, metavar="SHARE")
    p.add_argument("--overhead", type=float, default=1.0, metavar="GIB",
                   help="memory the process takes besides weights and KV (CUDA context, allocator; default 1)")
    add_kv_dtype_arg(p)
    p.set_defaults(func=_main)


__all__ = ["weight_bytes", "stored_quantization", "plan", "add_parser"]
