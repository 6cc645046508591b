"""vLLM's serve flags on `canvaslm serve` (server/vllm_compat.py): the command an article gives for vLLM
runs here, each flag honoured or said to have nothing to do, and the rest refused by name."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import torch

from canvaslm.cli import main
from canvaslm.config import DiffusionParams
from canvaslm.engine.engine import GIB, EngineConfig, kv_budget, plan_max_model_len
from canvaslm.server.launch import BackgroundServer, build_state
from canvaslm.shapes import model_config

# seed 000's command for vLLM, with the tiny checkpoint's canvas (16) and a context it has
SEED_FLAGS = ["--max-model-len", "512", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.85",
              "--attention-backend", "TRITON_ATTN", "--generation-config", "vllm",
              "--hf-overrides", '{"diffusion_sampler": "entropy_bound", "diffusion_entropy_bound": 0.25}',
              "--diffusion-config", '{"canvas_length": 16}', "--enable-chunked-prefill"]


@pytest.fixture()
def served(monkeypatch, capsys):
    """main(["serve", ...]) up to uvicorn.run: (exit code, the state it would serve, what it printed)."""
    import uvicorn

    seen = {}

    def fake_run(app, **kw):
        seen["state"] = app.state.canvas

    monkeypatch.setattr(uvicorn, "run", fake_run)

    def run(*argv):
        code = main(["serve", *argv, "--device", "cpu"])
        return code, seen.pop("state", None), capsys.readouterr()
    return run


def test_the_articles_vllm_command_runs(served, tiny_checkpoint):
    code, state, out = served(str(tiny_checkpoint), *SEED_FLAGS)
    assert code == 0, out.err
    assert state.engine.config.max_batch == 4 and state.engine.config.memory_utilization == 0.85
    assert state.max_model_len == 512
    checkpoint = DiffusionParams.from_dir(tiny_checkpoint)
    builtin = DiffusionParams()
    assert checkpoint.max_denoising_steps != builtin.max_denoising_steps  # so the source shows
    assert state.defaults.max_denoising_steps == builtin.max_denoising_steps  # --generation-config vllm
    assert state.defaults.entropy_bound == 0.25  # --hf-overrides
    assert "--attention-backend: nothing to do" in out.out and "--enable-chunked-prefill: nothing to do" in out.out
    assert "built-in ones (--generation-config vllm)" in out.out
    state.engine.shutdown()
    # auto (the default) keeps the checkpoint's file, a directory reads its own, and --diffusion-config sets
    other = tiny_checkpoint.parent / "gen"
    other.mkdir(exist_ok=True)
    shutil.copy(tiny_checkpoint / "generation_config.json", other)
    gen = json.loads((other / "generation_config.json").read_text())
    gen["max_denoising_steps"] = 5
    (other / "generation_config.json").write_text(json.dumps(gen))
    code, state, _ = served(str(tiny_checkpoint), "--max-model-len", "128")
    assert state.defaults == checkpoint
    state.engine.shutdown()
    code, state, _ = served(str(tiny_checkpoint), "--max-model-len", "128", "--generation-config", str(other),
                            "--diffusion-config", '{"t_min": 0.1}', "--dtype", "auto")
    assert state.defaults.max_denoising_steps == 5 and state.defaults.t_min == 0.1
    state.engine.shutdown()


@pytest.mark.parametrize("flags,needle", [
    (["--diffusion-config", '{"canvas_length": 256}'], "checkpoint's canvas_length is 16"),
    (["--hf-overrides", '{"num_hidden_layers": 2}'], "key 'num_hidden_layers' is not one this engine takes"),
    (["--hf-overrides", '{"diffusion_sampler": "greedy"}'], "entropy_bound sampler only"),
    (["--hf-overrides", '{"max_denoising_steps": 0}'], "max_denoising_steps must be a positive integer"),
    (["--tensor-parallel-size", "2"], "runs on one device"),
    (["--generation-config", "/nonexistent"], "no generation_config.json there"),
])
def test_what_cannot_be_honoured_is_refused_by_name(served, tiny_checkpoint, flags, needle):
    code, state, out = served(str(tiny_checkpoint), *flags)
    assert code == 2 and state is None and needle in out.err, out.err


def test_bad_flag_values_are_argument_errors(tiny_checkpoint, capsys):
    for flags in (["--gpu-memory-utilization", "1.5"], ["--hf-overrides", "{not json"], ["--hf-overrides", "[1]"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", str(tiny_checkpoint), *flags])
        assert e.value.code == 2
        assert flags[0] in capsys.readouterr().err


def test_memory_utilization_counts_what_is_in_use():
    """vLLM's meaning: the share of the device for the whole process. 80 GiB with 28 free (52 in use, the
    weights): 0.9 leaves 72 - 52 - 2 = 18 GiB for the KV cache, 0.65 leaves nothing."""
    budget, why = kv_budget(28 * GIB, 80 * GIB, 0.9)
    assert budget == int(0.9 * 80 * GIB) - 52 * GIB - 2 * GIB and "--gpu-memory-utilization 0.9" in why
    cfg = model_config("26b-a4b")
    config = EngineConfig(max_batch=8, max_model_len=None, prefix_caching=False, memory_utilization=0.9)
    length, why = plan_max_model_len(cfg, config, "cuda", torch.bfloat16,
                                     free_total=(28 * GIB, 80 * GIB))
    default, _ = plan_max_model_len(cfg, EngineConfig(max_batch=8, max_model_len=None, prefix_caching=False),
                                    "cuda", torch.bfloat16, free_total=(28 * GIB, 80 * GIB))
    assert length < default  # 18 GiB against 20 GiB (28 less the default 8 GiB reserve)
    assert "--gpu-memory-utilization 0.9 allows 72.0 GiB" in why
    with pytest.raises(ValueError, match="52.0 GiB in use .* leave nothing of the 52.0 GiB "
                                         "--gpu-memory-utilization 0.65 allows; raise --gpu-memory-utilization"):
        plan_max_model_len(cfg, EngineConfig(max_batch=8, max_model_len=None, memory_utilization=0.65), "cuda",
                           torch.bfloat16, free_total=(28 * GIB, 80 * GIB))  # no --max-batch can help there
    with pytest.raises(ValueError, match="memory_utilization=1.5"):
        EngineConfig(memory_utilization=1.5)


def test_served_model_name_takes_aliases(served, tiny_checkpoint, capsys):
    code, state, out = served(str(tiny_checkpoint), "--max-model-len", "128", "--served-model-name", "dg", "gpt-4o",
                              "dg", "gpt-4o")  # a name given twice is listed once
    assert code == 0 and state.model_name == "dg" and state.served_names() == ["dg", "gpt-4o"]
    assert state.adapter("gpt-4o") == 0
    assert state.max_request_bytes == 64 << 20  # the default body limit
    state.engine.shutdown()
    code, state, out = served(str(tiny_checkpoint), "--max-model-len", "128", "--max-request-bytes", "1.5K")
    assert code == 0 and state.max_request_bytes == 1536
    state.engine.shutdown()
    code, state, out = served(str(tiny_checkpoint), "--max-model-len", "128", "--max-request-bytes", "0")
    assert code == 0 and state.max_request_bytes is None  # 0: no limit
    state.engine.shutdown()
    with pytest.raises(SystemExit):
        served(str(tiny_checkpoint), "--max-request-bytes", "lots")
    err = capsys.readouterr().err
    assert "--max-request-bytes" in err and "'lots'" in err


def test_replies_to_an_alias_name_the_first_served_name(tiny_checkpoint):
    """As vLLM's replies do."""
    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=128),
                        served_model_name="dg")
    state.aliases = ("gpt-4o",)
    with BackgroundServer(state) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="gpt-4o", prompt="hi", max_tokens=4, seed=0).model == "dg"
        assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, seed=0).model == "dg"
        stream = client.completions.create(model="gpt-4o", prompt="hi", max_tokens=4, seed=0, stream=True)
        assert {c.model for c in stream} == {"dg"}
        assert client.completions.create(model="dg", prompt="hi", max_tokens=4, seed=0).model == "dg"


