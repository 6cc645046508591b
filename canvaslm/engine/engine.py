"""The engine loop: a background thread that drives Scheduler + Runner and streams events to callers.

Callers (the HTTP server, benchmarks) `submit` a `GenerationRequest` with a sink: an asyncio queue
plus its event loop. The engine thread owns the scheduler and the runner exclusively; submissions and
cancellations reach it through an inbox, and events (`Commit`, `Draft`, `Finish`) go back through
`loop.call_soon_threadsafe`, so neither side ever blocks the other. One iteration is one scheduler
plan: reset freed slots, encode, denoise, update (see `scheduler` for the contract).

The engine also keeps the plain counters the /metrics endpoint reports (throughput over a sliding
window, time to first token, tokens per forward).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import torch

from ..config import DiffusionParams
from ..generate import check_request
from ..sampling.samplers import checked_impl
from .request import RequestState
from .runner import Runner
from .scheduler import Scheduler, StepResult

log = logging.getLogger("canvaslm.engine")

LATE_STOP_S = 1.0  # how long a "length" end of a request with stop strings waits for the caller's stop-cancel
MAX_FAILED_ITERATIONS = 3  # loop iterations failing in a row (outside a step) before the engine thread gives up
SHUTTING_DOWN = "the server is shutting down"
ENGINE_DOWN = "the engine thread is not running"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def kv_dtype(config: "EngineConfig", model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KV cache stores: the model's unless the config asks for a narrower one."""
    return KV_CACHE_DTYPES[config.kv_cache_dtype] or model_dtype


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # rows per encoder call and per decoder call
    # KV positions per slot: prompt + whole canvases. None: the model's whole context where the KV cache for
    # every slot fits the memory left (`plan_max_model_len`), else the most that fits
    max_model_len: int | None = 2048
    num_slots: int | None = None  # admitted requests at once (default: max_batch)
    prefill_chunk: int = 512  # prompt tokens encoded per request per step
    kv_budget_tokens: int | None = None  # admission budget (default: num_slots * max_model_len)
    max_wait_plans: int = 16  # scheduler aging: no request waits longer than this many plans
    # a new request reuses the KV of a prompt prefix another request encoded; None: on where its memory
    # fits (`prefix_caching_fits`)
    prefix_caching: bool | None = None
    # canvas constraints' host work (masks, commit passes) on a worker thread while the other requests
    # step; False runs it on the engine thread, as a blocking part of the step; None: on where the model is
    # on a GPU (Runner's host_worker)
    constraint_worker: bool | None = None
    # prefix caching's store of sliding-layer K/V, in positions: how far behind the last position written
    # a prefix can still be reused (kv_cache); None: `prefix_store_len`'s default
    prefix_store_len: int | None = None
    # what the KV cache stores K and V in: "auto" (the model's dtype) or "fp8" (float8_e4m3fn, half of
    # bf16's memory, so twice the context; rounds K and V to 3 mantissa bits: kv_cache)
    kv_cache_dtype: str = "auto"
    # vLLM's --gpu-memory-utilization: the share of the device (of RAM on a CPU) the process may use, the
    # weights included; what is left of it, less 2 GiB for activations, is the KV cache's (kv_budget).
    # None: the free memory less a reserve of max(2 GiB, a tenth of the device)
    memory_utilization: float | None = None
    # how each denoising step draws its samples (samplers.SAMPLER_IMPLS): "auto" (fused on CUDA, one uniform
    # per position by inverse CDF elsewhere) or "reference" (torch.multinomial: `transformers`' tokens for
    # the same seed, the draw costing V exponentials per position)
    sampler_impl: str = "auto"

    def __post_init__(self):
        checked_impl(self.sampler_impl, "EngineConfig.sampler_impl")
        if self.memory_utilization is not None and not 0 < self.memory_utilization <= 1:
            raise ValueError(f"EngineConfig.memory_utilization={self.memory_utilization!r}; expected a share in "
                             "(0, 1], e.g. 0.9")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"EngineConfig.kv_cache_dtype={self.kv_cache_dtype!r}; expected one of "
                             f"{sorted(KV_CACHE_DTYPES)}")
        for name in ("max_batch", "prefill_chunk", "max_wait_plans"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r}; expected an int >= 1")
        for name in ("max_model_len", "num_slots", "kv_budget_tokens", "prefix_store_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name}={value!r}; expected None or an int >= 1")

    @property
    def slots(self) -> int:
        return self.num_slots or self.max_batch

    @property
    def kv_budget(self) -> int:
        return self.kv_budget_tokens or self.slots * self.max_model_len


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: DiffusionParams  # resolved: max_new_tokens, steps, temperatures, bounds
    seed: int
    eos_ids: tuple[int, ...]  # the first of these in a committed canvas ends the request
    constraint: object | None = None  # sampling.constraints.CanvasConstraint
    drafts: bool = False  # emit a Draft after every denoising step
    logit_bias: tuple = ()  # ((token id, bias), ...): sampling.logit_bias
    priority: int = 0  # lower is admitted and scheduled first (scheduler aging still bounds every wait)
    min_tokens: int = 0  # no EOS / stop id before this many output tokens
    lora: int = 0  # served LoRA adapter id (lora_serving.MultiLoRA.ids), 0: the base model
    prompt_only: bool = False  # encode the prompt into a slot (kept for prefix reuse), generate nothing
    images: object | None = None  # multimodal.ImageInputs: soft tokens for the prompt's image positions
    thinking: object | None = None  # sampling.thinking.ThinkingBudget: most tokens in the reply's thought
    follows: bool = False  # continues an earlier request's reply (a thought-first reply's answer): /metrics counts
    # the reply once, by its first request (finish reason, prompt tokens, time to first token)
    stops_late: bool = False  # the caller has stop strings: it may relabel a "length" end "stop" (cancel(id,
    # "stop")) once it reads the last canvas; /metrics counts such an end when that is settled (counters only rise)

    @classmethod
    def from_row(cls, request_id: str, row, seed: int, drafts: bool = False) -> "GenerationRequest":
        """The engine request for an `LLM.rows` row (generate.RowRequest)."""
        return cls(request_id, tuple(row.prompt_ids), row.params, seed, row.eos_ids, row.constraint, drafts=drafts,
                   logit_bias=row.logit_bias, min_tokens=row.min_tokens, lora=row.lora, images=row.images,
                   thinking=row.thinking)


