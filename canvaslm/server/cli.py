"""`canvaslm serve MODEL_DIR`: the OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

log = logging.getLogger("canvaslm.server")

SHUTDOWN_TIMEOUT_S = 5.0  # how long an exit waits on open connections before cutting them


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for o in origins:
        if o != "*" and not (o.startswith("http://") or o.startswith("https://")):
            raise argparse.ArgumentTypeError(f"{o!r} is not an origin: expected http(s)://host[:port] or '*'")
    return origins


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return v


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _bytes(text: str) -> int:
    """A size in bytes, with an optional K / M / G suffix (powers of 1024); 0: no limit."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(t[-1:], 1)
    try:
        v = float(t[:-1] if t[-1:] in units else t) * scale
    except ValueError:
        v = -1.0
    if not (v >= 0 and v == int(v)):
        raise argparse.ArgumentTypeError(f"must be a size in bytes (e.g. 67108864, 64M, 1G; 0: no limit), got {text!r}")
    return int(v)


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [0, 65535], got {text!r}")
    return v


def add_parser(subparsers) -> None:
    from ..cli import add_model_args
    from .vllm_compat import MAX_REQUEST_BYTES, MAX_STEPS_LIMIT, add_vllm_args

    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    add_model_args(p, model_optional=False)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--api-key", default=os.environ.get("CANVASLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $CANVASLM_API_KEY)")
    p.add_argument("--allowed-origins", type=_origins, default=(), metavar="ORIGINS",
                   help="CORS: comma-separated browser origins that may call the API, e.g. "
                        "https://ui.example.com, or '*' for any (default: none)")
    p.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=8,
                   help="requests per encoder/decoder call (and KV slots); --max-num-seqs is vLLM's name")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="KV positions per request: prompt + whole canvases (default: the model's whole context, or "
                        "the most the KV cache for --max-batch requests fits in memory)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per request per engine step")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV of prompt prefixes other requests encoded (default: on where its prefix "
                        "store leaves room for activations, on a GPU or in a CPU's available RAM)")
    _add_store_arg(p)
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the `model` clients send (default: the repo id, or the directory's name); more names are "
                        "aliases a request may send instead (vLLM's)")
    p.add_argument("--max-steps-limit", type=_positive, default=MAX_STEPS_LIMIT,
                   help="largest max_denoising_steps a request may ask for (also caps the checkpoint's default)")
    p.add_argument("--regex-timeout", type=_seconds, default=10.0,
                   help="seconds a guided_regex may take to compile before the request gets a 400 (default 10)")
    p.add_argument("--max-request-bytes", type=_bytes, default=MAX_REQUEST_BYTES, metavar="SIZE",
                   help="largest request body taken (a bigger one gets a 413 before it is read in full); a size in "
                        "bytes or with a K/M/G suffix, 0 for no limit (default 64M)")
    p.add_argument("--shutdown-timeout", type=_seconds, default=SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, generations under way end at once with a 503 \"the server is "
                        "shutting down\"; then the server waits this long for open connections before closing "
                        "them (default 5)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the checkpoint's (or where it has none): a file, "
                        "or, as vLLM takes it, the template itself")
    _add_lora_arg(p, updates=True)
    _add_media_arg(p)
    p.add_argument("--embedding-pooling", choices=("mean", "last"), default="mean",
                   help="/v1/embeddings: the mean of the input's final hidden states, or the last token's")
    add_vllm_args(p)
    p.set_defaults(func=_serve)

    b = subparsers.add_parser("run-batch", help="run an OpenAI batch file (JSONL requests) offline through the server")
    add_model_args(b, model_optional=False)
    b.add_argument("-i", "--input", required=True, help="JSONL: {custom_id, method, url, body} per line")
    b.add_argument("-o", "--output", required=True, help="JSONL results, in input order (written atomically)")
    b.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default 16)")
    b.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=8,
                   help="requests per encoder/decoder call (and KV slots)")
    b.add_argument("--max-model-len", type=int, default=None, help="KV positions per request (default: the model's whole context, or the most that fits)")
    b.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per request per engine step")
    b.add_argument("--served-model-name", default=None, help="the `model` the requests name (default: the repo id, "
                   "or the directory's name)")
    b.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="as for serve (default: on where its memory fits)")
    _add_store_arg(b)
    add_vllm_args(b)
    _add_lora_arg(b)
    _add_media_arg(b)
    b.set_defaults(func=_run_batch)


def _read_template(args) -> tuple[str, str]:
    """(source, origin) of --chat-template: a file's text or, where no such file exists and the value reads as a
    template (it holds {% or {{, or a newline), the value itself (vLLM takes either). Needs no model: read
    before a repo id is resolved (_check_template_target then checks the model has a tokenizer)."""
    from pathlib import Path

    from ..tokenizer import _compile_template

    value = args.chat_template
    path = Path(value)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # an inline template too long for a file name, or holding a NUL
        is_file = False
    if is_file:
        source, origin = path.read_text(encoding="utf-8"), f"--chat-template {path}"
    elif "{%" in value or "{{" in value or "\n" in value:
        source, origin = value, "--chat-template (the template given inline)"
    else:
        raise FileNotFoundError(f"--chat-template: {path} does not exist (taken as a file's path; a template given "
                                "inline holds {% or {{)")
    _compile_template(source, origin)  # a syntax error names the file (or the inline template) and line now
    return source, origin


