"""CanvasLM: run, serve and fine-tune block-diffusion language models (DiffusionGemma).

Imports are lazy so that torch-free parts (the scheduler) stay torch-free.
"""

__version__ = "0.1.0"
_EXPORTS = {
    "LLM": "llm", "SamplingParams": "llm", "GenerationResult": "llm",
    "load_model": "checkpoint", "save_model": "checkpoint",
    "ModelConfig": "config", "DiffusionParams": "config",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'canvaslm' has no attribute {name!r}")
