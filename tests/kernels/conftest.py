"""Kernel tests run Triton in its interpreter on CPU. The mode is fixed when triton.language is first
imported, so it is set here, before any test module of this folder imports a kernel."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_device():
    """The device Triton kernels run on here: cuda, or cpu through the interpreter; skip otherwise."""
    from canvaslm.kernels import interpreting, triton_available

    if not triton_available():
        pytest.skip("triton is not installed (pip install canvaslm[gpu])")
    if torch.cuda.is_available():
        return "cuda"
    if not interpreting():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    return "cpu"


def cpu_peak_bytes(fn) -> int:
    """Peak bytes allocated by torch on CPU while fn runs (from the profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = best = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        best = max(best, cur)
    return best