def test_default_chat_template_kwargs_and_reasoning_parser(served, tiny_checkpoint):
    """--default-chat-template-kwargs: every rendering gets the variables unless the request sets them (the
    command in vLLM's issue #39130 turns thinking off this way); --reasoning-parser none turns the reading off."""
    code, state, out = served(str(tiny_checkpoint), "--max-model-len", "128", "--reasoning-parser", "gemma4",
                              "--default-chat-template-kwargs", '{"enable_thinking": false, "greeting": "ahoy"}')
    assert code == 0 and "chat template defaults: enable_thinking=False, greeting='ahoy'" in out.out
    assert "--reasoning-parser: nothing to do" in out.out and state.reasoning
    tok = state.tokenizer
    tok.set_chat_template("{{ greeting }}|{{ enable_thinking }}|{% for m in messages %}{{ m['content'] }}{% endfor %}")
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.decode(tok.encode_chat(msgs)) == "ahoy|False|hi"
    assert tok.decode(tok.encode_chat(msgs, enable_thinking=True)) == "ahoy|True|hi"  # the request's value wins
    state.engine.shutdown()
    code, state, out = served(str(tiny_checkpoint), "--max-model-len", "128", "--reasoning-parser", "none")
    assert code == 0 and not state.reasoning and state.tokenizer.template_defaults == {}
    state.engine.shutdown()
    code, state, out = served(str(tiny_checkpoint), "--default-chat-template-kwargs", '{"tools": []}')
    assert code == 2 and "--default-chat-template-kwargs may not set tools" in out.err