@dataclass(frozen=True)
class Commit:
    request_id: str
    canvas_index: int
    token_ids: tuple[int, ...]  # tokens this commit added to the output (EOS included, budget applied)
    decoder_passes: int = 0  # the request's denoising passes up to and including this canvas's


@dataclass(frozen=True)
class Draft:
    request_id: str
    canvas_index: int
    denoise_step: int
    token_ids: tuple[int, ...]  # the current argmax canvas


@dataclass(frozen=True)
class Finish:
    request_id: str
    reason: str  # 'stop' | 'length' | 'cancelled' | 'error'
    num_tokens: int
    decoder_passes: int
    message: str | None = None  # for 'error'
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prompt_seconds: float = 0.0  # from submission to the end of the step that finished encoding the prompt
    seconds: float = 0.0  # from submission to the end


@dataclass
class _Sink:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    submitted: float
    emitted: int = 0  # output tokens already sent
    first_token: float | None = None
    encoded: float | None = None  # when the prompt was encoded (the end of that step)
    follows: bool = False  # GenerationRequest.follows: not a reply of its own in the per-request counters
    stops_late: bool = False  # GenerationRequest.stops_late

    def put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the caller's loop is gone; nobody is listening
            pass


class EngineClosed(RuntimeError):
    """`Engine.call` on an engine that is shut down or whose thread has stopped (raised at once, or set on
    the future of a call the thread never ran); `reason` says which (SHUTTING_DOWN or ENGINE_DOWN). A
    server answers it with a 503, as it does a generation the engine refuses."""

    def __init__(self, reason: str):
        super().__init__(f"the engine is shut down ({reason})")
        self.reason = reason


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _failed(plan, message: str) -> StepResult:
    """The result of a step that failed: every request in it ends with `message`."""
    return StepResult(errors={rid: message for rid in plan.request_ids})


