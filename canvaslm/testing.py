"""Tiny random checkpoints with a character tokenizer, for tests, demos and load tests (no downloads),
and a recorder of ops that make the host wait for the GPU."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .checkpoint import build_random_model, save_model
from .config import DiffusionParams, ModelConfig

SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
CHAT_TEMPLATE = (  # tool declarations and calls render as JSON, so tests can see them in the prompt
    "{{ bos_token }}{% if tools %}<start_of_turn>system\nTools: {{ tools | tojson }}<end_of_turn>\n{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}{% for c in m.get('tool_calls', []) %}call:{{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def make_tiny_checkpoint(out_dir, canvas_length: int = 16, seed: int = 0, std: float = 0.5,
                         params: DiffusionParams | None = None, extra_specials: tuple = (),
                         byte_fallback: bool = False, **text_overrides) -> Path:
    """Write a random DiffusionGemma checkpoint + char tokenizer (vocab = specials + printable chars).
    A large init std makes the random model's predictions peaked, so sampling converges quickly.
    `extra_specials` adds special tokens after the standard ones (e.g. the native tool-call tokens);
    `byte_fallback` puts Gemma's 256 byte tokens after them, which spell any other character."""
    from .tokenizer import build_char_tokenizer

    out_dir = Path(out_dir)
    specials = SPECIALS + list(extra_specials)
    vocab = len(specials) + len(CHARS) + (256 if byte_fallback else 0)
    text = dict(model_type="diffusion_gemma_text", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                sliding_window=16, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                max_position_embeddings=4096, layer_types=["sliding_attention", "sliding_attention",
                                                          "full_attention"],
                per_layer_config={"2": {"head_dim": 32, "num_key_value_heads": 1}},
                eos_token_id=[1, 4], pad_token_id=0, bos_token_id=2)
    text.update(text_overrides)
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": text,
                                 "canvas_length": canvas_length})
    model = build_random_model(cfg, seed=seed, std=std)
    params = params or DiffusionParams(max_new_tokens=32, max_denoising_steps=8, eos_token_ids=(1, 4),
                                       pad_token_id=0)
    save_model(model, out_dir, params)
    build_char_tokenizer(CHARS, specials, out_dir, chat_template=CHAT_TEMPLATE, bos_token="<bos>",
                         eos_token="<eos>", pad_token="<pad>", byte_fallback=byte_fallback)
    return out_dir


# ops whose result the host must read before it can go on (nonzero sizes, scalars; CUDA's bincount
# reads the largest value to size its output, whatever `minlength` says)
SYNCING = {"nonzero", "masked_select", "_local_scalar_dense", "item", "unique", "_unique2", "bincount"}


class SyncRecorder(TorchDispatchMode):
    """Records every op that makes the host wait for the device (a GPU sync), including indexing with
    a boolean mask (it runs nonzero to size its result). Plain copies to the host (`.tolist()`) are not
    aten ops here and are not recorded."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        indices = args[1] if name in ("index", "index_put", "index_put_", "_index_put_impl_") else ()
        if name in SYNCING or any(i is not None and i.dtype == torch.bool for i in indices):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def script_engine(monkeypatch, state, *texts) -> list:
    """A server's engine, scripted (a random tiny model writes no channel or call): its k-th request is answered
    with texts[k] (the last text for later ones) as one commit, then EOS unless the text ends with the thought
    channel's close (a thought request ends there). -> the list the requests' prompt ids go to, in order.
    The real run_choices reads the commits, so everything from there on is the server's own."""
    from .engine.engine import Commit, Finish
    from .reasoning import CHANNEL_CLOSE

    tok, prompts = state.tokenizer, []

    def submit(request, queue, loop):
        text = texts[min(len(prompts), len(texts) - 1)]
        prompts.append(list(request.prompt_ids))
        ids = tok.encode(text, add_special_tokens=False) + ([] if text.endswith(CHANNEL_CLOSE) else [tok.eos_ids[0]])
        loop.call_soon_threadsafe(queue.put_nowait, Commit(request.request_id, 0, tuple(ids)))
        loop.call_soon_threadsafe(queue.put_nowait, Finish(request.request_id, "stop", len(ids), 1))

    monkeypatch.setattr(state.engine, "submit", submit)
    return prompts