def test_reasoning_budget_flag(served, tiny_checkpoint, capsys):
    """llama-server's --reasoning-budget: the thinking budget of requests that set none (-1: none)."""
    code, state, out = served(str(tiny_checkpoint), "--max-model-len", "128", "--reasoning-budget", "7")
    assert code == 0 and state.thinking_token_budget == 7 and "thoughts end after at most 7 tokens" in out.out
    state.engine.shutdown()
    code, state, out = served(str(tiny_checkpoint), "--max-model-len", "128")
    assert code == 0 and state.thinking_token_budget is None and "thoughts end" not in out.out
    state.engine.shutdown()
    for bad in ("-3", "lots"):
        with pytest.raises(SystemExit) as e:  # argparse's usage error, before any model loads
            served(str(tiny_checkpoint), "--reasoning-budget", bad)
        assert e.value.code == 2
        assert "--reasoning-budget: must be -1 (no limit) or a number of tokens >= 0" in capsys.readouterr().err


def test_enable_lora_is_accepted_and_no_flag_is_abbreviated(served, tiny_checkpoint, capsys):
    """vLLM's --enable-lora is a no-op here, not a prefix of --enable-lora-updates (which serves routes that
    read server-side adapter paths); no other abbreviation passes either, on serve or run-batch."""
    code, state, out = served(str(tiny_checkpoint), "--max-model-len", "128", "--enable-lora")
    assert code == 0 and not state.lora_updates and "--enable-lora: nothing to do" in out.out, out.err
    state.engine.shutdown()
    for flag in (["--enable-lora-up"], ["--api", "k"], ["--max-model", "64"], ["--enable-prefix"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", str(tiny_checkpoint), *flag])
        assert e.value.code == 2 and f"unrecognized arguments: {flag[0]}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run-batch", str(tiny_checkpoint), "-i", "in", "-o", "out", "--concur", "2"])
    assert e.value.code == 2 and "unrecognized arguments: --concur" in capsys.readouterr().err
