"""vLLM's `serve` flags on `canvaslm serve`, so a command copied from a model card or an article runs here:

    canvaslm serve google/diffusiongemma-26B-A4B-it --max-model-len 262144 --max-num-seqs 4 \\
        --gpu-memory-utilization 0.85 --attention-backend TRITON_ATTN --generation-config vllm \\
        --hf-overrides '{"diffusion_sampler": "entropy_bound", "diffusion_entropy_bound": 0.1}' \\
        --diffusion-config '{"canvas_length": 256}' --enable-chunked-prefill

Honoured: `--max-num-seqs` (= --max-batch), `--gpu-memory-utilization` (the share of the device the
process may use: engine.kv_budget), `--generation-config auto|vllm|DIR` (the sampler defaults: the
checkpoint's generation_config.json, the built-in ones, or DIR's file), `--hf-overrides` and
`--diffusion-config` (JSON: sampler settings over those defaults, by their names with or without a
`diffusion_` prefix; `sampler` must be entropy_bound; `canvas_length` must be the checkpoint's, which the
model was trained at), `--dtype auto`, `--tensor-parallel-size 1`. Accepted with nothing to do, said at
start: `--enable-chunked-prefill` (prompts are always encoded in `--prefill-chunk` pieces),
`--attention-backend` (one attention path), `--trust-remote-code` (no remote code is run), `--enable-lora`
(LoRA is on whenever `--lora-modules` names adapters; the load/unload routes are `--enable-lora-updates`),
`--enable-auto-tool-choice` and `--tool-call-parser` ("auto" tool choice is on wherever the checkpoint's
tokenizer has call tokens, and calls are read in its own syntax), `--reasoning-parser gemma4` (a chat
reply's thought channel goes to `reasoning_content` wherever the tokenizer has the channel tokens;
`--reasoning-parser none` turns that off), `--default-chat-template-kwargs JSON` (variables every chat
template rendering gets unless a request's `chat_template_kwargs` sets them). llama-server's
`--reasoning-budget N` is the thinking budget (sampling.thinking) of requests that set none. Anything
else is refused by name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MAX_STEPS_LIMIT = 1024  # --max-steps-limit's default: the most max_denoising_steps a request may ask for
MAX_REQUEST_BYTES = 64 << 20  # --max-request-bytes' default: bodies are read whole and parsed on the event loop
SAMPLER_KEYS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                "confidence_threshold")


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], e.g. 0.9; got {text!r}")
    return v


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(v).__name__}")
    return v


def add_vllm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM's flags (server/vllm_compat.py)")
    g.add_argument("--gpu-memory-utilization", type=_share, default=None, metavar="SHARE",
                   help="the share of the device (of RAM on a CPU) this process may use, weights included; the KV "
                        "cache gets what is left less 2 GiB (default: the free memory less max(2 GiB, 10%%))")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="sampler defaults: the checkpoint's generation_config.json (auto), the built-in ones "
                        "(vllm), or DIR/generation_config.json")
    g.add_argument("--hf-overrides", type=_json_object, default=None, metavar="JSON",
                   help="sampler settings over the defaults, e.g. '{\"diffusion_entropy_bound\": 0.1}'")
    g.add_argument("--diffusion-config", type=_json_object, default=None, metavar="JSON",
                   help="the same, plus canvas_length (must be the checkpoint's)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="only 1: one device")
    g.add_argument("--enable-chunked-prefill", action="store_true", help="always on here (--prefill-chunk)")
    g.add_argument("--attention-backend", default=None, help="accepted; there is one attention path")
    g.add_argument("--trust-remote-code", action="store_true", help="accepted; no remote code is run")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted; 'auto' tool choice is on where the tokenizer has call tokens")
    g.add_argument("--tool-call-parser", default=None, help="accepted; calls are read in the checkpoint's own syntax")
    g.add_argument("--enable-lora", action="store_true",
                   help="accepted; LoRA is on whenever --lora-modules names adapters (the load/unload routes "
                        "are --enable-lora-updates)")
    g.add_argument("--default-chat-template-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="variables every chat template rendering gets unless the request's chat_template_kwargs "
                        "sets them, e.g. '{\"enable_thinking\": false}'")
    g.add_argument("--reasoning-parser", default=None, choices=("gemma4", "none"),
                   help="chat replies' thought channels go to reasoning_content wherever the tokenizer has them "
                        "(gemma4, the default); none leaves them in the text")
    g.add_argument("--reasoning-budget", type=_budget, default=-1, metavar="N",
                   help="llama-server's: at most N tokens in a reply's thought channel for requests that set no "
                        "thinking_token_budget (-1: no limit; 0: the thought is closed as soon as it opens)")


def _budget(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -2
    if n < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (no limit) or a number of tokens >= 0, got {text!r}")
    return n


def _sampler_settings(given: dict | None, flag: str, canvas_length: int | None) -> dict:
    """The sampler settings `given` by `flag`, by their names without a diffusion_ prefix; canvas_length None:
    not known yet (check_flags), so not compared."""
    out = {}
    for key, value in (given or {}).items():
        name = key.removeprefix("diffusion_")
        if name == "sampler":
            if value != "entropy_bound":
                raise ValueError(f"{flag}: {key}={value!r}; this engine runs the entropy_bound sampler only")
        elif name == "canvas_length":
            if canvas_length is not None and value != canvas_length:
                raise ValueError(f"{flag}: {key}={value!r}, but the checkpoint's canvas_length is {canvas_length} "
                                 "(the model was trained at it); leave it out or set it to that")
        elif name in SAMPLER_KEYS:
            out[name] = value
        else:
            raise ValueError(f"{flag}: key {key!r} is not one this engine takes; it takes the sampler's "
                             f"{', '.join(SAMPLER_KEYS)} (with or without a diffusion_ prefix), sampler and "
                             "canvas_length")
    return out


def check_flags(args) -> None:
    """Refuse, by flag, what the vLLM flags in `args` ask that needs no model to see: run before a repo id is
    resolved (online, that downloads the checkpoint). generation_defaults runs them again."""
    from .protocol import TEMPLATE_RESERVED

    if args.tensor_parallel_size != 1:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size}: canvaslm runs on one device; use 1 "
                         "(--quantization int4 fits the 26B-A4B model on a 24 GB GPU)")
    reserved = sorted(TEMPLATE_RESERVED & set(args.default_chat_template_kwargs or {}))
    if reserved:
        raise ValueError(f"--default-chat-template-kwargs may not set {reserved[0]}; it has its own request field")
    source = args.generation_config
    if source not in ("auto", "vllm") and not (Path(source) / "generation_config.json").is_file():
        raise ValueError(f"--generation-config {source}: no generation_config.json there (or use auto / vllm)")
    _sampler_settings(args.hf_overrides, "--hf-overrides", None)  # unknown keys, another sampler
    _sampler_settings(args.diffusion_config, "--diffusion-config", None)


def generation_defaults(args, model_dir) -> tuple:
    """(DiffusionParams the server starts from, notes to print) for the vLLM flags in `args`; raises a
    ValueError naming the flag for anything it cannot honour, before the model loads. max_denoising_steps
    is capped at args.max_steps_limit (serve's --max-steps-limit; run-batch has none: MAX_STEPS_LIMIT), as
    the server caps it, and the notes give the value used."""
    from ..config import ConfigError, DiffusionParams, ModelConfig

    check_flags(args)
    notes = []
    source = args.generation_config
    if source == "auto":
        defaults = DiffusionParams.from_dir(model_dir)
    elif source == "vllm":
        defaults = DiffusionParams()
        notes.append("sampler defaults: the built-in ones (--generation-config vllm), not the checkpoint's file")
    else:
        defaults = DiffusionParams.from_dir(source)  # check_flags saw its generation_config.json
        notes.append(f"sampler defaults from {Path(source) / 'generation_config.json'}")
    canvas = ModelConfig.from_dir(model_dir).canvas_length
    settings = _sampler_settings(args.hf_overrides, "--hf-overrides", canvas)
    settings.update(_sampler_settings(args.diffusion_config, "--diffusion-config", canvas))
    if settings:
        try:
            defaults = defaults.replace(**settings)
        except (ConfigError, TypeError) as e:
            raise ValueError(f"--hf-overrides / --diffusion-config: {e}") from None
    limit = getattr(args, "max_steps_limit", MAX_STEPS_LIMIT)
    steps = defaults.max_denoising_steps
    if steps > limit:  # the server caps it so (launch.state_from_model): the notes give the value it uses
        defaults = defaults.replace(max_denoising_steps=limit)
        by = f"--max-steps-limit {limit}" if hasattr(args, "max_steps_limit") else f"the server's limit {limit}"
        if "max_denoising_steps" in settings:
            settings["max_denoising_steps"] = f"{limit} ({steps} capped by {by})"
        else:
            notes.append(f"sampler default max_denoising_steps={limit} (the generation config's {steps} capped "
                         f"by {by})")
    if settings:
        notes.append("sampler defaults set: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for flag, given, why in (
            ("--enable-chunked-prefill", args.enable_chunked_prefill, f"prompts are always encoded in "
                                                                      f"--prefill-chunk {args.prefill_chunk} pieces"),
            ("--attention-backend", args.attention_backend, "canvaslm has one attention path"),
            ("--trust-remote-code", args.trust_remote_code, "no remote code is run"),
            ("--enable-auto-tool-choice", args.enable_auto_tool_choice,
             "'auto' tool choice is on where the tokenizer has call tokens"),
            ("--tool-call-parser", args.tool_call_parser, "calls are read in the checkpoint's own syntax"),
            ("--enable-lora", args.enable_lora, "LoRA is on whenever --lora-modules names adapters; "
                                                "/v1/load_lora_adapter and /v1/unload_lora_adapter are "
                                                "--enable-lora-updates"),
            ("--reasoning-parser", args.reasoning_parser == "gemma4",
             "thought channels are read wherever the tokenizer has them")):
        if given:
            notes.append(f"{flag}: nothing to do ({why})")
    return defaults, notes


def apply_chat_flags(state, args) -> list[str]:
    """Put --default-chat-template-kwargs, --reasoning-parser and a default length set by flag on a built server
    state (checked by generation_defaults before the model loaded); -> the notes to print."""
    given = {**_sampler_settings(args.hf_overrides, "--hf-overrides", state.canvas_length),
             **_sampler_settings(args.diffusion_config, "--diffusion-config", state.canvas_length)}
    state.fill_context = "max_new_tokens" not in given  # vLLM ignores the checkpoint's 256 (HF's OOM guard), not a flag
    state.reasoning = args.reasoning_parser != "none"
    state.thinking_token_budget = None if args.reasoning_budget == -1 else args.reasoning_budget
    template_defaults = args.default_chat_template_kwargs or {}
    if state.tokenizer is not None:
        state.tokenizer.template_defaults = dict(template_defaults)
    notes = []
    if state.thoughts is not None:
        notes.append("chat replies' thought channels go to reasoning_content (--reasoning-parser none keeps them "
                     "in the text)")
    if state.thinking_token_budget is not None:
        notes.append(f"thoughts end after at most {state.thinking_token_budget} tokens unless a request sets "
                     "thinking_token_budget (--reasoning-budget)")
    if not state.fill_context:
        notes.append(f"requests without max_tokens get at most {state.defaults.max_new_tokens} new tokens (the "
                     "max_new_tokens flag; without it they run until EOS or the context is full)")
    if template_defaults:
        notes.append("chat template defaults: " + ", ".join(f"{k}={v!r}" for k, v in template_defaults.items()))
    return notes


__all__ = ["add_vllm_args", "check_flags", "generation_defaults", "apply_chat_flags", "SAMPLER_KEYS", "MAX_STEPS_LIMIT"]
