"""/v1/embeddings: one vector per input from the encoder's final hidden states (scoring.embed_rows: mean
over the input's tokens by default, `--embedding-pooling last` for the last token's), L2-normalised as
OpenAI's are, run on the engine thread with the request's LoRA adapter, in encoder passes of at most one
slot's context of positions (serving.by_groups). `encoding_format: base64` sends the float32
little-endian bytes, as OpenAI's clients expect. vLLM's `truncate_prompt_tokens` keeps the last N
tokens of each input, as on /v1/completions. Embeddings take no images: a vision model's image token in
an input is refused, as the generating routes refuse one with no image behind it. The model was trained
to generate, not to embed: the vectors are what its hidden states give, with no contrastive training
behind them."""

from __future__ import annotations

import asyncio
import base64

import torch

from ..multimodal import ImageError
from ..scoring import embed_rows
from .serving import APIError, ServerState, by_groups, check_in_vocab, context_error

MAX_INPUTS = 2048  # OpenAI's limit per request


def _no_image_tokens(state: ServerState, ids: list, where: str) -> None:
    """A 400 when a vision model's input holds image tokens: embeddings take no images, and a placeholder
    with none behind it is refused as on the generating routes (Vision.prepare with no images loads nothing,
    it only checks)."""
    vision = state.vision
    if vision is None or not vision.cfg.has_vision:  # text only: the token is text like any other
        return
    try:
        vision.prepare(ids, ())
    except ImageError as e:
        raise APIError(400, f"{where}: {e}", "input") from None


async def create_embeddings(state: ServerState, body, seqs: list) -> dict:
    state.adapter(body.model)  # a 404 unless served
    if len(seqs) > MAX_INPUTS:
        raise APIError(400, f"input has {len(seqs)} items, over the limit of {MAX_INPUTS}", "input")
    if body.truncate_prompt_tokens is not None:
        seqs = [list(ids)[-body.truncate_prompt_tokens:] for ids in seqs]
    for i, ids in enumerate(seqs):
        if not ids:
            raise APIError(400, f"input[{i}] is empty: at least one token is needed", "input")
        if len(ids) > state.max_model_len:
            raise context_error(state, f"input[{i}] has {len(ids)} tokens", "input")
        check_in_vocab(state, ids, "input", f"input[{i}]: token ids")
        _no_image_tokens(state, ids, f"input[{i}]")
    if body.dimensions is not None and body.dimensions != state.hidden_size:
        raise APIError(400, f"dimensions: this model's embeddings have {state.hidden_size} dimensions and it was not "
                            "trained for shorter ones; omit dimensions", "dimensions")

    def embed(m):  # on the engine thread
        return torch.stack(by_groups(state, [len(s) for s in seqs],
                                     lambda group: embed_rows(m, [seqs[i] for i in group], state.embedding_pooling)))

    emb = await asyncio.wrap_future(state.engine_call(body.model, embed))
    data = []
    for i, v in enumerate(emb):
        vec = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
               else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": vec})
    n = sum(len(s) for s in seqs)
    return {"object": "list", "data": data, "model": state.reply_name(body.model),
            "usage": {"prompt_tokens": n, "total_tokens": n}}
