"""The Sudoku model's shape and its sampler defaults, and the recipe's tokenizer files.

A small DiffusionGemma: vocabulary 832 (cell tokens in the prompt, digits in the answer; see `data.py`),
canvas_length 82 so the whole answer (81 digits + EOS) is one canvas and every cell sees every other
cell bidirectionally; sliding_window 256 is longer than prompt + canvas (165 positions), so "sliding"
layers see everything too and the 5:1 sliding/full pattern only changes the RoPE flavour. The last
layer is full attention, as the reference requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from canvaslm.config import DiffusionParams, ModelConfig
from canvaslm.recipes.sudoku.data import (BOS_ID, CELL_BASE_ID, EOS_ID, ID_TO_TOKEN, PAD_ID, PROMPT_LEN, TARGET_LEN,
                                          VOCAB_SIZE)

SLIDING, FULL = "sliding_attention", "full_attention"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>"]  # ids 0, 1, 2 as in data.py
CHARS = list("0123456789|")  # ids 3..12 digits, 13 the separator
# ids 14, 15 and 826..831 reserved; 16..825 the prompt's cell tokens `<r1c1:0>` ... `<r9c9:9>`
EXTRA_TOKENS = [ID_TO_TOKEN[i] for i in range(14, VOCAB_SIZE)]


@dataclass(frozen=True)
class ModelShape:
    """The knobs of the recipe's model; everything else is fixed by the task."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    num_kv_heads: int = 2
    intermediate_size: int = 128
    num_experts: int = 4
    top_k_experts: int = 2
    moe_intermediate_size: int = 64
    sliding_window: int = 256
    canvas_length: int = TARGET_LEN

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "num_kv_heads", "intermediate_size",
                     "num_experts", "top_k_experts", "moe_intermediate_size", "canvas_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {v!r}")
        if self.canvas_length < TARGET_LEN:
            raise ValueError(f"model.canvas_length must be >= {TARGET_LEN} (81 cells + EOS in one canvas), "
                             f"got {self.canvas_length}")
        if self.sliding_window < PROMPT_LEN + self.canvas_length:
            raise ValueError(f"model.sliding_window must be >= {PROMPT_LEN + self.canvas_length} (prompt + canvas) "
                             f"so every layer sees the whole puzzle, got {self.sliding_window}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"model: unknown keys {unknown}; expected some of {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def model_config(shape: ModelShape = ModelShape()) -> ModelConfig:
    """The DiffusionGemma config of the recipe's model."""
    n = shape.num_layers
    layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    layer_types[-1] = FULL
    text = dict(
        model_type="diffusion_gemma_text", vocab_size=VOCAB_SIZE, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=n, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, sliding_window=shape.sliding_window,
        num_experts=shape.num_experts, top_k_experts=shape.top_k_experts,
        moe_intermediate_size=shape.moe_intermediate_size, layer_types=layer_types,
        max_position_embeddings=2 * (PROMPT_LEN + shape.canvas_length),
        # full layers keep the sliding layers' head size (the 26B's 512-wide global heads would dwarf this model)
        per_layer_config={str(i): {"head_dim": shape.head_dim, "num_key_value_heads": shape.num_kv_heads}
                          for i, t in enumerate(layer_types) if t == FULL},
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=BOS_ID)
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": text,
                                  "canvas_length": shape.canvas_length}, source="sudoku recipe")


def default_params(max_denoising_steps: int = 12) -> DiffusionParams:
    """Sampler defaults shipped in generation_config.json: one canvas, few steps, a cool schedule."""
    return DiffusionParams(max_new_tokens=TARGET_LEN, max_denoising_steps=max_denoising_steps,
                           entropy_bound=0.5, t_min=0.1, t_max=0.5, stability_threshold=1,
                           confidence_threshold=0.005, eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID)


def write_tokenizer(out_dir: str | Path):
    """tokenizer.json + tokenizer_config.json whose ids match data.py's token layout."""
    from canvaslm.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(CHARS, SPECIAL_TOKENS, out_dir, bos_token="<bos>", eos_token="<eos>",
                               pad_token="<pad>", extra_tokens=EXTRA_TOKENS)
    assert tok.encode(ID_TO_TOKEN[CELL_BASE_ID]) == [CELL_BASE_ID] and tok.vocab_size == VOCAB_SIZE
    return tok
