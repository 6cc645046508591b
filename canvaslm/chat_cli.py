"""`canvaslm chat [MODEL_DIR]`: a multi-turn chat in the terminal (or over a pipe), like llama.cpp's
conversation mode.

Each line read is a user turn; the reply is generated for the whole conversation through the
checkpoint's chat template, printed, and kept in the history. Commands (a line's first word): `/reset`
starts a new conversation, `/system TEXT` sets the system message (and resets), `/image FILE_OR_URL`
attaches an image to the next message (models with a vision tower), `/exit` (or end of input) quits
(status 0). A line starting with `//` is a message starting with `/` (one slash is dropped).
Ctrl-C during a reply stops it: the turn is left out of the history and the prompt comes back; Ctrl-C at
the prompt (or while the model loads) quits quietly with status 130, the shell's status for Ctrl-C.
A reply's thought channel (canvaslm.reasoning) is kept out of the answer and its history; `--think`
turns thinking mode on and prints each thought to stderr.
Turn i of a session draws from seed `(--seed + i) mod 2**64`, so a session piped from a file is reproducible. On a
terminal, `--drafts` shows the canvas being denoised on one status line, step by step. A turn that fails
(e.g. the conversation outgrew the context) prints the error and is dropped from the history; the
session goes on.

Turns run on one serving engine kept for the session (one slot, prefix caching, the model's whole
context where memory allows), so like llama.cpp's conversation mode a turn does not encode the
conversation again: the previous turn's prompt is reused in whole `--prefill-chunk` chunks and only the
rest, the last reply and the new message are encoded. Reuse changes no token: each reply equals
`LLM.generate_continuous` on the whole conversation with the same context and chunk. `--stats` prints
each turn's prompt tokens, how many came from the cache, decoder passes and seconds.
"""

from __future__ import annotations

import sys

HELP = ("/reset: new conversation   /system TEXT: set the system message   /image FILE_OR_URL: attach an image "
        "to your next message   /exit: quit   //TEXT: send /TEXT   Ctrl-C: stop a reply, or quit at the prompt")
INTERRUPTED = 130  # the exit status of a session quit with Ctrl-C (128 + SIGINT, as a shell reports it)


def add_parser(subparsers) -> None:
    from .cli import add_lora_arg, add_model_args

    p = subparsers.add_parser("chat", help="chat with a checkpoint in the terminal (multi-turn)")
    add_model_args(p, model_optional=False)  # the bundled Sudoku model has no chat template
    add_lora_arg(p)
    p.add_argument("--system", default=None, help="system message for the conversation")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
    p.add_argument("--seed", type=int, default=0, help="turn i draws from (seed + i) mod 2**64 (default 0)")
    p.add_argument("--temperature", type=float, default=None,
                   help="scales the temperature schedule (0: near-greedy, as on the server)")
    from .sampling.cli_args import add_sampling_args
    add_sampling_args(p)
    p.add_argument("--drafts", action="store_true", help="on a terminal, show each denoising step's draft")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens per encoder call; a turn reuses the previous prompt in whole chunks")
    from .cli import add_kv_dtype_arg

    add_kv_dtype_arg(p)
    p.add_argument("--stats", action="store_true", help="after each reply, its token counts and time (stderr)")
    p.add_argument("--think", action="store_true",
                   help="thinking mode (the template's enable_thinking); each thought is printed to stderr")
    p.set_defaults(func=_chat)


class Session:
    """The chat's engine: one slot with prefix caching, kept from turn to turn."""

    def __init__(self, llm, prefill_chunk: int, kv_cache_dtype: str = "auto", think: bool = False):
        from .engine.engine import Engine, EngineConfig
        from .reasoning import ThoughtSplitter

        if prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
        self.llm, self.turns = llm, 0
        self.template_kwargs = {"enable_thinking": True} if think else {}
        self.thoughts = ThoughtSplitter.for_tokenizer(llm.tokenizer)
        self.engine = Engine(llm.model, EngineConfig(max_batch=1, max_model_len=None, prefill_chunk=prefill_chunk,
                                                     prefix_caching=True, kv_cache_dtype=kv_cache_dtype,
                                                     sampler_impl=llm.sampler_impl),
                             history_depth=max(1, llm.defaults.stability_depth)).start()

    def reply(self, messages: list, params, on_draft=None):
        """(reply text, engine Finish, prompt tokens, thought text or None) for the conversation `messages`;
        a thought channel (canvaslm.reasoning) is kept out of the text."""
        import asyncio

        from .engine.engine import GenerationRequest
        from .generate import GenerationError, check_request

        from .multimodal import image_parts_to_placeholders

        llm = self.llm
        messages, images = image_parts_to_placeholders(messages, llm.image_placeholder)
        ids = llm.tokenizer.encode_chat(messages, **self.template_kwargs)
        row = llm.rows([{"prompt_token_ids": ids, "multi_modal_data": {"image": images}} if images else ids],
                       params)[0]
        ids = row.prompt_ids  # images expanded to their soft tokens
        try:
            check_request(ids, row.params.max_new_tokens, llm.cfg.vocab_size, self.engine.config.max_model_len,
                          llm.cfg.canvas_length, "the chat's context, max_model_len")
        except GenerationError as e:
            raise GenerationError(f"{e}; /reset starts over") from None
        self.turns += 1
        req = GenerationRequest.from_row(f"turn{self.turns}", row, params.seed, drafts=on_draft is not None)
        try:
            tokens, fin = asyncio.run(self.engine.run(req, on_draft))
        except KeyboardInterrupt:  # asyncio.run turns Ctrl-C into this once its task is cancelled
            self.engine.cancel(req.request_id)  # the engine ends the request before it takes the next one
            raise
        if fin.reason == "error":
            raise GenerationError(fin.message or "the turn failed")
        # a thought the prompt left open (a generation prompt that opens the channel) is this reply's
        content, thought = self.thoughts.answer(tokens, ids) if self.thoughts is not None else (tokens, None)
        return llm.decode(content), fin, len(ids), thought

    def close(self) -> None:
        self.engine.shutdown()


