"""The engine tests' model: the tiny random checkpoint, loaded once per module, on one torch thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    from canvaslm.llm import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: one thread is faster, and immune to a busy machine
    yield LLM(tiny_checkpoint, device="cpu")
    torch.set_num_threads(threads)
