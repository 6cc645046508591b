"""`canvaslm bench`: decoder-step latency, encode latency and tok/s against the memory floor and against
the `transformers` reference, measured in one run on one device with random weights.

Method (as vLLM's published DiffusionGemma figures): a fixed number of denoising steps per canvas (early
stopping disabled: confidence threshold ~0), so tokens per step = canvas / steps. The floor of a decoder
step is the bytes it must read (every weight: a 256-token canvas routes to nearly every expert; the LM
head reads the whole embedding; plus the KV cache) over the device bandwidth measured here with a large
copy. The reference is `DiffusionGemmaForBlockDiffusion` built on the meta device and given *our* weight
tensors (load_state_dict(assign=True)), so it costs no second copy at any shape.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import time
from dataclasses import dataclass

import torch

from .checkpoint import build_random_model, parse_dtype
from .config import DiffusionParams
from .generate import narrowed_sc_logits
from .kv_cache import KVCache
from .sampling.fused import fused_step_from_hidden
from .sampling.samplers import CanvasState, SamplerParams, entropy_bound_step
from .sampling.stopping import new_history
from .shapes import model_config


@dataclass(frozen=True)
class BenchConfig:
    shape: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    fp8: bool = False
    int4: bool = False
    vs_unquantized: bool = False  # with fp8/int4: measure the unquantised model first, in the same run
    prompt_len: int = 512
    new_tokens: int = 512
    steps_per_canvas: int = 16
    batches: tuple = (1, 2, 4, 8)
    reference: tuple = ("eager",)
    canvas_length: int = 256
    sampler: str = "auto"  # fused | cdf | reference | auto (fused on CUDA, cdf elsewhere: the engine's defaults)
    graphs: bool = True  # CUDA graphs for our decoder step (CUDA only)
    seed: int = 0
    threads: int = 0  # CPU threads for torch (0: torch's default)

    def __post_init__(self):
        for name in ("prompt_len", "new_tokens", "steps_per_canvas", "canvas_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"bench: --{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not self.batches or min(self.batches) <= 0:
            raise ValueError(f"bench: --batches must be positive integers, got {self.batches}")
        bad = set(self.reference) - {"eager", "compiled"}
        if bad:
            raise ValueError(f"bench: --reference takes eager,compiled or none; got {sorted(bad)}")
        if self.fp8 and self.int4:
            raise ValueError("bench: --fp8 and --int4 are two different weight formats; pick one")
        if self.vs_unquantized and not (self.fp8 or self.int4):
            raise ValueError("bench: --vs-unquantized compares --fp8 or --int4 weights with unquantised ones; "
                             "give one of them")

    @property
    def quantization(self) -> str | None:
        return "int4" if self.int4 else "fp8" if self.fp8 else None


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int = 3) -> float:
    """Median wall seconds of fn() over `repeats` runs (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_bandwidth(device, nbytes: int | None = None) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write counted)."""
    dev = torch.device(device)
    nbytes = nbytes or ((2 << 30) if dev.type == "cuda" else (256 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    secs = _timed(lambda: dst.copy_(src), dev, repeats=5)
    return 2 * nbytes / secs


def build_bench_model(cfg, device, dtype, seed: int = 0, quantization: str | None = None):
    """Random weights initialised on the device (fast at any shape); FP8 or int4 quantised module by module."""
    model = build_random_model(cfg, materialize=False)
    model = model.to(parse_dtype(dtype)).to_empty(device=device)  # dtype first: no fp32 copy at 26B
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "scale", "per_expert_scale")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)
    from .model.layers import Rotary

    model.rotary = Rotary(cfg).to(device)
    if quantization:
        from .quant import quantize_model

        quantize_model(model, fmt=quantization)
    return model.eval()


class OurModel:
    """Our engine's pieces driven directly: prefill, denoising steps with the fused sampler, commits."""

    def __init__(self, model, bc: BenchConfig, batch: int):
        self.model, self.bc, self.B = model, bc, batch
        cfg = model.cfg
        self.C, self.V = cfg.canvas_length, cfg.vocab_size
        dev = model.embed_weight.device
        self.device = dev
        n_canvases = math.ceil(bc.new_tokens / self.C)
        self.cache = KVCache(cfg, batch, bc.prompt_len + (n_canvases + 1) * self.C, dtype=model.embed_weight.dtype,
                             device=dev)
        self.slots = torch.arange(batch, device=dev)
        fused = bc.sampler == "fused" or (bc.sampler == "auto" and dev.type == "cuda")
        self.fused = fused
        params = DiffusionParams(max_new_tokens=bc.new_tokens, max_denoising_steps=bc.steps_per_canvas,
                                 confidence_threshold=1e-30)  # never confident: exactly N steps per canvas
        self.p = SamplerParams.build([params] * batch, dev)
        self.gens = torch.Generator(device=dev).manual_seed(bc.seed)
        self.graphs = None
        if fused and bc.graphs and dev.type == "cuda":
            from .engine.graphs import StepGraphs

            self.graphs = StepGraphs(self.model, self.cache, buckets=(batch,))

    def prefill(self):
        tokens = torch.randint(0, self.V, (self.B, self.bc.prompt_len), device=self.device, generator=self.gens)
        pos = torch.arange(self.bc.prompt_len, device=self.device).expand(self.B, -1)
        self.model.encode(tokens, pos, self.slots, self.cache, fresh=True)

    def new_canvas(self) -> CanvasState:
        canvas = torch.randint(0, self.V, (self.B, self.C), device=self.device, generator=self.gens)
        return CanvasState(canvas, canvas, None, torch.zeros(self.B, dtype=torch.bool, device=self.device),
                           new_history(self.B, 1, self.C, self.device), self.p.n_steps.clone())

    def step(self, st: CanvasState) -> CanvasState:
        m = self.model
        if not self.fused:
            logits = m.denoise(st.canvas, self.slots, self.cache, sc_logits=st.sc_logits)
            impl = "reference" if self.bc.sampler == "reference" else "cdf"
            st = entropy_bound_step(logits, st, self.p, self.gens, self.V, impl=impl)
            st.sc_logits = narrowed_sc_logits(st.sc_logits, m.embed_weight.dtype)  # float16-safe, as generate
            return st
        seeds = torch.randint(0, 1 << 62, (self.B,), device=self.device, generator=self.gens)
        if self.graphs is not None:
            return self.graphs.run(st, self.p, self.slots, self.cache.lengths.clone(), seeds)
        hidden = m.denoise(st.canvas, self.slots, self.cache, sc_embeds=st.sc_embeds, return_hidden=True)
        return fused_step_from_hidden(hidden, m, st, self.p, seeds, self.V)

    def commit(self, st: CanvasState):
        start = self.cache.lengths.clone()
        self.model.encode(st.argmax, start[:, None] + torch.arange(self.C, device=self.device), self.slots,
                          self.cache)

    def decode(self) -> list[float]:
        """All canvases of the request(s) after the prefill (steps, then the commit's encode); returns
        each canvas's wall seconds."""
        n = math.ceil(self.bc.new_tokens / self.C)
        times = []
        for k in range(n):
            _sync(self.device)
            t0 = time.perf_counter()
            st = self.new_canvas()
            for _ in range(self.bc.steps_per_canvas):
                st = self.step(st)
            self.commit(st)  # the last canvas too: every canvas costs the same
            _sync(self.device)
            times.append(time.perf_counter() - t0)
        return times