class EngineStats:
    """Counters read by /metrics (plain ints and floats: written by the engine thread only)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self.steps = 0  # engine iterations (plans)
        self.denoise_rows = 0  # denoising steps summed over requests
        self.tokens = 0  # committed output tokens
        self.requests_finished = collections.Counter()  # reason -> count
        self.out_of_time = 0  # finished requests whose max_time ended their generation
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.tpf_sum = 0.0  # tokens per forward, summed over finished requests
        self.tpf_count = 0
        self.prompt_tokens = 0  # prompt tokens of finished requests
        self.cached_prompt_tokens = 0  # ... of which the prefix cache supplied the KV
        self._recent = collections.deque()  # (time, denoise_rows, tokens)

    def record_step(self, now: float, denoise_rows: int, tokens: int) -> None:
        self.steps += 1
        self.denoise_rows += denoise_rows
        self.tokens += tokens
        self._recent.append((now, denoise_rows, tokens))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def record_ttft(self, seconds: float) -> None:
        self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """(denoising steps/s, tokens/s) over the last window."""
        now = time.perf_counter() if now is None else now
        recent = [r for r in list(self._recent) if r[0] >= now - self.window_s]
        if not recent:
            return 0.0, 0.0
        return sum(r[1] for r in recent) / self.window_s, sum(r[2] for r in recent) / self.window_s


GIB = 1 << 30


def device_memory(device) -> tuple[int, int] | None:
    """(free, total) bytes of the device's memory: the GPU's, or this machine's available RAM for the CPU
    (Linux /proc/meminfo); None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type != "cpu":
        return None
    try:
        info = {k: int(v.split()[0]) * 1024 for k, v in
                (line.split(":", 1) for line in open("/proc/meminfo", encoding="ascii") if ":" in line)}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError):
        return None


