"""CUDA-graph capture of one denoising step (decoder pass + fused sampling step) per batch-size bucket.

A decoder step over a 256-token canvas launches hundreds of small kernels; replaying a captured graph
removes their launch cost. Each bucket (1, 2, 4, 8 rows by default) owns static input buffers that are
filled before a replay and static outputs that are read after it. A batch is padded up to its bucket:
padding rows denoise slot `pad_slot` (the decoder only reads the cache, so they change nothing) and their
outputs are dropped. Everything captured is free of host syncs (fused sampler, Triton MoE, Philox seeds
passed in as a tensor). GPU only; `StepGraphs.run` on CPU raises, callers use the eager step there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling.fused import fused_step_from_hidden
from ..sampling.samplers import CanvasState, SamplerParams

BUCKETS = (1, 2, 4, 8)


@dataclass
class _Bucket:
    graph: torch.cuda.CUDAGraph
    inputs: dict  # name -> static tensor
    outputs: CanvasState


class StepGraphs:
    """Captured denoise + sample steps for one model and KV cache, keyed by bucket size."""

    def __init__(self, model, cache, history_depth: int = 1, buckets=BUCKETS, vocab_chunk: int = 16384,
                 pad_slot: int = 0):
        if not cache.device.type == "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model and cache, got cache on {cache.device}")
        self.model, self.cache, self.depth = model, cache, history_depth
        self.buckets, self.chunk, self.pad_slot = tuple(sorted(buckets)), vocab_chunk, pad_slot
        self._graphs: dict[int, _Bucket] = {}
        self.pool = None  # graphs share one memory pool

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if batch <= b:
                return b
        raise ValueError(f"batch of {batch} rows exceeds the largest CUDA-graph bucket {self.buckets[-1]}")

    def _static_inputs(self, B: int) -> dict:
        cfg, dev = self.model.cfg, self.cache.device
        C, d = cfg.canvas_length, cfg.hidden_size
        z = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        return dict(canvas=z(B, C), argmax=z(B, C), slots=z(B) + self.pad_slot, canvas_start=z(B),
                    sc_embeds=z(B, C, d, dtype=self.model.embed_weight.dtype), sc_mask=z(B, dtype=torch.bool),
                    finished=z(B, dtype=torch.bool), history=z(B, self.depth, C) - 1, cur_step=z(B) + 1,
                    n_steps=z(B, dtype=torch.int32) + 1, t_min=z(B, dtype=torch.float32),
                    t_span=z(B, dtype=torch.float32) + 1, entropy_bound=z(B, dtype=torch.float32) + 1,
                    stability=z(B), confidence=z(B, dtype=torch.float32), seeds=z(B))

    def _step(self, x: dict) -> CanvasState:
        hidden = self.model.denoise(x["canvas"], x["slots"], self.cache, sc_embeds=x["sc_embeds"],
                                    sc_mask=x["sc_mask"], canvas_start=x["canvas_start"], return_hidden=True)
        st = CanvasState(x["canvas"], x["argmax"], None, x["finished"], x["history"], x["cur_step"],
                         sc_embeds=x["sc_embeds"])
        p = SamplerParams(x["n_steps"], x["t_min"], x["t_span"], x["entropy_bound"], x["stability"],
                          x["confidence"])
        return fused_step_from_hidden(hidden, self.model, st, p, x["seeds"], self.model.cfg.vocab_size,
                                      chunk=self.chunk)

    @torch.no_grad()
    def capture(self, B: int) -> _Bucket:
        x = self._static_inputs(B)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (Triton compiles, allocator settles) outside the graph
            for _ in range(2):
                self._step(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._step(x)
        self.pool = graph.pool()
        self._graphs[B] = _Bucket(graph, x, out)
        return self._graphs[B]

    @torch.no_grad()
    def run(self, st: CanvasState, p: SamplerParams, slots: torch.Tensor, canvas_start: torch.Tensor,
            seeds: torch.Tensor, sc_mask: torch.Tensor | None = None) -> CanvasState:
        """One step for a batch of n rows (st.sc_embeds may be None: no self-conditioning yet)."""
        n = st.canvas.shape[0]
        B = self.bucket_for(n)
        bucket = self._graphs.get(B) or self.capture(B)
        x = bucket.inputs
        has_sc = st.sc_embeds is not None
        mask = sc_mask if sc_mask is not None else torch.full((n,), has_sc, device=slots.device)
        fills = dict(canvas=st.canvas, argmax=st.argmax, slots=slots, canvas_start=canvas_start,
                     finished=st.finished, history=st.history, cur_step=st.cur_step, n_steps=p.n_steps,
                     t_min=p.t_min, t_span=p.t_span, entropy_bound=p.entropy_bound, stability=p.stability,
                     confidence=p.confidence, seeds=seeds, sc_mask=mask)
        if has_sc:
            fills["sc_embeds"] = st.sc_embeds
        for name, t in fills.items():
            x[name][:n].copy_(t)
        x["finished"][n:] = True  # padding rows stay frozen
        x["slots"][n:] = self.pad_slot
        bucket.graph.replay()
        o = bucket.outputs
        return CanvasState(o.canvas[:n].clone(), o.argmax[:n].clone(), None, o.finished[:n].clone(),
                           o.history[:n].clone(), o.cur_step[:n].clone(), sc_embeds=o.sc_embeds[:n].clone())