@torch.no_grad()
def bench_ours(model, bc: BenchConfig, batch: int, detail: bool) -> dict:
    dev = model.embed_weight.device
    ours = OurModel(model, bc, batch)
    out = {"batch": batch}
    ours.prefill()
    st = ours.new_canvas()
    for _ in range(3):  # warm-up (lazy library init, Triton compiles, CUDA-graph capture)
        st = ours.step(st)
    ours.commit(st)
    ours.prefill()
    if detail:
        out["prefill_s"] = _timed(ours.prefill, dev, repeats=1)
        out["step_s"] = _timed(lambda: ours.step(st), dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ours.step(st)
            _sync(dev)
            out["step_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        snapshot = ours.cache.lengths.clone()
        out["encode_s"] = _timed(lambda: (ours.commit(st), ours.cache.lengths.copy_(snapshot)), dev)
        out["kv_bytes"] = ours.cache.nbytes()
    ours.prefill()
    canvas_s = sorted(ours.decode())
    out["canvas_s"] = canvas_s[(len(canvas_s) - 1) // 2]  # (lower) median canvas: robust to stalls
    out["tok_s"] = batch * ours.C / out["canvas_s"]
    return out


def build_reference(model, device):
    """transformers' DiffusionGemmaForBlockDiffusion holding our weight tensors (no copy). Tensors it has
    beyond ours (rotary tables, a minute vision tower) come from a tiny CPU twin of the same config."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from .checkpoint import _tiny_vision_config

    hf = model.cfg.to_hf_dict()
    text = hf["text_config"]

    def make(text_cfg):
        return DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(
            text_config=text_cfg, vision_config=_tiny_vision_config(), canvas_length=hf["canvas_length"]))

    with torch.device("meta"):
        ref = make(text)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")},
                        strict=False, assign=True)
    twin = make({**text, "vocab_size": 16, "num_experts": 1, "top_k_experts": 1, "moe_intermediate_size": 2,
                 "intermediate_size": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1})
    twin_state = {**dict(twin.named_parameters()), **dict(twin.named_buffers())}
    dtype = model.embed_weight.dtype
    ours = model.state_dict()
    for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
        if t.is_meta:
            shared = name.replace("model.encoder.language_model.", "model.decoder.", 1)  # tied encoder weights
            src = ours[shared] if shared in ours else twin_state[name]
            if tuple(src.shape) != tuple(t.shape):
                raise RuntimeError(f"reference tensor {name}: no source of shape {tuple(t.shape)}")
            mod_path, _, leaf = name.rpartition(".")
            mod = ref.get_submodule(mod_path)
            val = src.detach().to(device=device, dtype=dtype if src.is_floating_point() and "inv_freq" not in leaf
                                  else src.dtype)
            if leaf in mod._parameters:
                mod._parameters[leaf] = torch.nn.Parameter(val, requires_grad=False)
            else:
                mod._buffers[leaf] = val
    # named_parameters() lists a tied tensor once, so the loop above filled the embedding but left
    # lm_head on its meta placeholder (a CPU linear over it reads uninitialised memory: garbage or NaN
    # logits, and no vocabulary projection cost); transformers' own tying points it at the embedding
    ref.tie_weights()
    left = [n for n, t in ref.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise RuntimeError(f"reference tensors without weights: {left}")
    return ref.eval()


@torch.no_grad()
def bench_reference(ref, bc: BenchConfig, device, vocab: int, compiled: bool) -> dict:
    if compiled:
        ref.model.decoder.compile(mode="max-autotune-no-cudagraphs" if device.type == "cuda" else "default")
    g = torch.Generator(device=device).manual_seed(bc.seed)
    ids = torch.randint(3, vocab, (1, bc.prompt_len), device=device, generator=g)
    kw = dict(max_denoising_steps=bc.steps_per_canvas, confidence_threshold=1e-30)
    C = ref.config.canvas_length
    n = math.ceil(bc.new_tokens / C)

    def best_of_two(new_tokens):
        runs = []
        for _ in range(2):  # best of two, as ours takes a median canvas: robust to stalls
            _sync(device)
            t0 = time.perf_counter()
            out = ref.generate(ids, max_new_tokens=new_tokens, **kw)
            _sync(device)
            runs.append(time.perf_counter() - t0)
        return min(runs), out.sequences.shape[1] - bc.prompt_len  # sequences hold the prompt

    ref.generate(ids, max_new_tokens=C, **kw)  # warm-up / compile
    one, _ = best_of_two(C)  # prefill + one canvas
    total, new = best_of_two(n * C)
    canvases = max(1, math.ceil(new / C))  # a random model may stop early at an EOS
    # per canvas without the prefill (like ours): the difference of the two runs when it is meaningful
    per_canvas = (total - one) / (canvases - 1) if canvases > 1 and total > one else total / canvases
    return {"tok_s": C / per_canvas, "step_s": per_canvas / bc.steps_per_canvas, "canvas_s": per_canvas,
            "with_prefill_s": total, "tokens": new}


def _print_flush(line: str) -> None:
    print(line, flush=True)


def run_bench(bc: BenchConfig, print_fn=_print_flush) -> dict:
    """Measure and report. Each of our rows is printed as soon as it is measured, then each reference row
    (with its ratio) as it is measured: a time limit that strikes in the reference keeps our figures."""
    device = torch.device(bc.device)
    if bc.threads:
        torch.set_num_threads(bc.threads)
    cfg = model_config(bc.shape, canvas_length=bc.canvas_length)
    torch.manual_seed(bc.seed)
    t0 = time.perf_counter()
    from .quant import quantize_model, weight_bytes

    model = build_bench_model(cfg, device, bc.dtype, bc.seed, None if bc.vs_unquantized else bc.quantization)
    res = {"config": bc, "build_s": time.perf_counter() - t0}
    res["bandwidth"] = measure_bandwidth(device)
    if bc.vs_unquantized:  # the peer: the same weights before quantising, first batch size only
        res["unquantized"] = {**bench_ours(model, bc, bc.batches[0], detail=True), "weight_bytes": weight_bytes(model)}
        quantize_model(model, fmt=bc.quantization)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    res["ours"] = []
    for b in bc.batches:
        res["ours"].append(bench_ours(model, bc, b, detail=True))
        if len(res["ours"]) == 1:  # the floor needs the first row's KV bytes
            one = res["ours"][0]
            weights = weight_bytes(model)  # with FP8 / int4 scales
            res["weight_bytes"] = weights
            res["floor_s"] = (weights + one["kv_bytes"] // one["batch"]) / res["bandwidth"]
            for line in _header_lines(res):
                print_fn(line)
        print_fn(_ours_line(res, res["ours"][-1]))
    if device.type == "cuda":
        res["peak_mem"] = torch.cuda.max_memory_allocated()
    else:
        res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for line in _summary_lines(res):
        print_fn(line)
    res["reference"] = {}
    if bc.reference and not bc.quantization:
        if _batch_one(res) is None:  # the reference generates one request: its peer is our batch 1
            res["ours_batch1"] = bench_ours(model, bc, 1, detail=True)
            for line in _peer_lines(res):
                print_fn(line)
        ref = build_reference(model, device)
        for mode in bc.reference:
            try:
                res["reference"][mode] = bench_reference(ref, bc, device, cfg.vocab_size, mode == "compiled")
            except Exception as e:  # report and go on: the rest of the run is still worth printing
                res["reference"][mode] = {"error": f"{type(e).__name__}: {e}"}
            print_fn(_reference_line(res, mode, res["reference"][mode]))
    return res


def _header_lines(res: dict) -> list[str]:
    bc: BenchConfig = res["config"]
    dev = torch.device(bc.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, " \
        f"{torch.get_num_threads()} threads)"
    tps = bc.canvas_length / bc.steps_per_canvas
    quant = f" {bc.quantization}" if bc.quantization else ""
    return [f"canvaslm bench  shape={bc.shape} device={name} dtype={bc.dtype}{quant}  "
            f"prompt={bc.prompt_len} new={bc.new_tokens} canvas={bc.canvas_length} steps/canvas="
            f"{bc.steps_per_canvas} ({tps:g} tokens/step)  torch {torch.__version__}",
            f"bandwidth (copy) {res['bandwidth'] / 1e9:.1f} GB/s; weights {res['weight_bytes'] / 1e9:.3f} GB; "
            f"memory floor per decoder step {res['floor_s'] * 1e3:.3f} ms"]


def _ours_line(res: dict, o: dict) -> str:
    line = f"ours  batch {o['batch']}: "
    if "step_s" in o:
        line += (f"decoder step {o['step_s'] * 1e3:.2f} ms ({o['step_s'] / res['floor_s']:.2f}x floor), "
                 f"encode canvas {o['encode_s'] * 1e3:.2f} ms, prefill {o['prefill_s'] * 1e3:.1f} ms, ")
    if "step_peak_extra_bytes" in o:
        line += f"step peak extra {o['step_peak_extra_bytes'] / 2**20:.1f} MiB, "
    return line + f"{o['tok_s']:.1f} tok/s aggregate (median canvas {o['canvas_s'] * 1e3:.0f} ms incl. its encode)"


def _summary_lines(res: dict) -> list[str]:
    bc: BenchConfig = res["config"]
    lines = []
    single = res["ours"][0]
    for o in res["ours"][1:]:
        lines.append(f"ours  batch {o['batch']} / batch {single['batch']} throughput: "
                     f"{o['tok_s'] / single['tok_s']:.2f}x")
    if "unquantized" in res:
        u = res["unquantized"]
        lines.append(f"unquantized ({bc.dtype}) batch {u['batch']}: decoder step {u['step_s'] * 1e3:.2f} ms, "
                     f"{u['tok_s']:.1f} tok/s, weights {u['weight_bytes'] / 1e9:.3f} GB;  {bc.quantization}/"
                     f"unquantized: step {single['step_s'] / u['step_s']:.2f}x, "
                     f"tok/s {single['tok_s'] / u['tok_s']:.2f}x, "
                     f"weight bytes {res['weight_bytes'] / u['weight_bytes']:.2f}x")
    if "peak_mem" in res:
        lines.append(f"peak GPU memory {res['peak_mem'] / 2**30:.2f} GiB")
    else:
        lines.append(f"peak process RSS {res['peak_rss'] / 2**30:.2f} GiB (CPU run)")
    if bc.quantization and bc.reference:
        lines.append(f"transformers reference: not run ({bc.quantization} weights: the reference takes unquantised "
                     "weights only)" + ("; the peer is the unquantised row above" if "unquantized" in res else
                                        "; --vs-unquantized measures the unquantised peer in the same run"))
    elif bc.quantization and "unquantized" not in res:
        lines.append("no peer in this run: the transformers reference takes unquantised weights only; "
                     "--vs-unquantized measures the unquantised model as the peer")
    return lines


def _batch_one(res: dict) -> dict | None:
    """Our batch-1 row (from --batches, else the one measured for the reference), or None."""
    return next((o for o in res["ours"] if o["batch"] == 1), res.get("ours_batch1"))


def _peer_lines(res: dict) -> list[str]:
    """The batch-1 row measured for the reference when --batches had none."""
    if "ours_batch1" not in res:
        return []
    return [_ours_line(res, res["ours_batch1"]) + "  (measured as the reference's peer)"]


def _reference_line(res: dict, mode: str, r: dict) -> str:
    if "error" in r:
        return f"transformers {mode}: failed ({r['error']})"
    single = _batch_one(res)  # the reference runs one request: another batch size would skew the ratio
    return (f"transformers {mode} batch 1: decoder step {r['step_s'] * 1e3:.2f} ms (incl. encode), "
            f"{r['tok_s']:.1f} tok/s, {r['step_s'] / res['floor_s']:.2f}x floor;  ours/reference (batch 1): "
            f"step {single['step_s'] / r['step_s']:.3f}, tok/s {single['tok_s'] / r['tok_s']:.2f}x")


def format_report(res: dict) -> str:
    """The whole report of a finished run (what run_bench printed line by line)."""
    lines = _header_lines(res) + [_ours_line(res, o) for o in res["ours"]] + _summary_lines(res)
    lines += _peer_lines(res)
    lines += [_reference_line(res, mode, r) for mode, r in res.get("reference", {}).items()]
    return "\n".join(lines)


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="benchmark the decoder step vs the memory floor and transformers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=["26b-a4b", "small", "tiny"])
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--fp8", action="store_true", help="FP8 weights (attention, MLP, experts)")
    p.add_argument("--int4", action="store_true", help="int4 weights, activations in --dtype (W4A16, group 128)")
    p.add_argument("--vs-unquantized", action="store_true",
                   help="with --fp8/--int4: first measure the same model unquantised (first batch size), "
                        "print ratios")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--steps-per-canvas", type=int, default=16)
    p.add_argument("--canvas-length", type=int, default=256)
    p.add_argument("--batches", default="1,2,4,8", help="comma-separated concurrent request counts")
    p.add_argument("--reference", default="eager", help="eager,compiled | none")
    p.add_argument("--sampler", default="auto", choices=["auto", "fused", "cdf", "reference"])
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs for our decoder step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=main)
    return p


def config_from_args(args) -> BenchConfig:
    from .checkpoint import check_device

    if args.threads < 0:
        raise ValueError(f"bench: --threads must be >= 0 (0: torch's choice), got {args.threads}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)  # a CheckpointError (a ValueError: `error: ...`, exit 2) naming a device we lack
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    ref = () if args.reference in ("none", "") else tuple(s.strip() for s in args.reference.split(","))
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise ValueError(f"bench: --batches takes comma-separated positive integers, got {args.batches!r}") from None
    return BenchConfig(shape=args.shape, device=device, dtype=dtype, fp8=args.fp8, int4=args.int4,
                       vs_unquantized=args.vs_unquantized, prompt_len=args.prompt_len,
                       new_tokens=args.new_tokens, steps_per_canvas=args.steps_per_canvas,
                       batches=batches, reference=ref,
                       canvas_length=args.canvas_length, sampler=args.sampler, graphs=not args.no_graphs,
                       seed=args.seed, threads=args.threads)


def add_sampler_impl_arg(parser) -> None:
    """--sampler-impl for the bench/*.py scripts that time the sampling step alone (see step_impl)."""
    from .sampling.samplers import SAMPLER_IMPLS

    parser.add_argument("--sampler-impl", default=None, choices=SAMPLER_IMPLS,
                        help="the sampling step timed (default: reference on a CPU, as docs/benchmarks.md's "
                             "figures were measured; fused elsewhere)")


def step_impl(impl: str | None, device) -> str:
    """The sampling step a script times, named concretely for its report: `impl`, "auto" resolved as
    entropy_bound_step resolves it; None: the reference step on a CPU (the engine's CPU default became the
    inverse-CDF step after the recorded figures), the fused one elsewhere."""
    cuda = torch.device(device).type == "cuda"
    if impl is None:
        return "fused" if cuda else "reference"
    return ("fused" if cuda else "cdf") if impl == "auto" else impl


def exit_unless_device(device: str) -> None:
    """For the bench/*.py scripts: `error: ...` on stderr and exit 2 unless this torch can use `device`
    (None: the script's own default, left to it)."""
    import sys

    if device is None:
        return

    from .checkpoint import CheckpointError, check_device

    try:
        check_device(device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(args) -> int:
    run_bench(config_from_args(args))
    return 0
