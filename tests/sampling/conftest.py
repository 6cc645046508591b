"""Fixtures for canvas-control tests: a tiny random checkpoint (canvas 16), its LLM, and the official
openai client talking to a CanvasLM server that serves it."""

from __future__ import annotations

import pytest


# the tiny char tokenizer's specials other than its EOS ids (<pad>, <bos>, <start_of_turn>): they decode to "",
# so a test that reads one character per token bans them (whether a seed samples one depends on the draws)
SILENT = {0: -100, 2: -100, 3: -100}


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    from canvaslm.llm import LLM
    from canvaslm.testing import make_tiny_checkpoint

    return LLM(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_cc")), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def client(tiny_llm):
    """(openai.OpenAI client, served model name) for a background server on loopback."""
    openai = pytest.importorskip("openai")
    from canvaslm.server.launch import BackgroundServer, build_state

    srv = BackgroundServer(build_state(tiny_llm.model_dir, device="cpu")).start()
    try:
        yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0), srv.state.model_name
    finally:
        srv.stop()
