"""Prometheus text exposition of the engine's counters (read at scrape time, nothing is pushed).

Families: queue depth, running requests, denoising steps/s and tokens/s (over the last 10 s, plus
the raw counters for `rate()`), time to first token (histogram), tokens per forward (mean over
finished requests), finished requests by reason and those a latency budget ended, and with LoRA
adapters served, requests held per adapter. Uses `prometheus_client` when installed (the `serve` extra),
else writes the same text format by hand.
"""

from __future__ import annotations

from ..engine.engine import TTFT_BUCKETS, Engine

PREFIX = "canvaslm_"


def _families(engine: Engine) -> list[tuple]:
    """(name, type, help, samples) with samples = [(suffix, labels dict, value)]."""
    s = engine.stats
    steps_per_s, tokens_per_s = s.rates()
    cum, buckets = 0, []
    for le, n in zip((*TTFT_BUCKETS, float("inf")), s.ttft_counts):
        cum += n
        buckets.append(("_bucket", {"le": "+Inf" if le == float("inf") else repr(le)}, cum))
    tpf = s.tpf_sum / s.tpf_count if s.tpf_count else 0.0
    return [
        ("queue_depth", "gauge", "Requests waiting for admission", [("", {}, engine.num_waiting)]),
        ("running_requests", "gauge", "Requests holding a KV slot", [("", {}, engine.num_running)]),
        ("denoising_steps_per_second", "gauge", "Denoising steps (summed over requests) per second, last 10 s",
         [("", {}, steps_per_s)]),
        ("tokens_per_second", "gauge", "Committed output tokens per second, last 10 s", [("", {}, tokens_per_s)]),
        ("denoising_steps", "counter", "Denoising steps summed over requests", [("_total", {}, s.denoise_rows)]),
        ("generated_tokens", "counter", "Committed output tokens", [("_total", {}, s.tokens)]),
        ("engine_steps", "counter", "Engine iterations (one scheduler plan each)", [("_total", {}, s.steps)]),
        ("time_to_first_token_seconds", "histogram", "Submit to first committed token",
         buckets + [("_count", {}, cum), ("_sum", {}, s.ttft_sum)]),
        ("tokens_per_forward", "gauge", "Mean output tokens per decoder pass over finished requests",
         [("", {}, tpf)]),
        ("prompt_tokens", "counter", "Prompt tokens of finished requests", [("_total", {}, s.prompt_tokens)]),
        ("prefix_cache_hit_tokens", "counter", "Prompt tokens whose KV the prefix cache supplied",
         [("_total", {}, s.cached_prompt_tokens)]),
        ("requests_finished", "counter", "Finished requests by reason",
         [("_total", {"reason": r}, n) for r, n in sorted(s.requests_finished.items())]),
        ("requests_out_of_time", "counter", "Finished requests whose max_time (t_max_predict_ms) ended them",
         [("_total", {}, s.out_of_time)]),
    ] + _lora_families(engine)


def _lora_families(engine: Engine) -> list[tuple]:
    """Requests the engine holds (waiting or running) per served LoRA adapter, 0 for idle ones."""
    served = getattr(engine.runner.model, "lora_serving", None)
    if served is None:
        return []
    active = dict(served.active)  # a copy: the engine thread updates it
    names = {i: name for name, i in dict(served.ids).items()}
    counts = {name: active.get(i, 0) for i, name in names.items()}
    unloaded = sum(n for i, n in active.items() if i and i not in names)
    samples = [("", {"adapter": name}, n) for name, n in sorted(counts.items())]
    if unloaded:
        samples.append(("", {"adapter": "(unloaded)"}, unloaded))
    return [("lora_requests", "gauge", "Requests held (waiting or running) by LoRA adapter", samples)]


def _label_value(v) -> str:
    """A label value as the text exposition format writes it: backslash, double quote and newline escaped
    (an adapter's name is the client's text: unescaped, a quote breaks the page and a newline adds lines)."""
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_by_hand(families) -> str:
    lines = []
    for name, kind, help_text, samples in families:
        full = PREFIX + name
        named = full + "_total" if kind == "counter" else full  # a counter's samples are NAME_total: so is its TYPE
        lines += [f"# HELP {named} {help_text}", f"# TYPE {named} {kind}"]
        for suffix, labels, value in samples:
            lab = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            lines.append(f"{full}{suffix}{{{lab}}} {float(value)}" if lab else f"{full}{suffix} {float(value)}")
    return "\n".join(lines) + "\n"


def render_metrics(engine: Engine) -> tuple[str, str]:
    """(body, content type)."""
    families = _families(engine)
    try:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        from prometheus_client.exposition import CONTENT_TYPE_LATEST
    except ImportError:
        return _render_by_hand(families), "text/plain; version=0.0.4; charset=utf-8"

    class _Collector:
        def collect(self):
            for name, kind, help_text, samples in families:
                full = PREFIX + name
                if kind == "histogram":
                    bk = [(lab["le"], v) for sfx, lab, v in samples if sfx == "_bucket"]
                    total = next(v for sfx, _, v in samples if sfx == "_sum")
                    yield HistogramMetricFamily(full, help_text, buckets=bk, sum_value=total)
                else:  # counters and gauges, with or without labels
                    labels = sorted({k for _, lab, _ in samples for k in lab})
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    fam = cls(full, help_text, labels=labels)
                    for _, lab, v in samples:
                        fam.add_metric([lab[k] for k in labels], v)
                    yield fam

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry).decode(), CONTENT_TYPE_LATEST
