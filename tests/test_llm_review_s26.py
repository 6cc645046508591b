"""Offline API review (session 26): SamplingParams refuses a string `choice` (was split into its characters) and
a `constraint` that is no canvas constraint; LLM.chat refuses chat_template_kwargs that set its own arguments;
`max_batch` keeps a one-row last batch a batch (its floats, and so its seeded output, were a lone row's);
edit and infill take numpy integers and refuse bools; wrong
prompt and batch_size types are named errors; `canvaslm chat` refuses a --max-new-tokens no turn fits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from canvaslm.generate import GenerationError
from canvaslm.llm import LLM, SamplingParams
from canvaslm.sampling.constraints import PinnedConstraint


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu", progress=False)


def test_a_string_choice_is_refused_not_split():
    with pytest.raises(GenerationError, match="SamplingParams.choice must be a list of strings.*'yes'"):
        SamplingParams(choice="yes")
    with pytest.raises(GenerationError, match="SamplingParams.choice"):
        SamplingParams(structured_outputs={"choice": "yes"})
    assert SamplingParams(choice=["yes", "no"]).choice == ("yes", "no")
    assert SamplingParams(structured_outputs={"choice": ["yes"]}).choice == ("yes",)


def test_a_constraint_must_be_a_canvas_constraint():
    with pytest.raises(GenerationError, match="SamplingParams.constraint must be a canvas constraint.*dict"):
        SamplingParams(constraint={0: 5})
    SamplingParams(constraint=PinnedConstraint({0: 5}))


@pytest.mark.parametrize("key", ["add_generation_prompt", "continue_final_message", "tools", "messages"])
def test_chat_template_kwargs_may_not_set_chat_arguments(llm, key):
    with pytest.raises(GenerationError, match=f"chat_template_kwargs may not set '{key}'"):
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4),
                 chat_template_kwargs={key: False})
    with pytest.raises(GenerationError, match="chat_template_kwargs must be a dict"):
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4), chat_template_kwargs=["x"])


def test_a_one_row_last_batch_gives_the_big_batch_output(tiny_checkpoint, llm):
    """Bit for bit on one thread (README): with two, a matrix kernel may split its sums by the batch's shape, and
    this test passed or failed by the thread count the tests before it had left."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prompts = ["hi", "yo", "ok"]  # short prompts: a lone row's floats differ enough to change the draws
        params = [SamplingParams(seed=10 + i, max_new_tokens=16) for i in range(3)]
        small = LLM(tiny_checkpoint, device="cpu", progress=False, max_batch=2)  # batches [0, 1] and [2]
        want = [r.token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
        assert [r.token_ids for r in small.generate(prompts, params, use_tqdm=False)] == want
        assert len(small.generate(prompts, params, use_tqdm=False)) == 3
    finally:
        torch.set_num_threads(threads)


def test_edit_and_infill_integers(llm):
    with pytest.raises(GenerationError, match="edit: start must be an integer.*bool"):
        llm.edit("hello world", False, True)
    r = llm.edit("hello world", np.int64(1), np.int64(3), SamplingParams(seed=0, max_denoising_steps=2))
    assert r.text.startswith("h") and r.text.endswith("lo world")
    r = llm.infill("a", "b", SamplingParams(seed=0, max_denoising_steps=2), gaps=np.array([2, 3]))
    assert r.gap in (2, 3)
    with pytest.raises(GenerationError, match="gaps must be non-negative integers"):
        llm.infill("a", "b", SamplingParams(seed=0), gaps=[True])


@pytest.mark.parametrize("prompts", [None, 5, torch.tensor(5), 2.5])
def test_prompts_of_no_prompt_type_are_named(llm, prompts):
    with pytest.raises(GenerationError, match="prompts must be a string, a list of token ids"):
        llm.generate(prompts, SamplingParams(max_new_tokens=4))


def test_batch_size_must_be_an_integer(llm):
    with pytest.raises(GenerationError, match="embed: batch_size must be an integer >= 1, got 1.5"):
        llm.embed(["hi"], batch_size=1.5)
    with pytest.raises(GenerationError, match="loglikelihood: batch_size must be an integer >= 1, got True"):
        llm.loglikelihood([("a", "b")], batch_size=True)
    assert len(llm.embed(["hi", "yo"], batch_size=np.int64(1))) == 2


def test_chat_cli_refuses_a_max_new_tokens_no_turn_fits(tiny_checkpoint, llm):
    too_many = llm.cfg.max_position_embeddings + 1
    proc = subprocess.run([sys.executable, "-m", "canvaslm.cli", "chat", str(tiny_checkpoint), "--max-new-tokens",
                           str(too_many)], input="hi\nhello\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1 and f"--max-new-tokens {too_many}" in proc.stderr
