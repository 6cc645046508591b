"""Per-request state for the engine: plain data that the scheduler advances one step at a time.

A request moves WAITING -> PREFILLING -> DENOISING (denoise steps -> commit -> next canvas ...) and
ends FINISHED, or CANCELLED from any state. Tensors (KV rows, the canvas, sc_logits) live in the
runner, keyed by `request_id` / `slot`; this module imports only the standard library so that the
scheduler can be tested on CPU with fake requests.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued: holds no slot and no KV
    PREFILLING = "prefilling"  # admitted: the prompt is being encoded, chunk by chunk
    DENOISING = "denoising"  # a canvas is being refined, or waits for its commit
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(eq=False)  # identity semantics: two requests are never "equal" by value
class RequestState:
    """One generation request. The first nine fields come from the caller; the rest the scheduler owns."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    canvas_length: int
    max_denoising_steps: int
    priority: int = 0  # lower is served first; ties (and aging) fall back to arrival order
    lora: int = 0  # served LoRA adapter id (0: the base model); KV is shared only within one adapter
    max_time: float | None = None  # latency budget in seconds from the first denoising step (None: none)
    # multimodal.ImageInputs (duck-typed: `spans`, `prompt_key`): no chunk cuts an image, and prefix caching
    # matches image positions by image, not by the placeholder id
    images: object | None = None

    # --- owned by the scheduler ---
    arrival: int = -1  # position in the order of `Scheduler.add` calls
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None  # KV-cache batch slot while admitted
    kv_reserved: int = 0  # KV tokens reserved at admission, released at finish/cancel
    prefilled_len: int = 0  # prompt tokens already encoded
    canvas_index: int = 0  # index of the canvas being denoised == number of committed canvases
    denoise_step: int = 0  # denoising steps already run on the current canvas
    canvas_ready: bool = False  # converged or out of steps: the next thing to do is commit it
    output_ids: list[int] = field(default_factory=list)  # committed tokens, at most max_new_tokens
    finish_reason: str | None = None  # one of FINISH_REASONS once done
    plans_waited: int = 0  # consecutive plans with work ready but not scheduled (aging)
    cached_len: int = 0  # prompt tokens whose KV was reused from the slot's previous owner (prefix caching)
    denoise_started: float | None = None  # scheduler clock at the plan that first denoised it (max_time)
    out_of_time: bool = False  # max_time is spent: the current canvas is the last

    def __post_init__(self) -> None:
        self.prompt_ids = tuple(self.prompt_ids)
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_ids is empty; expected at least one token (e.g. BOS)")
        for name in ("max_new_tokens", "canvas_length", "max_denoising_steps"):
            value = getattr(self, name)
            least = 0 if name == "max_new_tokens" else 1  # 0: prompt only (encode it, generate nothing)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"request {self.request_id!r}: {name}={value!r}; expected an int >= {least}")

    @functools.cached_property
    def prompt_key(self) -> tuple:
        """The prompt as prefix caching compares it (computed once: the scheduler reads it every plan)."""
        return self.prompt_ids if self.images is None else self.images.prompt_key(self.prompt_ids)

    def reuse_point(self, n: int, chunk: int) -> int:
        """Where reusing the first `n` prompt positions may stop: the last start of a prefill call at or
        before n, as the scheduler cuts this prompt (`chunk` tokens, an image never cut). Reuse then never
        splits an image (whose tokens see each other both ways), and the calls after it are a fresh run's.
        Text prompts' calls start every `chunk` tokens, where `n` already is."""
        if self.images is None or n <= 0:
            return n
        start = 0
        while start < self.prompt_len:
            end = self.prefill_end(start, chunk)
            if end > n:
                break
            start = end
        return start

    def prefill_end(self, start: int, chunk: int) -> int:
        """The end of the prefill call that starts at prompt position `start`: `chunk` tokens on, or the end
        of the image that would cut in two (an image is encoded in one call), or the prompt's end."""
        end = min(self.prompt_len, start + chunk)
        return end if self.images is None else self.images.chunk_end(start, end)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_canvases(self) -> int:
        """Canvases needed to reach max_new_tokens (the last one may be cut short)."""
        return -(-self.max_new_tokens // self.canvas_length)

    @property
    def kv_tokens_needed(self) -> int:
        """Worst-case KV footprint: the prompt plus every canvas, each encoded in full at commit."""
        return self.prompt_len + self.num_canvases * self.canvas_length

    @property
    def canvas_start(self) -> int:
        """Sequence position of the current canvas's first token."""
        return self.prompt_len + self.canvas_index * self.canvas_length

    @property
    def is_done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED)

    @property
    def needs_prefill(self) -> bool:
        return self.status is RequestStatus.PREFILLING and self.prefilled_len < self.prompt_len

    @property
    def needs_commit(self) -> bool:
        return self.status is RequestStatus.DENOISING and self.canvas_ready

    @property
    def needs_denoise(self) -> bool:
        return self.status is RequestStatus.DENOISING and not self.canvas_ready