def _check_template_target(args) -> None:
    """--chat-template needs a tokenizer to apply it to (the resolved model directory's)."""
    from pathlib import Path

    if not (Path(args.model_dir) / "tokenizer.json").is_file():
        raise ValueError(f"--chat-template: {args.model_dir} has no tokenizer.json to apply it to")


def _engine_config(args):
    from ..config import ModelConfig
    from ..engine.engine import EngineConfig

    cfg = ModelConfig.from_dir(args.model_dir)
    low, limit = cfg.canvas_length + 1, cfg.max_position_embeddings  # a prompt token and one canvas
    if args.max_model_len is not None and not low <= args.max_model_len <= limit:  # before the model loads
        raise ValueError(f"--max-model-len {args.max_model_len} must be in [{low}, {limit}] (more than one canvas "
                         f"of {cfg.canvas_length}, at most the model's max_position_embeddings)")
    return EngineConfig(max_batch=args.max_batch, max_model_len=args.max_model_len,
                        prefill_chunk=args.prefill_chunk, prefix_caching=args.enable_prefix_caching,
                        prefix_store_len=args.prefix_store_len,
                        kv_cache_dtype=args.kv_cache_dtype, memory_utilization=args.gpu_memory_utilization,
                        sampler_impl=args.sampler_impl)


def _add_store_arg(p) -> None:
    """--prefix-store-len and --kv-cache-dtype: how the KV cache is kept."""
    from ..cli import add_kv_dtype_arg

    add_kv_dtype_arg(p)
    p.add_argument("--prefix-store-len", type=int, default=None, metavar="N",
                   help="prefix caching: sliding-layer positions kept per slot for reuse, i.e. how far behind "
                        "its last position a slot's prompt can still be reused (default: the sliding window "
                        "+ --prefill-chunk + 4 canvases, enough behind a 4-canvas reply)")


def _add_media_arg(p) -> None:
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="image parts may name files under DIR (a path or file:// URL; vLLM's flag). Default: "
                        "none, only data URLs, base64 and http(s) URLs")
    p.add_argument("--allowed-media-domains", nargs="*", default=None, metavar="HOST",
                   help="only these hosts may be named by http(s) image URLs (vLLM's flag; given with no host: "
                        "no URL is fetched). Default: any host")
    from .vllm_compat import _json_object

    p.add_argument("--mm-processor-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="image processor settings over the checkpoint's, e.g. '{\"max_soft_tokens\": 560}' (more "
                        "tokens per image: finer detail, longer prompts; 70, 140, 280, 560 or 1120); a request's "
                        "mm_processor_kwargs goes over these")
    p.add_argument("--limit-mm-per-prompt", type=_image_limit, default=None, metavar="LIMIT",
                   help="images per prompt, as vLLM takes it: '{\"image\": N}' or image=N; 0 serves text only "
                        "and leaves the vision tower unloaded (default: no limit)")


def _image_limit(text: str) -> int:
    import json

    try:
        value = json.loads(text) if text.lstrip().startswith("{") else dict(
            (k.strip(), int(v)) for k, v in (kv.split("=") for kv in text.split(",")))
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected '{{\"image\": N}}' or image=N ({e})") from None
    unknown = sorted(set(value) - {"image"}) if isinstance(value, dict) else ["(not an object)"]
    if unknown or not isinstance(value.get("image"), int) or value["image"] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: only image=N (N >= 0) is supported"
                                         + (f", got {unknown}" if unknown else ""))
    return value["image"]


