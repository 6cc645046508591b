"""`canvaslm chat [MODEL_DIR]`: a multi-turn chat in the terminal (or over a pipe), like llama.cpp's
conversation mode.

Each line read is a user turn; the reply is generated for the whole conversation through the
checkpoint's chat template (`LLM.chat`), printed, and kept in the history. Commands: `/reset` starts
a new conversation, `/system TEXT` sets the system message (and resets), `/exit` (or end of input)
quits. Turn i of a session draws from seed `--seed + i`, so a session piped from a file is
reproducible. On a terminal, `--drafts` shows the canvas being denoised on one status line, step by
step. A turn that fails (e.g. the conversation outgrew the model's context) prints the error and is
dropped from the history; the session goes on.
"""

from __future__ import annotations

import sys

HELP = "/reset: new conversation   /system TEXT: set the system message   /exit: quit"


def add_parser(subparsers) -> None:
    from .cli import add_lora_arg, add_model_args

    p = subparsers.add_parser("chat", help="chat with a checkpoint in the terminal (multi-turn)")
    add_model_args(p)
    add_lora_arg(p)
    p.add_argument("--system", default=None, help="system message for the conversation")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
    p.add_argument("--seed", type=int, default=0, help="turn i draws from seed + i (default 0)")
    p.add_argument("--temperature", type=float, default=None, help="scales the temperature schedule")
    from .sampling.cli_args import add_sampling_args
    add_sampling_args(p)
    p.add_argument("--drafts", action="store_true", help="on a terminal, show each denoising step's draft")
    p.set_defaults(func=_chat)


def _chat(args) -> int:
    from .cli import load_llm
    from .generate import GenerationError
    from .llm import SamplingParams
    from .sampling.cli_args import sampling_params

    llm = load_llm(args)
    if llm.tokenizer is None or getattr(llm.tokenizer, "chat_template", None) is None:
        raise ValueError(f"{llm.model_dir} has no chat template, so it cannot chat; use `canvaslm generate`")
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    if tty:
        print(f"canvaslm chat: {llm.model_dir}  ({HELP})", flush=True)
    system, history, turn = args.system, [], 0
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset" or text.startswith("/system"):
            if text.startswith("/system"):
                system = text[len("/system"):].strip() or None
            history = []
            if tty:
                print("(new conversation)", flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]!r}; {HELP}", file=sys.stderr, flush=True)
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
            [{"role": "user", "content": line}]
        params = SamplingParams(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps,
                                seed=args.seed + turn, temperature=args.temperature,
                                lora="lora" if args.lora else None, **sampling_params(args))
        turn += 1
        show = _draft_line(llm) if tty and args.drafts else None
        try:
            reply = llm.chat(messages, params, on_draft=show)
        except (GenerationError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        finally:
            if show is not None:
                print("\r\x1b[K", end="", flush=True)
        print(reply.text, flush=True)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply.text}]
    return 0


def _draft_line(llm):
    """on_draft callback: the current draft of the canvas being denoised, on one overwritten line."""
    import shutil

    width = shutil.get_terminal_size((80, 20)).columns - 1

    def show(k, state) -> None:
        text = llm.decode(state.argmax[0].tolist()).replace("\n", " ")
        print(f"\r\x1b[K[canvas {k}] {text}"[:width], end="", flush=True)

    return show
