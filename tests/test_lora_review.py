"""LoRA adapter inputs a review found mishandled (canvaslm/lora_serving.py, canvaslm/server/metrics.py):
peft inits that change the base weights and `lora_bias` are refused by name, adapter_model.bin adapters load,
`LLM(lora_modules=...)` takes every documented shape and names any other, `--lora-modules` takes vLLM's
JSON form, and hand-written /metrics escapes adapter names."""

from __future__ import annotations

import pytest


def test_hand_written_metrics_escape_label_values():
    """Without prometheus_client, an adapter named my"adapter broke the page and a newline could add lines."""
    from canvaslm.server.metrics import _render_by_hand

    names = ['my"adapter', "c:\\loras\\x", "two\nlines"]
    text = _render_by_hand([("lora_requests", "gauge", "Requests", [("", {"adapter": n}, 1) for n in names])])
    assert text.splitlines()[2:] == ['canvaslm_lora_requests{adapter="my\\"adapter"} 1.0',
                                     'canvaslm_lora_requests{adapter="c:\\\\loras\\\\x"} 1.0',
                                     'canvaslm_lora_requests{adapter="two\\nlines"} 1.0']
    parser = pytest.importorskip("prometheus_client.parser")
    [fam] = parser.text_string_to_metric_families(text)
    assert [s.labels["adapter"] for s in fam.samples] == names
