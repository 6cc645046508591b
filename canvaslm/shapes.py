"""Named model shapes for benchmarks and demos (random weights; no checkpoint needed).

`26b-a4b` is DiffusionGemma's published shape: 30 layers (5 sliding : 1 full), hidden 2816, 128
experts top-8 of width 704 (45.7 GB of bf16 expert weights), vocabulary 262,144, about 25.2 B parameters.
"""

from __future__ import annotations

from .config import ModelConfig

SHAPES = ("26b-a4b", "small", "tiny")  # text_config's names


def text_config(shape: str) -> dict:
    shapes = {
        "26b-a4b": dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                        num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                        per_layer_config={str(i): {"head_dim": 512, "num_key_value_heads": 2}
                                          for i in range(5, 30, 6)}),
        "small": dict(vocab_size=32_768, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=256,
                      num_experts=16, top_k_experts=4, moe_intermediate_size=256,
                      per_layer_config={"5": {"head_dim": 128, "num_key_value_heads": 1}}),
        "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                     num_experts=8, top_k_experts=2, moe_intermediate_size=32,
                     layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                     per_layer_config={"2": {"head_dim": 32, "num_key_value_heads": 1}}),
    }
    if shape not in shapes:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(shapes)}")
    return {"model_type": "diffusion_gemma_text", "max_position_embeddings": 131_072, **shapes[shape]}


def model_config(shape: str, canvas_length: int = 256, **overrides) -> ModelConfig:
    text = {**text_config(shape), **overrides}
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": text,
                                  "canvas_length": canvas_length}, source=f"shape {shape!r}")


def random_model(shape: str, canvas_length: int, device: str, threads: int | None = None):
    """(config, model, dtype name) for benchmarks: random weights at a named shape, bf16 on CUDA and
    float32 elsewhere; `threads` sets torch's CPU threads first."""
    import torch

    from .checkpoint import build_random_model

    if threads:
        torch.set_num_threads(threads)
    cfg = model_config(shape, canvas_length=canvas_length)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return cfg, build_random_model(cfg, device=device, dtype=dtype, seed=0, std=0.5).eval(), dtype
