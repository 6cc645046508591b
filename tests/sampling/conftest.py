"""Fixtures for canvas-control tests: a tiny random checkpoint (canvas 16) and its LLM."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    from canvaslm.llm import LLM
    from canvaslm.testing import make_tiny_checkpoint

    return LLM(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_cc")), device="cpu", dtype="float32")