def _add_lora_arg(p, updates: bool = False) -> None:
    p.add_argument("--lora-modules", nargs="+", default=(), metavar="NAME=DIR",
                   help="serve LoRA adapters (PEFT directories) beside the base model; a request picks one "
                        "by sending its NAME as `model`")
    p.add_argument("--max-loras", type=int, default=16, help="LoRA adapters held at once (default 16)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="the largest LoRA rank served (default 64)")
    if updates:
        p.add_argument("--enable-lora-updates", action="store_true",
                       help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (they read adapter "
                            "directories on the server: give the API to trusted clients only)")


def _adapters(args) -> list:
    """The --lora-modules adapters, read (and so checked) before the model loads."""
    from ..lora_serving import parse_lora_modules, read_adapter

    for flag in ("max_loras", "max_lora_rank"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    adapters = [read_adapter(path, name) for name, path in parse_lora_modules(args.lora_modules)]
    if len(adapters) > args.max_loras:
        raise ValueError(f"--lora-modules names {len(adapters)} adapters, over --max-loras={args.max_loras}")
    big = [a for a in adapters if a.rank > args.max_lora_rank]
    if big:
        raise ValueError(f"--lora-modules: {big[0].name!r} has rank {big[0].rank}, over --max-lora-rank="
                         f"{args.max_lora_rank}")
    return adapters


def _resolve_model(args) -> None:
    """args.model_dir -> a checkpoint directory (a repo id through the Hugging Face cache: canvaslm.hub);
    a repo id is also the default served model name, as in vLLM."""
    from ..hub import is_repo_id, resolve_model

    if isinstance(args.served_model_name, list):  # serve's NAME [ALIAS ...]
        names = list(dict.fromkeys(args.served_model_name))  # a name given twice is one name
        args.served_model_name, args.aliases = names[0], tuple(names[1:])
    if args.served_model_name is None and is_repo_id(args.model_dir):
        args.served_model_name = args.model_dir
    args.model_dir = str(resolve_model(args.model_dir, args.revision))


def _run_batch(args) -> int:
    from pathlib import Path

    from .batch import check_batch_args, read_requests, run_batch_file
    from .launch import build_state
    from .vllm_compat import apply_chat_flags, check_flags, generation_defaults

    parsed = read_requests(Path(args.input))  # a missing or empty file fails before the model loads
    check_batch_args(args.output, args.concurrency)  # as does an -o that cannot be written, or --concurrency 0
    adapters = _adapters(args)
    check_flags(args)  # and the vLLM flags' checks that need no model: resolving a repo id may download it
    _resolve_model(args)
    defaults, notes = generation_defaults(args, args.model_dir)
    state = build_state(args.model_dir, args.device, args.dtype, _engine_config(args),
                        served_model_name=args.served_model_name, quantization=args.quantization,
                        lora_modules=adapters, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                        defaults=defaults, allowed_local_media_path=args.allowed_local_media_path,
                        max_images=args.limit_mm_per_prompt, allowed_media_domains=args.allowed_media_domains,
                        processor_kwargs=args.mm_processor_kwargs)
    # the command's own lines go to stderr: -o /dev/stdout then carries the records alone
    for note in notes + apply_chat_flags(state, args) + state.engine.notes:
        print(f"canvaslm: {note}", file=sys.stderr, flush=True)
    try:
        counts = run_batch_file(state, args.input, args.output, args.concurrency, parsed)
    finally:
        state.shutdown()
    print(f"canvaslm: {counts['requests']} requests, {counts['ok']} ok, {counts['failed']} failed -> {args.output}",
          file=sys.stderr, flush=True)
    return 0


def _serve(args) -> int:
    import uvicorn

    from .app import build_app
    from .launch import build_state, stop_engine_on_exit
    from .vllm_compat import apply_chat_flags, check_flags, generation_defaults

    adapters = _adapters(args)  # the checks that need no model first: resolving a repo id may download it
    check_flags(args)
    template = _read_template(args) if args.chat_template is not None else None
    _resolve_model(args)
    if template is not None:  # fail before loading a model
        _check_template_target(args)
    defaults, notes = generation_defaults(args, args.model_dir)
    config = _engine_config(args)
    state = build_state(args.model_dir, args.device, args.dtype, config, args.api_key, args.served_model_name,
                        args.max_steps_limit, quantization=args.quantization, regex_timeout=args.regex_timeout,
                        lora_modules=adapters, lora_updates=args.enable_lora_updates, max_loras=args.max_loras,
                        max_lora_rank=args.max_lora_rank, defaults=defaults,
                        allowed_local_media_path=args.allowed_local_media_path, max_images=args.limit_mm_per_prompt,
                        allowed_media_domains=args.allowed_media_domains, processor_kwargs=args.mm_processor_kwargs)
    clash = sorted(set(getattr(args, "aliases", ())) & set(state.loras))
    if clash:
        state.shutdown()
        raise ValueError(f"--served-model-name: {clash[0]!r} is also a --lora-modules name")
    state.aliases = getattr(args, "aliases", ())
    if template is not None:
        state.tokenizer.set_chat_template(*template)
    state.allowed_origins = args.allowed_origins
    state.max_request_bytes = args.max_request_bytes or None
    state.embedding_pooling = args.embedding_pooling
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    if args.port == 0:  # any free port: the one printed below is the one served
        from .launch import free_port

        args.port = free_port(args.host)
    loras = f", LoRA adapters {sorted(state.loras)}" if state.loras else ""
    for note in notes + apply_chat_flags(state, args) + state.engine.notes:
        print(f"canvaslm: {note}", flush=True)
    print(f"canvaslm: serving {state.model_name!r} on http://{args.host}:{args.port}/v1 "
          f"(max_batch={config.max_batch}, max_model_len={state.max_model_len}{loras})", flush=True)
    app = build_app(state)
    stop_engine_on_exit(app, state.engine)
    # uvicorn re-raises the SIGTERM it handled once it has shut down: a stop asked for exits 0, as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                    timeout_graceful_shutdown=args.shutdown_timeout)
    finally:
        signal.signal(signal.SIGTERM, previous)
        state.shutdown()
    return 0