def _reserve(total: int) -> int:
    """Bytes kept free for activations and the rest of the process beside the KV cache."""
    return max(2 * GIB, total // 10)


def kv_budget(free: int, total: int, utilization: float | None) -> tuple[int, str]:
    """(bytes the KV cache and prefix store may take, how that was decided). Without a utilization: the
    free memory less the reserve. With one (vLLM's --gpu-memory-utilization): that share of the device
    for the whole process, so what is in use already (the weights) counts against it, less 2 GiB for
    activations."""
    if utilization is None:
        return free - _reserve(total), (f"{free / GIB:.1f} GiB are free and {_reserve(total) / GIB:.1f} GiB stay "
                                         "for activations")
    used = total - free
    return int(utilization * total) - used - 2 * GIB, (
        f"--gpu-memory-utilization {utilization} allows {utilization * total / GIB:.1f} GiB, of which "
        f"{used / GIB:.1f} GiB are in use and 2.0 GiB stay for activations")


AGENT_CONTEXT = 65536  # the context floor agent frameworks check (Hermes Agent: 64k)


def prefix_store_len(cfg, config: EngineConfig) -> int:
    """The prefix store's length in positions (kv_cache): config.prefix_store_len, or by default the
    sliding ring plus one prefill chunk plus 4 canvases, so a prompt is reused behind a reply of up to 4
    canvases (a multi-turn chat's previous turn)."""
    return config.prefix_store_len or cfg.sliding_window - 1 + config.prefill_chunk + 4 * cfg.canvas_length


def _bytes(cfg, config: EngineConfig, n: int, dtype, with_store: bool) -> int:
    from ..kv_cache import KVCache

    cache, store = KVCache.planned_bytes(cfg, config.slots + 1, n, dtype, prefix_store_len(cfg, config))
    return cache + (store if with_store else 0)


def _largest_fitting(cfg, config: EngineConfig, dtype, budget: int, with_store: bool) -> int:
    """The largest max_model_len (a multiple of the canvas, at most the model's limit) whose KV cache for
    every slot (and prefix store, with_store) fits `budget` bytes; 0 if none does."""
    C = cfg.canvas_length
    lo, hi = 0, cfg.max_position_embeddings // C  # in canvases; the bytes grow with it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _bytes(cfg, config, mid * C, dtype, with_store) <= budget else (lo, mid - 1)
    return lo * C


def plan_max_model_len(cfg, config: EngineConfig, device, dtype, free_total=None) -> tuple[int, str]:
    """(max_model_len, why) for an engine of this config. Asked for None: the model's whole context
    (max_position_embeddings, what agent frameworks check) where the KV cache of every slot fits the
    free memory less a reserve for activations (the larger of 2 GiB and a tenth of the device), else the
    largest multiple of the canvas that fits. Unless prefix caching is off, its store counts too as long
    as the context left still reaches the whole context or AGENT_CONTEXT; past that the context wins. A
    given value is kept, or refused when it is over the model's limit or its cache does not fit, with
    the value that would. `free_total` = (free, total) bytes overrides the query (tests); memory that
    cannot be read is not checked."""
    limit, asked, slots, C = cfg.max_position_embeddings, config.max_model_len, config.slots, cfg.canvas_length
    if asked is not None and asked > limit:
        raise ValueError(f"max_model_len={asked} is over the model's max_position_embeddings={limit}")
    free_total = free_total if free_total is not None else device_memory(device)
    want = limit if asked is None else asked
    if free_total is None:
        return want, "memory not checked"
    free, total = free_total
    budget, where = kv_budget(free, total, config.memory_utilization)
    if budget <= 0:  # no --max-batch or --max-model-len can help: what is in use leaves no room for any KV cache
        raise ValueError(_no_room(free, total, config.memory_utilization, device))
    cache = _bytes(cfg, config, want, dtype, with_store=False)
    if asked is None and config.prefix_caching is not False:
        both = _bytes(cfg, config, want, dtype, with_store=True)
        if both <= budget:
            return want, (f"the model's whole context; its KV cache and prefix store for {slots} slots take "
                          f"{both / GIB:.1f} GiB of {free / GIB:.1f} GiB free")
        fits = _largest_fitting(cfg, config, dtype, budget, with_store=True)
        if fits >= min(limit, AGENT_CONTEXT):
            return fits, (f"the model's context is {limit} positions, but their KV cache and prefix store for "
                          f"{slots} slots would take {both / GIB:.1f} GiB, while {where}; {fits} fit with "
                          "prefix caching (lower --max-batch for more)")
    if cache <= budget:
        whole = "the model's whole context; " if asked is None else ""
        return want, f"{whole}its KV cache for {slots} slots takes {cache / GIB:.1f} GiB of {free / GIB:.1f} GiB free"
    fits = _largest_fitting(cfg, config, dtype, budget, with_store=False)
    if asked is not None or fits <= C:
        raise ValueError(f"max_model_len={want} needs {cache / GIB:.1f} GiB of KV cache for {slots} slots, but "
                         f"{where}: " + (f"at most {fits} fits; lower --max-model-len or --max-batch"
                                         if fits > C else "lower --max-batch"))
    return fits, (f"the model's context is {limit} positions, but their KV cache for {slots} slots would take "
                  f"{cache / GIB:.1f} GiB, while {where}; {fits} fit (lower --max-batch for more)")


def _no_room(free: int, total: int, utilization: float | None, device) -> str:
    """Why there is no KV cache at all (kv_budget <= 0), and what can help: the weights smaller, a larger share
    of the device, a bigger one."""
    used, gpu = total - free, str(device).startswith("cuda")
    if utilization is not None:
        why = (f"{used / GIB:.1f} GiB in use (the weights and the runtime) and 2.0 GiB kept for activations "
               f"leave nothing of the {utilization * total / GIB:.1f} GiB --gpu-memory-utilization {utilization} "
               "allows")
        raise_it = "raise --gpu-memory-utilization, "
    else:
        why = (f"{used / GIB:.1f} GiB in use (the weights and the runtime) and {_reserve(total) / GIB:.1f} GiB "
               f"kept for activations leave nothing of the {'GPU' if gpu else 'device'}'s {total / GIB:.1f} GiB")
        raise_it = ("set --gpu-memory-utilization 0.95 (a smaller reserve), "
                    if kv_budget(free, total, 0.95)[0] > 0 else "")
    return (f"no room for a KV cache: {why}; {raise_it}load the weights with --quantization int4 or fp8, or use "
            f"{'a bigger GPU' if gpu else 'a device with more memory'}")


def prefix_caching_fits(cfg, config: EngineConfig, device, dtype, free_total=None) -> tuple[bool, str]:
    """(whether to cache prefixes, why) when the config leaves it to the engine. The cost is the prefix
    store: a longer ring of the sliding layers' K/V per slot (`prefix_store_len`, kv_cache). It must
    leave the reserve for activations (`plan_max_model_len`) after the whole cache; memory that cannot be
    read is not checked. `free_total` = (free, total) bytes overrides the query (tests)."""
    from ..kv_cache import KVCache

    cache, store = KVCache.planned_bytes(cfg, config.slots + 1, config.max_model_len, dtype,
                                         prefix_store_len(cfg, config))
    free_total = free_total if free_total is not None else device_memory(device)
    if free_total is None:
        return True, "memory not checked"
    budget, where = kv_budget(*free_total, config.memory_utilization)
    if cache + store <= budget:
        return True, f"the prefix store ({store / GIB:.1f} GiB) fits"
    shorter = _largest_fitting(cfg, config, dtype, budget, with_store=True)
    hint = (f"--max-model-len {shorter} leaves room for it" if shorter > cfg.canvas_length
            else "lower --max-model-len or --max-batch")
    return False, (f"the prefix store ({store / GIB:.1f} GiB) does not fit: the KV cache takes {cache / GIB:.1f} GiB "
                   f"while {where}; {hint}, or force it with --enable-prefix-caching")


class Engine:
    def __init__(self, model, config: EngineConfig, history_depth: int = 1):
        cfg = model.cfg
        device, model_dtype = model.embed_weight.device, model.embed_weight.dtype
        dtype = kv_dtype(config, model_dtype)  # what the memory plan counts per KV element
        self.notes: list[str] = []  # the memory decisions made here, for a server to print
        if dtype != model_dtype:
            self.notes.append(f"KV cache in {str(dtype).removeprefix('torch.')} (--kv-cache-dtype "
                              f"{config.kv_cache_dtype}), read back as {str(model_dtype).removeprefix('torch.')}")
        length, why = plan_max_model_len(cfg, config, device, dtype)  # raises when it cannot fit
        if config.max_model_len is None:
            config = dataclasses.replace(config, max_model_len=length)
            self.notes.append(f"max_model_len {length}: {why}")
        self.config, self.canvas_length = config, cfg.canvas_length
        self.prefix_caching = config.prefix_caching
        if self.prefix_caching is None:
            self.prefix_caching, why = prefix_caching_fits(cfg, config, device, dtype)
            self.notes.append(f"prefix caching {'on' if self.prefix_caching else 'off'}: {why}")
        for note in self.notes:
            log.info("%s", note)
        store_len = prefix_store_len(cfg, config)
        ring = min(cfg.sliding_window - 1, config.max_model_len)
        if self.prefix_caching and store_len < min(config.max_model_len, ring + config.prefill_chunk):
            raise ValueError(f"EngineConfig.prefix_store_len={store_len} must hold the sliding ring ({ring}) plus "
                             f"a prefill chunk ({config.prefill_chunk})")
        self.runner = Runner(model, config.slots, config.max_model_len, history_depth=history_depth,
                             prefix_caching=self.prefix_caching, host_worker=config.constraint_worker,
                             prefix_store_len=store_len, kv_dtype=dtype, sampler_impl=config.sampler_impl)
        self.scheduler = Scheduler(config.max_batch, config.kv_budget, config.slots, config.prefill_chunk,
                                   cfg.canvas_length, max_wait_plans=config.max_wait_plans,
                                   prefix_caching=self.prefix_caching, prefix_store=self.runner.cache.bounded_store())
        self.stats = EngineStats()
        self._sinks: dict[str, _Sink] = {}
        self._length_ends: dict[str, float] = {}  # "length" ends of stops_late requests, not yet counted: when
        self._inbox: collections.deque = collections.deque()
        # guards the inbox against the thread's last drain: once closed, `_closed` says why requests are refused
        self._inbox_lock = threading.Lock()
        self._closed: str | None = None
        self._plan = None  # the plan of the iteration under way, failed as a whole if the iteration raises
        self._wake = threading.Event()
        self.runner.on_host_done = self._wake.set  # a constraint's host work ended: plan again
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="canvaslm-engine", daemon=True)

    # ------------------------------------------------------------------ caller side (any thread)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        """Queue a request; its events arrive on `queue` (filled on `loop`), ending with a Finish. An engine
        that is shut down or whose thread has stopped ends it at once, "cancelled" with the reason (a server
        answers 503), so no caller waits on a thread that will never answer."""
        sink = _Sink(queue, loop, time.perf_counter())
        refused = self._enqueue(("add", request, sink))
        if refused is not None:
            sink.put(Finish(request.request_id, "cancelled", 0, 0, refused))

    def _enqueue(self, item) -> str | None:
        """Put `item` in the inbox, or return why the engine takes no more work."""
        with self._inbox_lock:  # the thread's last drain takes this lock: nothing lands after it
            refused = self._closed or (SHUTTING_DOWN if self._stopping and not self._thread.is_alive() else None)
            if refused is None:
                self._inbox.append(item)
        if refused is None:
            self._wake.set()
        return refused

    async def run(self, request: GenerationRequest, on_draft=None) -> tuple[list[int], "Finish"]:
        """Submit `request` from a running event loop and wait for its end: (output token ids, Finish).
        on_draft(Draft) sees each draft of a request that asked for them."""
        queue: asyncio.Queue = asyncio.Queue()
        self.submit(request, queue, asyncio.get_running_loop())
        tokens: list[int] = []
        while not isinstance(ev := await queue.get(), Finish):
            if isinstance(ev, Commit):
                tokens += ev.token_ids
            elif isinstance(ev, Draft) and on_draft is not None:
                on_draft(ev)
        return tokens, ev

    def call(self, fn) -> "concurrent.futures.Future":
        """Run fn(model) on the engine thread between two steps (the model is never used by two threads at
        once); the future holds its result or its exception. For short side work: scoring candidates.
        EngineClosed, raised here or on the future, once the engine takes no more work."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        refused = SHUTTING_DOWN if self._stopping else self._enqueue(("call", fn, fut))
        if refused is not None:
            raise EngineClosed(refused)
        return fut

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        """Cancel a request in any state (no-op once finished); frees its slot at the next step. reason "stop":
        the caller found a stop string in its output, so it ends as a finished reply (its Finish and /metrics
        say "stop" and count its prompt, cached tokens and decoder passes), not as a cancelled one."""
        self._inbox.append(("cancel", request_id, reason))
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        failure = None
        try:
            self._loop()
        except BaseException as e:  # the last resort: no caller may wait on a thread that is gone
            failure = e
            log.exception("the engine thread failed; its requests end with an error and new ones are refused")
        finally:
            if failure is None:
                self._close("cancelled", SHUTTING_DOWN, SHUTTING_DOWN)
            else:
                self._close("error", f"the engine thread failed: {_describe(failure)}", ENGINE_DOWN)

    def _loop(self) -> None:
        failures = 0  # iterations failed in a row
        while not self._stopping:
            try:
                self._iterate()
                failures = 0
            except Exception as e:  # a bug in the bookkeeping: fail the requests it touched, keep serving
                failures += 1
                log.exception("engine iteration failed (%d in a row)", failures)
                if failures >= MAX_FAILED_ITERATIONS:
                    raise
                self._recover(_describe(e))

    def _iterate(self) -> None:
        self._plan = None
        self._wake.clear()  # before draining, so a later submit always wakes the wait below
        self._drain_inbox()
        if self._length_ends:
            self._settle_length_ends(time.perf_counter())
        plan = self._plan = self.scheduler.plan(hold=self.runner.held())
        self._report(self.scheduler.take_done())  # prompt-only requests that found their prompt cached
        if plan is None:
            self._wake.wait(0.5)
            return
        try:
            out = self.runner.execute(plan)
            result, drafts = out.result, out.drafts
        except Exception as e:  # a bug or an out-of-memory: fail this step's requests, keep serving
            log.exception("engine step %d failed", plan.step_id)
            result, drafts = _failed(plan, _describe(e)), ()
        finished = self.scheduler.update(plan, result)
        self._emit(plan, result, drafts, finished)

    def _recover(self, message: str) -> None:
        """After an iteration raised: its plan's requests end with an error, as after a failed step, and so
        does any listener whose request the scheduler no longer holds (its Finish was lost)."""
        plan, self._plan = self._plan, None
        if plan is not None:
            result = _failed(plan, message)
            try:  # the plan still in flight (update never ran, or refused the runner's result): fail it there
                self._report(self.scheduler.update(plan, result), result.errors)
            except ValueError:  # update ran part way: whatever it left running is cancelled
                for rid in plan.request_ids:
                    self.scheduler.cancel(rid)
        for rid in [r for r in self._sinks if self.scheduler.get(r) is None]:
            self._end(rid, "error", message)

    def _close(self, reason: str, message: str, refusal: str) -> None:
        """The thread's end: every listener gets its Finish (reason, message), and what is queued or
        submitted from now on is refused with `refusal`."""
        with self._inbox_lock:
            self._closed = refusal
            late, self._inbox = self._inbox, collections.deque()
        try:
            self.runner.close()
            self._settle_length_ends(0.0, wait=float("-inf"))
        except Exception:  # noqa: BLE001 - the listeners below must hear the end regardless
            log.exception("closing the runner failed")
        for rid in list(self._sinks):
            self._end(rid, reason, message)
        for op, arg, sink in late:  # what arrived too late: calls fail, requests end cancelled
            if op == "call" and sink.set_running_or_notify_cancel():
                sink.set_exception(EngineClosed(refusal))
            elif op == "add":
                sink.put(Finish(arg.request_id, "cancelled", 0, 0, refusal))

    def _end(self, rid: str, reason: str, message: str) -> None:
        """`_finish`, or where the runner's bookkeeping raises too, at least the listener's Finish."""
        try:
            self._finish(rid, reason, 0, message)
        except Exception:  # noqa: BLE001 - a broken runner must not leave the caller waiting
            log.exception("ending request %s failed", rid)
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                sink.put(Finish(rid, reason, 0, 0, message))

    def _drain_inbox(self) -> None:
        while self._inbox:
            op, arg, sink = self._inbox.popleft()
            if op == "add":
                self._add(arg, sink)
            elif op == "call":
                if sink.set_running_or_notify_cancel():
                    try:
                        sink.set_result(arg(self.runner.model))
                    except Exception as e:  # noqa: BLE001 - the caller gets it
                        sink.set_exception(e)
            elif arg in self._sinks:
                state = self.scheduler.cancel(arg)
                if sink == "stop" and state is not None:  # here `sink` holds the reason
                    state.finish_reason = "stop"
                    self._report([state])
                else:
                    self._finish(arg, "cancelled", 0)
            elif sink == "stop" and self._length_ends.pop(arg, None) is not None:  # its last canvas held the stop
                self.stats.requests_finished["stop"] += 1

    def _settle_length_ends(self, now: float, wait: float = LATE_STOP_S) -> None:
        """Count as "length" the ends no stop-cancel has relabelled within `wait` seconds."""
        for rid in [r for r, at in self._length_ends.items() if now - at >= wait]:
            del self._length_ends[rid]
            self.stats.requests_finished["length"] += 1

    def _add(self, req: GenerationRequest, sink: _Sink) -> None:
        p, sink.follows, sink.stops_late = req.params, req.follows, req.stops_late
        rid = req.request_id
        if rid in self._sinks or self.scheduler.get(rid) is not None:  # the running one is left alone
            self.stats.requests_finished["error"] += 1
            sink.put(Finish(rid, "error", 0, 0, f"request id {rid!r} is already running"))
            return
        try:
            self._check_images(req)
            check_request(req.prompt_ids, 0 if req.prompt_only else p.max_new_tokens, self.runner.model.cfg.vocab_size,
                          self.config.max_model_len, self.canvas_length, "max_model_len")
            state = RequestState(req.request_id, req.prompt_ids, 0 if req.prompt_only else p.max_new_tokens,
                                 self.canvas_length, p.max_denoising_steps, priority=req.priority, lora=req.lora,
                                 max_time=p.max_time, images=req.images)
            self.runner.add(req.request_id, p, req.seed, req.eos_ids, req.constraint, req.drafts, req.logit_bias,
                            req.min_tokens, req.lora, prompt_ids=req.prompt_ids, images=req.images,
                            thinking=req.thinking)
            self._sinks[req.request_id] = sink
            self.scheduler.add(state)
        except Exception as e:  # noqa: BLE001 - a request the engine cannot take fails alone; the engine goes on
            self._sinks[req.request_id] = sink
            self._finish(req.request_id, "error", 0, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")

    def image_problem(self, spans) -> str | None:
        """Why this engine cannot take a prompt's images, or None; spans: each image's (start, end) in the
        prompt (multimodal.ImageInputs.spans; known before the vision tower runs), or None for no image. A
        prefill call that holds an image runs past `prefill_chunk` to the image's end, and a bounded prefix
        store must still hold the sliding ring plus that whole call, or the call's writes would collide in it."""
        bounded = self.runner.cache.bounded_store() if self.prefix_caching else None
        if not spans or bounded is None:
            return None
        ring, store = bounded
        room = store - ring - self.config.prefill_chunk  # the most soft tokens one image may have here
        longest = max(b - a for a, b in spans)
        if longest <= room:
            return None
        return (f"an image of {longest} soft tokens is over the {max(room, 0)} this server's prefix store has room "
                f"for ({store} positions: the sliding ring, a prefill chunk of {self.config.prefill_chunk} and the "
                "image; --prefix-store-len); send a smaller image budget (mm_processor_kwargs.max_soft_tokens)")

    def _check_images(self, req: GenerationRequest) -> None:
        problem = self.image_problem(None if req.images is None else req.images.spans)
        if problem is not None:
            raise ValueError(problem)

    def _emit(self, plan, result: StepResult, drafts, finished) -> None:
        now = time.perf_counter()
        tokens = 0
        done = {f.request_id: f for f in finished}
        for item in (*plan.encode, *plan.denoise):
            sink = self._sinks.get(item.request_id)
            if sink is None or sink.encoded is not None:
                continue
            state = done.get(item.request_id) or self.scheduler.get(item.request_id)
            if state is not None and state.prefilled_len >= state.prompt_len:
                sink.encoded = now
        for item in plan.encode:
            rid = item.request_id
            sink = self._sinks.get(rid)
            state = done.get(rid) or self.scheduler.get(rid)
            if item.kind != "commit" or sink is None or state is None or rid not in result.committed:
                continue
            new = tuple(state.output_ids[sink.emitted:])
            sink.emitted += len(new)
            tokens += len(new)
            if sink.first_token is None and new:
                sink.first_token = now
                if not sink.follows:
                    self.stats.record_ttft(now - sink.submitted)
            # a request that goes on has already moved to its next canvas
            sink.put(Commit(rid, state.canvas_index - (rid not in done), new, self.runner.decoder_passes(rid)))
        for d in drafts:
            sink = self._sinks.get(d.request_id)
            if sink is not None:
                sink.put(Draft(d.request_id, d.canvas_index, d.denoise_step, d.token_ids))
        self.stats.record_step(now, len(plan.denoise), tokens)
        self._report(finished, result.errors)

    def _report(self, finished, errors=None) -> None:
        for state in finished:
            sink = self._sinks.get(state.request_id)
            if sink is None or not sink.follows:
                self.stats.prompt_tokens += state.prompt_len
                self.stats.out_of_time += state.out_of_time
                self.stats.cached_prompt_tokens += state.cached_len
            self._finish(state.request_id, state.finish_reason, len(state.output_ids),
                         (errors or {}).get(state.request_id), state.cached_len)

    def _finish(self, rid: str, reason: str, num_tokens: int, message: str | None = None, cached: int = 0) -> None:
        passes = self.runner.decoder_passes(rid)
        self.runner.remove(rid)
        sink = self._sinks.pop(rid, None)
        counted = sink is None or not sink.follows  # a follow-up's reply was counted by its first request
        if counted and reason == "length" and sink is not None and sink.stops_late:
            self._length_ends[rid] = time.perf_counter()  # a stop string in its last canvas may relabel it
        elif counted:
            self.stats.requests_finished[reason] += 1
        if counted and passes and reason in ("stop", "length"):
            self.stats.tpf_sum += num_tokens / passes
            self.stats.tpf_count += 1
        if sink is not None:
            now = time.perf_counter()
            encoded = sink.submitted if sink.encoded is None else sink.encoded
            sink.put(Finish(rid, reason, num_tokens, passes, message, cached, encoded - sink.submitted,
                            now - sink.submitted))
