"""Build a server from a checkpoint directory and run it: in the foreground (the CLI) or in a background
thread on a free loopback port (tests, benchmarks). Both shut the engine thread down on exit."""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import threading
import time
from pathlib import Path

from ..checkpoint import default_dtype, load_model, parse_dtype
from ..config import DiffusionParams, checked_eos_ids
from ..engine.engine import Engine, EngineConfig
from ..sampling.samplers import sampleable_vocab, set_sampleable_vocab
from .app import build_app
from .serving import ServerState
from .vllm_compat import MAX_STEPS_LIMIT

log = logging.getLogger("canvaslm.server")


def stop_engine_on_exit(app, engine) -> None:
    """On SIGTERM / SIGINT, stop the engine before uvicorn starts waiting on the connections: every request
    under way ends with its 503 "the server is shutting down" (in-band on a stream, then [DONE]) while its
    connection is open, instead of running on until the graceful-shutdown timeout cuts it. uvicorn installs
    its signal handlers before the app starts up, so the app's startup chains ours in front of them (only
    the main thread may; a server on another thread stops the engine itself, as BackgroundServer does)."""
    def chain():
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if callable(handler):
                signal.signal(sig, _stopping_first(engine, handler))

    app.router.add_event_handler("startup", chain)


def _stopping_first(engine, handler):
    def on_signal(sig, frame):
        engine.shutdown(timeout=0)  # does not wait: the engine thread ends its requests while the loop runs on
        handler(sig, frame)
    return on_signal


