"""`canvaslm` command line: generate | chat | quantize | serve | run-batch | memory | bench | train | export | sudoku.

Each subsystem registers its own subcommand through `add_parser(subparsers)` in its module, so this
file only wires them together; `generate` and `quantize` live here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys

# module path -> provides add_parser(subparsers); each sets `func` on its parser
SUBCOMMAND_MODULES = ("canvaslm.chat_cli", "canvaslm.server.cli", "canvaslm.bench", "canvaslm.train.cli",
                      "canvaslm.recipes.sudoku.cli", "canvaslm.memory")


def _temperature(value: float | None) -> float | None:
    """--temperature 0 is near-greedy, as on the server (temperatures scale the schedule and must stay > 0)."""
    from .sampling.schedules import GREEDY_TEMPERATURE

    return GREEDY_TEMPERATURE if value == 0 else value


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in re.split(r"[,\s]+", text.strip()) if t != ""]  # "5 6" is two ids, not 56
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be integers separated by commas or spaces, got "
                                         f"{text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def add_model_args(p: argparse.ArgumentParser, model_optional: bool = True):
    p.add_argument("model_dir", nargs="?" if model_optional else None, default=None,
                   help="checkpoint directory (HF layout), or a Hugging Face repo id (owner/name) read from the "
                        "HF cache and downloaded if missing" +
                        ("; default: the bundled Sudoku demo model" if model_optional else ""))
    p.add_argument("--revision", default=None, help="with a repo id: the branch, tag or commit (default: main)")
    add_load_args(p)


def add_load_args(p: argparse.ArgumentParser):
    """--device, --dtype, --quantization and --sampler-impl: how a checkpoint is loaded and run (LLM
    arguments)."""
    from .quant import QUANTIZATIONS
    from .sampling.samplers import SAMPLER_IMPLS

    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, type=lambda s: None if s == "auto" else s,
                   help="float32 | bfloat16 | float16 | auto (default: bf16 on GPU; on CPU bf16 for a bf16 "
                        "checkpoint when the CPU has AMX / AVX512-BF16, else fp32)")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="quantise attention, MLP and expert weights while loading: fp8 (Hopper), or int4 "
                        "(weight-only, group 128: 14.5 GB for the 26B-A4B model)")
    p.add_argument("--sampler-impl", default="auto", choices=SAMPLER_IMPLS,
                   help="how denoising steps draw their samples: auto (fused kernels on a GPU; on a CPU one uniform "
                        "per position by inverse CDF) or reference (torch.multinomial, as transformers draws: its "
                        "very tokens for the same seed, slower)")


def add_kv_dtype_arg(p: argparse.ArgumentParser):
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"), default="auto",
                   help="what the KV cache stores K and V in: auto (the model's dtype) or fp8 (float8 e4m3: half "
                        "of bf16's memory, so twice the context in the same memory; K and V rounded to 3 "
                        "mantissa bits)")


def add_lora_arg(p: argparse.ArgumentParser):
    p.add_argument("--lora", metavar="DIR", default=None,
                   help="generate with this LoRA adapter (a PEFT directory, e.g. `canvaslm export RUN OUT --adapter`)")


def load_llm(args):
    """The LLM the model arguments name, with the --lora adapter (if any) loaded as "lora"."""
    from .llm import LLM

    loras = {"lora": args.lora} if getattr(args, "lora", None) else None
    return LLM(args.model_dir, device=args.device, dtype=args.dtype, quantization=args.quantization,
               lora_modules=loras, revision=args.revision, sampler_impl=args.sampler_impl)


def _generate(args) -> int:
    from .llm import SamplingParams

    if args.suffix is not None:  # infilling writes the middle between two texts, nothing else
        given = [flag for flag, on in (("--image", args.image), ("--chat", args.chat), ("--think", args.think),
                                       ("--prompt-ids", args.prompt_ids is not None)) if on]
        if given:
            raise SystemExit(f"error: --suffix (infilling) cannot be combined with {given[0]}")
    elif args.gaps is not None:
        raise SystemExit("error: --gaps needs --suffix (they are the middle's candidate lengths)")
    if args.think and not args.chat:
        raise SystemExit("error: --think needs --chat (it turns on the chat template's thinking mode)")
    if args.chat and args.prompt_ids is not None:  # the template would be skipped: ids are taken as they are
        raise SystemExit("error: --chat renders --prompt text with the chat template; --prompt-ids are used as "
                         "given (send ids already templated, without --chat)")
    llm = load_llm(args)
    images = [_image_arg(x) for x in args.image or ()]
    text = args.prompt
    if images and text is not None and llm.image_placeholder not in text:  # images first, as Ollama puts them
        text = "\n".join([llm.image_placeholder] * len(images) + [text])
    if args.prompt_ids is not None:
        prompt = args.prompt_ids
    elif args.chat:
        if llm.tokenizer is None:
            raise SystemExit(f"error: {llm.model_dir} has no tokenizer.json, so --chat is not available")
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": text}],
                                           **({"enable_thinking": True} if args.think else {}))
    else:
        prompt = llm.encode_prompt(text)
    if images:
        prompt = {"prompt_token_ids": prompt, "multi_modal_data": {"image": images}}
    from .sampling.cli_args import constraint_params, sampling_params
    extra = {**constraint_params(args, llm), **sampling_params(args)}
    params = SamplingParams(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps, seed=args.seed,
                            temperature=_temperature(args.temperature), lora="lora" if args.lora else None, **extra)
    if args.suffix is not None:
        if args.prompt is None:
            raise SystemExit("error: --suffix (infilling) needs --prompt text as the prefix")
        fill = llm.infill(args.prompt, args.suffix, params, gaps=args.gaps)
        print(json.dumps({"text": fill.text, "middle": fill.middle, "gap": fill.gap,
                          "scores": fill.scores}) if args.json else fill.text)
        return 0
    res = llm.generate([prompt], params)[0]
    if args.chat:  # a thought channel is kept out of the text (canvaslm.reasoning)
        res = llm._without_thought(res, params)[0]
    if args.json:
        print(json.dumps({"token_ids": res.token_ids, "text": res.text, "finish_reason": res.finish_reason,
                          "tokens_per_forward": res.tokens_per_forward, "decoder_passes": res.decoder_passes,
                          "prompt_tokens": len(res.prompt_ids), **({"reasoning": res.reasoning} if res.reasoning
                                                                   is not None else {})}))
    else:
        if res.reasoning:
            print(f"[thinking] {res.reasoning}", file=sys.stderr, flush=True)
        print(res.text if llm.tokenizer is not None else " ".join(map(str, res.token_ids)))
    return 0


def _image_arg(x: str, flag: str = "--image"):
    """--image: a local file, as a Path (the user names it, so any path and any size is allowed: LLM reads it,
    and its errors name it), else a URL / data URL."""
    from pathlib import Path

    path = Path(x).expanduser()
    if path.is_file():
        return path.absolute()
    if "://" not in x and not x.startswith("data:"):
        raise SystemExit(f"error: {flag} {x}: no such file (and not a URL)")
    return x


def _quantize(args) -> int:
    from pathlib import Path

    from .checkpoint import check_output_dir, load_model, save_model, stored_dtype
    from .config import DiffusionParams
    from .quant import weight_bytes
    from .train.checkpointing import tokenizer_files

    src, dst = Path(args.src), Path(args.dst)
    check_output_dir(dst, src)  # not the source nor holding it, only a model's files, and writable
    dtype = args.dtype or stored_dtype(src) or "bfloat16"  # auto: as the source stores them
    params, extra = DiffusionParams.from_dir(src), tokenizer_files(src)  # their errors before the long load
    model = load_model(src, device=args.device or "cpu", dtype=dtype, quantization=args.to, progress=True)
    save_model(model, dst, params, dtype=dtype, extra_files=extra)  # the vision tower too
    print(f"canvaslm: wrote {dst} ({args.to}, {weight_bytes(model) / 1e9:.2f} GB of weights); "
          f"load it as any checkpoint", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canvaslm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt")
    add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_parse_ids, help="prompt as comma-separated token ids")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--think", action="store_true", help="with --chat: thinking mode (the template's "
                   "enable_thinking); the thought goes to stderr (or `reasoning` with --json)")
    g.add_argument("--image", action="append", metavar="FILE_OR_URL",
                   help="an image for the prompt (repeatable): a file, an http(s) URL or a data URL; the prompt "
                        "holds one <|image|> where each goes, or they go first")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None,
                   help="scales the temperature schedule; 0 is near-greedy (as on the server)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    add_lora_arg(g)
    from .sampling.cli_args import add_constraint_args, add_sampling_args
    add_sampling_args(g)
    add_constraint_args(g)
    g.set_defaults(func=_generate)
    from .quant import QUANTIZATIONS

    q = sub.add_parser("quantize", help="write a quantised copy of a checkpoint (int4 or fp8 weights)")
    q.add_argument("src", help="checkpoint directory (HF layout, bf16/fp32)")
    q.add_argument("dst", help="new directory for the quantised checkpoint (written atomically)")
    q.add_argument("--to", required=True, choices=QUANTIZATIONS, help="weight format of attention, MLP, experts")
    q.add_argument("--dtype", default="bfloat16", type=lambda s: None if s == "auto" else s,
                   help="dtype of the weights that stay unquantised: float32 | bfloat16 | float16 | auto (the "
                        "source's; default bf16)")
    q.add_argument("--device", default=None, help="where to quantise (default: cpu; cuda is faster)")
    q.set_defaults(func=_quantize)
    for mod in SUBCOMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # that subsystem is not built yet
                continue
            raise
        m.add_parser(sub)
    _no_abbreviations(parser)
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Every flag of every subcommand must be spelled out: a prefix would match whatever flag it begins
    (`serve --enable-lora`, vLLM's flag, matched `--enable-lora-updates`)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # our errors name the problem; no deep traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `canvaslm ... | head`: the reader left; no traceback, the shell's status
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
