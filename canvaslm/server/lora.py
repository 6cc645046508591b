"""Loading and unloading LoRA adapters while serving (`--enable-lora-updates`; vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter). The files are read on a worker thread; the model
changes on the engine thread between steps (`Engine.call`), so no step sees half an adapter. An
unloaded adapter's name is refused at once, and engine requests already admitted with it finish with it
(its weights are freed after them: lora_serving.MultiLoRA.unload). A request that passed the name check
but reached the engine after the unload is a 404 naming `model`; so is a reply of two parts (a thought
before a constrained answer, or `logprobs` scored after the reply) whose second part comes after it."""

from __future__ import annotations

import asyncio

from ..lora_serving import AdapterError, read_adapter
from .serving import APIError, ServerState, engine_future


async def load_adapter(state: ServerState, name: str, path: str) -> int:
    if name == state.model_name or name in state.loras or name in state.aliases:
        raise APIError(400, f"lora_name {name!r} is already served; unload it first or pick another name",
                       "lora_name")
    try:
        adapter = await asyncio.to_thread(read_adapter, path, name)
        i = await asyncio.wrap_future(engine_future(state.engine, lambda m: m.lora_serving.load(adapter)))
    except AdapterError as e:
        raise APIError(400, f"lora_path: {e}", "lora_path") from None
    state.loras[name] = (i, adapter.path)
    return i


async def unload_adapter(state: ServerState, name: str) -> None:
    if name not in state.loras:
        raise APIError(404, f"no LoRA adapter named {name!r} is loaded", "lora_name", code="model_not_found")
    del state.loras[name]  # new requests may no longer name it
    await asyncio.wrap_future(engine_future(state.engine, lambda m: m.lora_serving.unload(name)))