def build_state(model_dir, device: str | None = None, dtype=None, config: EngineConfig | None = None,
                api_key: str | None = None, served_model_name: str | None = None,
                max_denoising_steps: int = MAX_STEPS_LIMIT, quantization: str | None = None,
                regex_timeout: float = 10.0, lora_modules=(), lora_updates: bool = False,
                max_loras: int | None = None, max_lora_rank: int | None = None,
                defaults: DiffusionParams | None = None, allowed_local_media_path: str | None = None,
                max_images: int | None = None, allowed_media_domains=None,
                processor_kwargs: dict | None = None) -> ServerState:
    """Load the checkpoint (quantised while loading if asked: "fp8" | "int4"), start the engine thread
    and return the state the app serves. lora_modules: [(served name, PEFT adapter dir)] or
    `lora_serving.Adapter`s, served beside the base; lora_updates: adapters may also be loaded and
    unloaded over HTTP; max_loras / max_lora_rank: limits on the adapters held (lora_serving.MultiLoRA).
    allowed_local_media_path: image parts may name files under this directory (vLLM's flag; default: none);
    max_images: images per prompt (None: any number; 0: text only, the vision tower is not loaded);
    allowed_media_domains: the hosts image URLs may name (None: any); processor_kwargs: image processor
    settings over the checkpoint's (vLLM's --mm-processor-kwargs, e.g. {"max_soft_tokens": 560})."""
    import torch

    from ..tokenizer import Tokenizer

    model_dir = Path(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(dtype or default_dtype(device, model_dir))
    model = load_model(model_dir, device=device, dtype=dtype, quantization=quantization)
    tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").exists() else None
    if tokenizer is None:  # served all the same (vLLM would need --skip-tokenizer-init): say so at start-up
        log.warning("%s has no tokenizer.json: serving without a tokenizer, so only prompts given as token ids "
                    "are served (text prompts and chat messages get a 400)", model_dir)
    defaults = defaults or DiffusionParams.from_dir(model_dir)  # the sampler's (given: vLLM's --generation-config)
    return state_from_model(model, defaults, tokenizer, config, api_key,
                            served_model_name or model_dir.resolve().name, max_denoising_steps, regex_timeout, lora_modules,
                            lora_updates, max_loras, max_lora_rank, model_dir, allowed_local_media_path, max_images,
                            allowed_media_domains, processor_kwargs)


def state_from_model(model, defaults: DiffusionParams, tokenizer=None, config: EngineConfig | None = None,
                     api_key: str | None = None, served_model_name: str = "model",
                     max_denoising_steps: int = MAX_STEPS_LIMIT, regex_timeout: float = 10.0, lora_modules=(),
                     lora_updates: bool = False, max_loras: int | None = None,
                     max_lora_rank: int | None = None, model_dir=None,
                     allowed_local_media_path: str | None = None, max_images: int | None = None,
                     allowed_media_domains=None, processor_kwargs: dict | None = None) -> ServerState:
    """Serve an in-memory model (e.g. random weights at a benchmark shape); starts the engine thread.
    model_dir: where its image processor settings are read (multimodal.Vision). A vision tower is loaded
    here, before the engine sizes its KV cache to the memory left, unless max_images is 0."""
    from ..multimodal import Vision

    cfg = model.cfg
    if tokenizer is not None:  # outputs stay within its ids (padded embedding rows are never sampled)
        set_sampleable_vocab(model, tokenizer)
    if not regex_timeout > 0:
        raise ValueError(f"regex_timeout must be > 0 seconds, got {regex_timeout}")
    if not max_denoising_steps >= 1:
        raise ValueError(f"max_denoising_steps (--max-steps-limit) must be >= 1, got {max_denoising_steps}")
    if defaults.max_denoising_steps > max_denoising_steps:  # the limit bounds a request that names no steps too
        defaults = dataclasses.replace(defaults, max_denoising_steps=max_denoising_steps)
    config = config or EngineConfig(max_model_len=None)  # the model's whole context where memory allows
    eos = checked_eos_ids(defaults, cfg)
    loras = {}
    if lora_modules or lora_updates:  # wrapped before the engine starts (and before any CUDA graph is captured)
        from ..lora_serving import adapters_from, install

        adapters = adapters_from(lora_modules)
        taken = [a.name for a in adapters if a.name == served_model_name]
        if taken:
            raise ValueError(f"--lora-modules: {taken[0]!r} is the base model's served name")
        ids = install(model, adapters, config.slots, max_loras, max_lora_rank).ids
        loras = {a.name: (ids[a.name], a.path) for a in adapters}
    # a bad processor config fails here (with image=0 it is not read)
    vision = Vision(model, model_dir, allowed_local_media_path, max_images, allowed_media_domains, processor_kwargs)
    if vision.available:
        vision.tower()
    elif max_images != 0 and getattr(model, "quantized_vision", None):
        log.warning("%s", model.quantized_vision)  # every image request is refused with it
    engine = Engine(model, config, history_depth=max(1, defaults.stability_depth)).start()
    config = engine.config  # max_model_len decided
    if tokenizer is not None:  # the constraint compilers' token table, built before the first request needs it
        from ..sampling.token_dfa import Vocab

        threading.Thread(target=Vocab.of, args=(tokenizer,), name="canvaslm-vocab", daemon=True).start()
    # the ids a request may name (prompts, logit_bias, stop_token_ids, pins): those the tokenizer decodes, not a
    # padded embedding's extra rows (a prompt holding one could not be echoed or given prompt_logprobs)
    vocab_size = sampleable_vocab(model) or cfg.vocab_size
    return ServerState(engine=engine, tokenizer=tokenizer, model_name=served_model_name, defaults=defaults,
                       eos_ids=eos, vocab_size=vocab_size, canvas_length=cfg.canvas_length,
                       max_model_len=config.max_model_len, api_key=api_key, created=int(time.time()),
                       max_denoising_steps=max_denoising_steps, regex_timeout=regex_timeout, loras=loras,
                       lora_updates=lora_updates, hidden_size=cfg.hidden_size, vision=vision)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS has free on `host` now (IPv4 or IPv6, as the host is)."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn in a daemon thread: `with BackgroundServer(state) as srv: srv.base_url ...`."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int | None = None,
                 shutdown_engine: bool = True):
        import uvicorn

        self.state, self.host, self.port = state, host, port or free_port(host)
        self.shutdown_engine = shutdown_engine
        cfg = uvicorn.Config(build_app(state), host=host, port=self.port, log_level="warning",
                             timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, name="canvaslm-http", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.base_url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.shutdown_engine:  # first, so requests under way get their 503 before the connections close
            self.state.engine.shutdown(timeout=0)
        self.server.should_exit = True
        self.thread.join(10)
        if self.shutdown_engine:
            self.state.shutdown()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