def _chat(args) -> int:
    from .cli import load_llm

    try:
        llm = load_llm(args)
        if llm.tokenizer is None or getattr(llm.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{llm.model_dir} has no chat template, so it cannot chat; use `canvaslm generate`")
        session = Session(llm, args.prefill_chunk, args.kv_cache_dtype, think=args.think)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return INTERRUPTED
    try:
        return _loop(args, llm, session)
    finally:
        session.close()


def _loop(args, llm, session) -> int:
    import time

    from .cli import _temperature
    from .generate import GenerationError
    from .llm import SamplingParams
    from .sampling.cli_args import sampling_params

    def turn_params(turn: int) -> SamplingParams:
        seed = (args.seed + turn) % 2**64 if 0 <= args.seed < 2**64 else args.seed  # out of range: refused below
        return SamplingParams(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps,
                              seed=seed, temperature=_temperature(args.temperature),
                              lora="lora" if args.lora else None, **sampling_params(args))

    first = turn_params(0).resolve(llm.defaults)  # flags no turn could run with: an error (exit 2), not one per turn
    C, context = llm.cfg.canvas_length, llm.cfg.max_position_embeddings
    span = -(-first.max_new_tokens // C) * C  # whole canvases, after at least a one-token prompt
    if span + 1 > context:
        raise ValueError(f"--max-new-tokens {first.max_new_tokens}: its canvases ({span} positions, {C} each) leave "
                         f"no room for a prompt in the model's {context}-position context")
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    if tty:
        print(f"canvaslm chat: {llm.model_dir}  ({HELP})", flush=True)
    system, history, turn, images = args.system, [], 0, []
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            if tty:
                print(flush=True)  # the shell's prompt starts on a line of its own
            return INTERRUPTED
        text = line.strip()
        if not text:
            continue
        if text.startswith("//"):
            line = line.replace("/", "", 1)  # an escaped slash: a message, not a command
        elif text.startswith("/"):
            command, _, arg = text.replace("\t", " ").partition(" ")
            arg = arg.strip()
            if command in ("/exit", "/quit"):
                break
            if command in ("/reset", "/system"):
                if command == "/system":
                    system = arg or None
                history, images = [], []
                if tty:
                    print("(new conversation)", flush=True)
            elif command == "/image":
                from .cli import _image_arg

                try:
                    images.append(_image_arg(arg, "/image"))
                except SystemExit as e:
                    print(e, file=sys.stderr, flush=True)
                    continue
                if tty:
                    print(f"({len(images)} image(s) go with your next message)", flush=True)
            else:
                print(f"unknown command {command!r}; {HELP}", file=sys.stderr, flush=True)
            continue
        content = [*({"type": "image", "image": im} for im in images), {"type": "text", "text": line}] \
            if images else line
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
            [{"role": "user", "content": content}]
        params = turn_params(turn)
        turn += 1
        show = _draft_line(llm) if tty and args.drafts else None
        t0 = time.perf_counter()
        try:
            text, fin, prompt_len, thought = session.reply(messages, params, on_draft=show)
        except (GenerationError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            images = []  # a failed turn's images go with it (one that does not load would fail every turn)
            continue
        except KeyboardInterrupt:
            print("\n(reply stopped; the turn is left out)", file=sys.stderr, flush=True)
            images = []
            continue
        finally:
            if show is not None:
                print("\r\x1b[K", end="", flush=True)
        if thought:
            print(f"[thinking] {thought}", file=sys.stderr, flush=True)
        print(text, flush=True)
        if args.stats:
            print(f"[{prompt_len} prompt tokens, {fin.cached_tokens} from the cache; {fin.num_tokens} reply tokens, "
                  f"{fin.decoder_passes} decoder passes; {time.perf_counter() - t0:.2f} s]", file=sys.stderr, flush=True)
        history += [{"role": "user", "content": content}, {"role": "assistant", "content": text}]
        images = []
    return 0


def _draft_line(llm):
    """on_draft callback: the current draft of the canvas being denoised (an engine Draft), on one
    overwritten line."""
    import shutil

    width = shutil.get_terminal_size((80, 20)).columns - 1

    def show(draft) -> None:
        text = llm.decode(list(draft.token_ids)).replace("\n", " ")
        print(f"\r\x1b[K[canvas {draft.canvas_index}] {text}"[:width], end="", flush=True)

    return show
