"""The public Python API: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import default_dtype, load_model, parse_dtype
from .config import ConfigError, DiffusionParams, checked_eos_ids
from .generate import GenerationError, RowRequest, batch_geometry, check_in_vocab, check_request, generate_rows
from .hub import resolve_model
from .kernels.philox import seeded_generator
from .sampling.logit_bias import LogitBiasError, normalize as normalize_bias
from .sampling.constraints import PinnedConstraint
from .sampling.samplers import checked_impl, sampleable_vocab, set_sampleable_vocab
from .sampling.schedules import MIN_TEMPERATURE, coldest_temperature
from .sampling.thinking import (ThinkingBudget, answer_room, answer_seed, answer_time, closed_thought, thought_reserve,
                                thought_room)

BUNDLED_MODEL = Path(__file__).parent / "recipes" / "sudoku" / "model"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request settings; None takes the checkpoint's generation_config.json value.

    temperature scales the whole temperature schedule (t_min and t_max). seed makes the request
    reproducible: the same prompt, parameters and seed give the same output in the same batch geometry
    (longest prompt, padded KV length), whatever its batch-mates' sampling options; a batch-mate with a
    longer prompt or output changes the geometry, which can move the logits' last bits and so a draw.
    """

    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    seed: int | None = None
    temperature: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    entropy_bound: float | None = None
    top_k: int | None = None  # sample each position from its k most likely tokens (None, 0 or -1: all)
    top_p: float | None = None  # ... from its nucleus of this probability mass (None or 1: all)
    min_p: float | None = None  # ... from tokens at least this share of its most likely one's (None or 0: all)
    frequency_penalty: float | None = None  # in [-2, 2]: minus f x times a token is in the output so far
    presence_penalty: float | None = None  # in [-2, 2]: minus p once a token is in the output so far
    repetition_penalty: float | None = None  # > 0: vLLM's multiplicative penalty on prompt and output tokens
    confidence_threshold: float | None = None
    stability_threshold: int | None = None
    constraint: object | None = None  # a sampling.constraints.CanvasConstraint
    json_schema: dict | None = field(default=None, hash=False)  # JSON-schema output (a dict, its JSON, a pydantic model)
    json_object: bool = False  # JSON mode: the output is one JSON object (sampling.json_any)
    choice: tuple | None = None  # the output is exactly one of these strings (sampling.choice)
    regex: str | None = None  # the output is a whole match of this pattern (sampling.regex)
    grammar: str | None = None  # the output is in this GBNF grammar's language (sampling.grammar)
    stop_token_ids: tuple | None = None  # more ids that end the output, besides the checkpoint's EOS ids
    logit_bias: dict | None = field(default=None, hash=False)  # {token id: bias in [-100, 100]} (OpenAI's)
    min_tokens: int | None = None  # no EOS / stop token id before this many output tokens (vLLM's)
    lora: str | None = None  # the name of a LoRA adapter the LLM was given (`lora_modules`); None: the base
    max_time: float | None = None  # seconds of denoising, then the canvas in progress is the last (DiffusionParams)
    thinking_token_budget: int | None = None  # most tokens in the reply's thought channel (sampling.thinking)
    # vLLM's StructuredOutputsParams (or a dict of its keys): json, regex, choice, grammar, json_object
    structured_outputs: object | None = field(default=None, hash=False)

    def __post_init__(self):
        if self.structured_outputs is not None:
            self._take_structured_outputs()
        if not isinstance(self.json_object, bool):  # a truthy 'no' turned JSON mode on
            raise GenerationError(f"SamplingParams.json_object must be true or false, got {self.json_object!r}")
        try:
            normalize_bias(self.logit_bias, "SamplingParams.logit_bias")
        except LogitBiasError as e:
            raise GenerationError(str(e)) from None
        if self.choice is not None and not isinstance(self.choice, (list, tuple)):  # a str would be its characters
            raise GenerationError(f"SamplingParams.choice must be a list of strings (the outputs allowed), got "
                                  f"{self.choice!r}")
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        schema = self.json_schema
        if isinstance(schema, type) and callable(getattr(schema, "model_json_schema", None)):  # a pydantic model
            object.__setattr__(self, "json_schema", schema.model_json_schema())
        elif isinstance(schema, str):  # the schema's JSON text, as vLLM takes it
            from .sampling.json_schema import json_value

            try:
                object.__setattr__(self, "json_schema", json_value(schema, "SamplingParams.json_schema"))
            except ValueError as e:
                raise GenerationError(str(e)) from None
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise GenerationError("SamplingParams.json_schema must be a JSON schema (a dict, its JSON text or a pydantic "
                                  f"model class), got {type(self.json_schema).__name__}: {self.json_schema!r:.80}")
        c = self.constraint
        if c is not None and not callable(getattr(c, "canvas", None)):
            raise GenerationError("SamplingParams.constraint must be a canvas constraint (sampling.constraints."
                                  f"CanvasConstraint, e.g. PinnedConstraint), got {type(c).__name__}: {c!r:.80}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise GenerationError("SamplingParams.stop_token_ids must be a list of token ids, got "
                                      f"{self.stop_token_ids!r}")
            ids = tuple(self.stop_token_ids)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise GenerationError(f"SamplingParams.stop_token_ids must be non-negative token ids, got {ids!r}")
            object.__setattr__(self, "stop_token_ids", ids)
        if self.min_tokens is not None and (not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool)
                                            or self.min_tokens < 0):
            raise GenerationError(f"SamplingParams.min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        b = self.thinking_token_budget
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 0):
            raise GenerationError(f"SamplingParams.thinking_token_budget must be an integer >= 0, got {b!r}")
        for name in ("max_new_tokens", "max_denoising_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise GenerationError(f"SamplingParams.{name} must be a positive integer, got {v!r}")
        t = self.temperature
        if t is not None and (not isinstance(t, numbers.Real) or isinstance(t, bool) or not 0 < t < math.inf):
            raise GenerationError(f"SamplingParams.temperature must be a finite number > 0, got {self.temperature!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**64):
            raise GenerationError(f"SamplingParams.seed must be an integer in [0, 2**64), got {self.seed!r}")

    def _take_structured_outputs(self) -> None:
        """vLLM's structured_outputs into this class's own fields (json -> json_schema, ...)."""
        so = self.structured_outputs
        if not isinstance(so, dict) and not any(hasattr(so, k) for k in ("json", "regex", "choice", "grammar",
                                                                          "json_object")):
            raise GenerationError("SamplingParams.structured_outputs must be a dict (or vLLM's "
                                  f"StructuredOutputsParams) with json, regex, choice, grammar or json_object, got "
                                  f"{type(so).__name__} {so!r:.80}")
        get = so.get if isinstance(so, dict) else (lambda k, d=None: getattr(so, k, d))
        if isinstance(so, dict):
            unknown = sorted(set(so) - {"json", "regex", "choice", "grammar", "json_object", "disable_fallback",
                                        "disable_additional_properties"})
            if unknown:
                raise GenerationError(f"SamplingParams.structured_outputs: {unknown[0]!r} is not supported (json, "
                                      "regex, choice, grammar, json_object)")
        for key in ("whitespace_pattern", "structural_tag", "disable_any_whitespace"):
            if get(key) not in (None, False):
                raise GenerationError(f"SamplingParams.structured_outputs.{key} is not supported")
        for key, ours in (("json", "json_schema"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar"),
                          ("json_object", "json_object")):
            value = get(key)
            if value in (None, False):
                continue
            if getattr(self, ours) not in (None, False):
                raise GenerationError(f"SamplingParams: structured_outputs.{key} and {ours} both set the output; "
                                      "give one")
            if key == "json":
                from .sampling.json_schema import closed_objects, json_value

                try:
                    value = json_value(value, "SamplingParams.structured_outputs.json")
                except ValueError as e:
                    raise GenerationError(str(e)) from None
                if get("disable_additional_properties"):
                    value = closed_objects(value)
            object.__setattr__(self, ours, tuple(value) if key == "choice" and isinstance(value, list) else value)
        object.__setattr__(self, "structured_outputs", None)  # taken: dataclasses.replace must not take it again

    def resolve(self, defaults: DiffusionParams) -> DiffusionParams:
        p = defaults.replace(max_new_tokens=self.max_new_tokens, max_denoising_steps=self.max_denoising_steps,
                             t_min=self.t_min, t_max=self.t_max, entropy_bound=self.entropy_bound,
                             confidence_threshold=self.confidence_threshold,
                             stability_threshold=self.stability_threshold,
                             top_k=0 if self.top_k == -1 else self.top_k, top_p=self.top_p,  # -1: vLLM's "all"
                             min_p=self.min_p, frequency_penalty=self.frequency_penalty,
                             presence_penalty=self.presence_penalty, repetition_penalty=self.repetition_penalty,
                             max_time=self.max_time)
        big = torch.finfo(torch.float32).max  # a schedule above it is inf in float32: every logit divides to 0
        if self.temperature is not None:
            cold = coldest_temperature(p.t_min, p.t_max, p.max_denoising_steps) * self.temperature
            if cold < MIN_TEMPERATURE:  # (DiffusionParams refuses it too, naming t_max: the temperature did it)
                raise GenerationError(f"SamplingParams.temperature={self.temperature!r} scales the schedule "
                                      f"(t_min {p.t_min}, t_max {p.t_max}) below float32's range: its last step "
                                      f"at {cold:.3g}, under {MIN_TEMPERATURE}; use >= 1e-3 for near-greedy draws")
            if p.t_max * self.temperature > big:
                raise GenerationError(f"SamplingParams.temperature={self.temperature!r} scales the schedule "
                                      f"(t_max {p.t_max}) beyond float32's range")
            p = dataclasses.replace(p, t_min=p.t_min * self.temperature, t_max=p.t_max * self.temperature)
        elif p.t_max > big:
            raise GenerationError(f"SamplingParams.t_max={p.t_max!r} is beyond float32's range")
        return p


@dataclass
class GenerationResult:
    prompt_ids: list
    token_ids: list  # new ids up to and including the first EOS
    text: str
    finish_reason: str  # "stop" (EOS) | "length"
    tokens_per_forward: float
    decoder_passes: int
    tool_calls: list | None = None  # LLM.chat with a tool_choice: [{"id", "type", "function": {name, arguments}}]
    reasoning: str | None = None  # LLM.chat: the reply's thought channel, when it wrote one (canvaslm.reasoning)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    def __init__(self, model_dir: str | Path | None = None, device: str | None = None, dtype=None,
                 progress: bool | None = None, quantization: str | None = None, max_batch: int = 64,
                 lora_modules=None, revision: str | None = None, sampler_impl: str = "auto"):
        """quantization: None (the checkpoint's dtype), "fp8" or "int4" (W4A16), applied while loading.
        max_batch: rows per generation batch; `generate` runs longer prompt lists in batches of this size
        (the KV cache is sized per batch), which changes no output of a seeded request.
        lora_modules: LoRA adapters to serve beside the base ({name: PEFT adapter dir}, or [(name, dir)]);
        a request picks one with `SamplingParams(lora=name)`, and a batch may mix them.
        model_dir: a checkpoint directory, or a Hugging Face repo id (at `revision`) read from the HF cache
        and downloaded when missing (canvaslm.hub); None: the bundled Sudoku model.
        sampler_impl: how denoising steps draw their samples: "auto" (one uniform per position by inverse CDF
        on a CPU, the fused kernels on a GPU) or "reference" (`torch.multinomial`, as `transformers` draws:
        its very tokens for the same seed, at the cost of an exponential per vocabulary entry and position)."""
        self.sampler_impl = checked_impl(sampler_impl, "LLM: sampler_impl", GenerationError)
        adapters = _adapters(lora_modules)  # read (and checked) before the model loads
        self.max_batch = _checked_max_batch(max_batch)
        if model_dir is None and revision is not None:
            raise GenerationError(f"revision {revision!r} needs a model (a Hugging Face repo id); the bundled "
                                  "model has no revisions")
        self.model_dir = resolve_model(model_dir, revision) if model_dir is not None else BUNDLED_MODEL
        self.device = device or default_device()
        self.dtype = parse_dtype(dtype if dtype is not None else default_dtype(self.device, self.model_dir))
        self.model = load_model(self.model_dir, device=self.device, dtype=self.dtype, progress=progress,
                                quantization=quantization)
        self.cfg = self.model.cfg
        self.defaults = DiffusionParams.from_dir(self.model_dir)
        checked_eos_ids(self.defaults, self.cfg)  # checked against the vocabulary once
        self.tokenizer = None
        if (self.model_dir / "tokenizer.json").exists():
            from .tokenizer import Tokenizer
            self.tokenizer = Tokenizer.from_dir(self.model_dir)
        set_sampleable_vocab(self.model, self.tokenizer)  # padded embedding rows are never sampled
        self.loras = _install(self.model, adapters, self.max_batch)

    @classmethod
    def from_model(cls, model, defaults: DiffusionParams | None = None, tokenizer=None, max_batch: int = 64,
                   lora_modules=None, sampler_impl: str = "auto") -> "LLM":
        """An LLM around a model already in memory (built in Python, just trained, random weights for a
        benchmark): no checkpoint is read. `defaults`: the sampler defaults (generation_config.json's
        role; default: DiffusionParams()); `tokenizer`: a canvaslm Tokenizer, or None for token ids."""
        llm = cls.__new__(cls)
        llm.max_batch, llm.model, llm.cfg = _checked_max_batch(max_batch), model, model.cfg
        llm.sampler_impl = checked_impl(sampler_impl, "LLM: sampler_impl", GenerationError)
        llm.model_dir = "the in-memory model (LLM.from_model)"  # only error messages name it
        llm.device, llm.dtype = model.embed_weight.device, model.embed_weight.dtype
        llm.defaults, llm.tokenizer = defaults or DiffusionParams(), tokenizer
        if tokenizer is not None:  # outputs stay within its ids (padded embedding rows are never sampled)
            set_sampleable_vocab(model, tokenizer)
        llm.loras = _install(model, _adapters(lora_modules), llm.max_batch)
        return llm

    @property
    def eos_ids(self) -> tuple:
        return checked_eos_ids(self.defaults, self.cfg)

    @property
    def pad_id(self) -> int:
        p = self.defaults.pad_token_id
        return p if p is not None else (self.cfg.pad_token_id or 0)

    def encode_prompt(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError(f"{self.model_dir} has no tokenizer.json: pass token id lists instead of text")
            return self.tokenizer.encode(prompt)
        if hasattr(prompt, "tolist"):  # a tensor or numpy array
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise GenerationError(f"a prompt is a string or a list of token ids, got {prompt!r}")
        bad = [t for t in prompt if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if bad:
            raise GenerationError(f"prompt token ids must be integers, got {bad[0]!r}")
        return [int(t) for t in prompt]

    @property
    def vision(self):
        """multimodal.Vision: image prompts for this model (the vision tower loads on the first image)."""
        v = getattr(self, "_vision", None)
        if v is None:
            from .multimodal import Vision
            # local paths are allowed anywhere, and of any size (only the pixel limit): the caller is the user's
            # own code, not a remote client
            v = self._vision = Vision(self.model, self.model_dir if isinstance(self.model_dir, Path) else None,
                                      allowed_local_media_path=Path(Path.cwd().anchor), max_file_bytes=None)
        return v

    @property
    def image_placeholder(self) -> str:
        """The text that stands for one image in a prompt (the image token's string)."""
        from .multimodal import image_token_text

        return image_token_text(self.tokenizer, self.cfg)

    def prompt_with_images(self, prompt) -> tuple[list, object | None]:
        """(prompt ids, multimodal.ImageInputs or None). A prompt with images is a dict, as vLLM takes it:
        {"prompt": text or "prompt_token_ids": ids, "multi_modal_data": {"image": an image or a list}} with
        one image token (the tokenizer's <|image|>) where each image goes; an image is a PIL image, bytes,
        a data URL, base64, an http(s) URL or a path (multimodal.Vision.load; bytes and paths of any size, as
        the user's own: only the pixel limit). "mm_processor_kwargs":
        {"max_soft_tokens": 70 | 140 | 280 | 560 | 1120} sets the images' token budget (their resolution);
        "image_details": per image, OpenAI's detail ("low": the smallest budget; what LLM.chat passes on)."""
        if not isinstance(prompt, dict):
            ids = self.encode_prompt(prompt)
            if self.cfg.has_vision and self.cfg.image_token_id in ids:
                raise GenerationError(f"the prompt holds image tokens (id {self.cfg.image_token_id}) but no image "
                                      "was given: pass {'prompt': ..., 'multi_modal_data': {'image': ...}}")
            return ids, None
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs",
                                 "image_details"}
        if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise GenerationError("a prompt dict takes one of 'prompt' (text) and 'prompt_token_ids', and "
                                  f"'multi_modal_data'; got keys {sorted(prompt)}")
        ids = self.encode_prompt(prompt["prompt"] if "prompt" in prompt else prompt["prompt_token_ids"])
        data = prompt.get("multi_modal_data") or {}
        if set(data) - {"image"}:
            raise GenerationError(f"multi_modal_data: only 'image' is supported, got {sorted(data)}")
        images = data.get("image")
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        from .multimodal import ImageError
        try:
            return self.vision.prepare(ids, images, prompt.get("mm_processor_kwargs"), prompt.get("image_details"))
        except ImageError as e:
            raise GenerationError(str(e)) from None

    def decode(self, ids: list) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def rows(self, prompts, params) -> list[RowRequest]:
        return [self._row(p, sp) for p, sp in zip(prompts, _params_list(prompts, params))]

    def _row(self, prompt, sp: SamplingParams) -> RowRequest:
        p, c = sp.resolve(self.defaults), sp.constraint
        prepared = None
        if p.max_length is not None:  # generation_config.json's max_length: a total, so the prompt counts
            prepared = self.prompt_with_images(prompt)
            try:
                p = p.for_prompt(len(prepared[0]))
            except ConfigError as e:
                raise GenerationError(str(e)) from None
        given = [n for n in ("constraint", "json_schema", "json_object", "choice", "regex", "grammar")
                 if getattr(sp, n) not in (None, False)]
        if len(given) > 1:
            raise GenerationError("SamplingParams: set one of constraint, json_schema, json_object, choice, regex, "
                                  f"grammar; got {given}")
        if given and given[0] != "constraint" and self.tokenizer is None:
            raise GenerationError(f"{self.model_dir} has no tokenizer.json, so {given[0]} is not available")
        # one-slot outputs (JSON mode, regex, grammar): all of max_new_tokens but the pinned EOS, or a default
        if sp.max_new_tokens == 1 and given and given[0] in ("json_object", "regex", "grammar"):
            raise GenerationError(f"SamplingParams.max_new_tokens=1 leaves no token for the {given[0]} output (its "
                                  "last token is the EOS); give at least 2")
        slot = sp.max_new_tokens - 1 if sp.max_new_tokens and sp.max_new_tokens > 1 else None
        if sp.json_schema is not None:
            from .sampling.json_schema import JsonSchemaConstraint
            c = JsonSchemaConstraint(sp.json_schema, self.tokenizer)
        if sp.json_object:
            from .sampling.json_any import DEFAULT_TOKENS, JsonObjectConstraint
            c = JsonObjectConstraint(self.tokenizer, slot or DEFAULT_TOKENS, "SamplingParams.json_object")
        if sp.choice is not None:
            from .sampling.choice import ChoiceConstraint
            c = ChoiceConstraint(list(sp.choice), self.tokenizer, "SamplingParams.choice")
        if sp.regex is not None:
            from .sampling.regex import DEFAULT_TOKENS, RegexConstraint
            c = RegexConstraint(sp.regex, self.tokenizer, slot or DEFAULT_TOKENS, "SamplingParams.regex")
        if sp.grammar is not None:
            from .sampling.grammar import GrammarConstraint
            from .sampling.regex import DEFAULT_TOKENS
            c = GrammarConstraint(sp.grammar, self.tokenizer, slot or DEFAULT_TOKENS, "SamplingParams.grammar")
        if c is not None and hasattr(c, "min_new_tokens"):  # the output must reach every constrained offset
            need = c.min_new_tokens(self.cfg.canvas_length)
            if need >= self.cfg.max_position_embeddings:  # e.g. a pin at offset 10**9: no prompt leaves it room
                raise GenerationError(f"the constraint needs {need} output tokens (through its last pinned or "
                                      "constrained offset), past the model's context (max_position_embeddings="
                                      f"{self.cfg.max_position_embeddings}, prompt included)")
            if sp.max_new_tokens is None:
                p = dataclasses.replace(p, max_new_tokens=max(p.max_new_tokens, need))
            elif sp.max_new_tokens < need:
                raise GenerationError(f"SamplingParams.max_new_tokens={sp.max_new_tokens} is below the "
                                      f"{need} tokens the constraint needs")
        eos = self.eos_ids + tuple(t for t in (sp.stop_token_ids or ()) if t not in self.eos_ids)
        bad = [t for t in eos if t >= self.cfg.vocab_size]
        if bad:
            raise GenerationError(f"SamplingParams.stop_token_ids {bad} are outside the vocabulary [0, {self.cfg.vocab_size})")
        if isinstance(c, PinnedConstraint) and self.eos_ids and set(self.eos_ids) <= set(c.ban_ids):
            c = c.banning(eos)  # pins that keep EOS out before their end keep the stop ids out too
            early = c.early_end(eos)  # and so does what they pin (the server's 400 naming pins)
            if early is not None:
                raise GenerationError(f"the pinned id at output offset {early[0]} ends the output (EOS or a "
                                      f"stop_token_ids id), before the last pin ends at {early[1]}")
        try:
            bias = normalize_bias(sp.logit_bias, "SamplingParams.logit_bias", self.cfg.vocab_size)
        except LogitBiasError as e:
            raise GenerationError(str(e)) from None
        if sp.min_tokens and sp.min_tokens > p.max_new_tokens:
            raise GenerationError(f"SamplingParams.min_tokens={sp.min_tokens} is over max_new_tokens={p.max_new_tokens}")
        if sp.min_tokens and c is not None:
            raise GenerationError("SamplingParams.min_tokens cannot be combined with a constraint (it fixes where "
                                  "the output ends)")
        if p.max_time is not None and c is not None and p.max_new_tokens > self.cfg.canvas_length:  # as the server
            raise GenerationError(f"SamplingParams.max_time with a constraint needs max_new_tokens <= "
                                  f"{self.cfg.canvas_length} (one canvas): a spent budget ends the output with the "
                                  "canvas in progress, which could leave what the constraint asks for unfinished")
        # a constrained output writes no thought: its budget is met
        thinking = ThinkingBudget.for_tokenizer(sp.thinking_token_budget, self.tokenizer) if c is None else None
        ids, images = prepared or self.prompt_with_images(prompt)
        return RowRequest(ids, p, eos, self.pad_id, c, bias, sp.min_tokens or 0, self._lora_id(sp.lora), images,
                          thinking)

    def _lora_id(self, name: str | None, field: str = "SamplingParams.lora") -> int:
        if name is None:
            return 0
        if name not in self.loras:
            raise GenerationError(f"{field}={name!r} is not loaded; this LLM has "
                                  f"{sorted(self.loras) or 'no adapters (LLM(lora_modules=...))'}")
        return self.loras[name]

    def generate(self, prompts, params: SamplingParams | list | None = None,
                 generator: torch.Generator | None = None, on_draft=None,
                 attention_mask: torch.Tensor | None = None, use_tqdm: bool | None = None) -> list[GenerationResult]:
        """prompts: a string, a list of token ids, a list of either, or a padded [B, T] id tensor with its
        attention_mask (left or right padding: the padding is dropped, every row starts at position 0).
        With `generator`, the batch shares it (the reference's batch behaviour) and runs as one batch;
        otherwise every request draws from its own seed, and more than `max_batch` prompts run in batches
        of `max_batch` (behind a progress bar unless use_tqdm=False). With `on_draft`, whose states
        index rows of the batch, the list runs as one batch."""
        prompts = _prompt_list(prompts, attention_mask)
        if not prompts:
            return []
        return self._generate_rows(self.rows(prompts, params), [sp.seed for sp in _params_list(prompts, params)],
                                   generator, on_draft, use_tqdm)

    def _generate_rows(self, rows: list[RowRequest], seeds: list, generator=None, on_draft=None,
                       use_tqdm: bool | None = None) -> list[GenerationResult]:
        gens = [self._generator(seed) for seed in seeds] if generator is None else None
        B = self.max_batch
        if generator is not None or on_draft is not None or len(rows) <= B:
            g = generator if generator is not None else (gens[0] if len(gens) == 1 else gens)
            outs = generate_rows(self.model, rows, g, on_draft=on_draft, sampler_impl=self.sampler_impl)
        else:
            # every batch keeps the whole list's geometry, so outputs equal one big batch's bit for bit
            geometry, outs = batch_geometry(rows, self.cfg.canvas_length), []
            with tqdm(total=len(rows), desc="generate", unit="req", disable=use_tqdm is False) as bar:
                for i in range(0, len(rows), B):
                    part, chunk = rows[i:i + B], gens[i:i + B]
                    n = len(part)
                    if n == 1 and B > 1:  # one row runs other kernels (matrix-vector products) than a
                        # batch, and its floats differ: a batch-mate (the row before it again, with a generator of
                        # its own; its output dropped) keeps it a batch, as in the one big batch
                        part, chunk = part + [rows[i - 1]], chunk + [self._generator(seeds[i - 1])]
                    outs += generate_rows(self.model, part, chunk[0] if len(chunk) == 1 else chunk,
                                          geometry=geometry, sampler_impl=self.sampler_impl)[:n]
                    bar.update(n)
        return [GenerationResult(r.prompt_ids, o.token_ids,
                                 self.decode(_shown(o.token_ids, o.finish_reason, r.eos_ids)), o.finish_reason,
                                 o.tokens_per_forward, o.decoder_passes) for r, o in zip(rows, outs)]

    def _thought_first(self, prompts, sps: list, use_tqdm: bool | None = None) -> list[GenerationResult]:
        """`generate` for chat prompts rendered with thinking on: a constrained row (JSON, a forced call, ...)
        thinks first and then answers under its constraint, in two passes as the server runs it
        (server.serving.ThoughtFirst): the thought (prompt + `<|channel>`, free, under its thinking budget,
        ended by `<channel|>`; one cut by its room is closed by one more token), then the answer (prompt + the
        thought, constrained). A prompt that already opens the channel (Gemma 4's generation prompt after a
        tool response) gets no second `<|channel>`: its thought goes on. Rows without a constraint, or without
        room left to think, run as they are."""
        from .reasoning import ThoughtSplitter

        split = ThoughtSplitter.for_tokenizer(self.tokenizer)
        rows, C, limit = self.rows(prompts, sps), self.cfg.canvas_length, self.cfg.max_position_embeddings
        first = {}  # row index -> the thought's row
        lead = {}  # row index -> the `<|channel>` the reply opens ([] when its prompt left the channel open)
        for i, (r, sp) in enumerate(zip(rows, sps)):
            full = r
            if split is not None:  # an output as wide as max_new_tokens is narrowed for a thought
                total = r.params.max_new_tokens
                reserve = thought_reserve(sp.thinking_token_budget, total, r.constraint)
                try:  # narrowed to leave the thought its room; never refused for it (the answer alone then)
                    if reserve:
                        narrow = self._row(prompts[i], dataclasses.replace(sp, max_new_tokens=total - reserve))
                        rows[i] = r = dataclasses.replace(narrow, params=dataclasses.replace(
                            narrow.params, max_new_tokens=total))
                except GenerationError:
                    pass
            c = r.constraint
            room = thought_room(c, r.params.max_new_tokens, len(r.prompt_ids), limit, C)
            # pins count from the reply's start: a pinned reply writes no thought before them
            if c is not None and not isinstance(c, PinnedConstraint) and split is not None and room > 0:
                lead[i] = [] if split.prompt_thought(r.prompt_ids) else [split.open_id]
                first[i] = RowRequest([*r.prompt_ids, *lead[i]],
                                      dataclasses.replace(r.params, max_new_tokens=room), (*r.eos_ids, split.close_id),
                                      r.pad_id, None, r.logit_bias, 0, r.lora, r.images,
                                      ThinkingBudget.for_tokenizer(sp.thinking_token_budget, self.tokenizer))
            else:
                rows[i] = full  # no thought: the output at its full width
        seeds, start = [sp.seed for sp in sps], time.perf_counter()
        thoughts = dict(zip(first, self._generate_rows(list(first.values()), [seeds[i] for i in first],
                                                       use_tqdm=use_tqdm))) if first else {}
        spent = time.perf_counter() - start  # max_time is one budget for the whole reply
        heads, answers = {}, {}  # row index -> (the reply's thought ids, its result); -> the answer's row
        for i, r in enumerate(rows):
            t = thoughts.get(i)
            head = [] if t is None else closed_thought(split.open_id, split.close_id, t.token_ids, t.finish_reason)
            if head is None:  # an EOS inside the thought: the reply ends there
                heads[i] = ([*lead[i], *t.token_ids], t)
                continue
            if t is not None and not lead[i]:  # the prompt holds the opening token
                head = head[1:]
            heads[i] = (head, t)
            answers[i] = r if t is None else dataclasses.replace(r, prompt_ids=[*r.prompt_ids, *head], params=(
                dataclasses.replace(r.params, max_time=answer_time(r.params.max_time, spent),
                                    max_new_tokens=answer_room(r.params.max_new_tokens, len(head), len(r.prompt_ids),
                                                               limit, C))))
        outs = dict(zip(answers, self._generate_rows(
            list(answers.values()), [seeds[i] if i not in thoughts or seeds[i] is None else answer_seed(seeds[i])
                                     for i in answers], use_tqdm=use_tqdm))) if answers else {}
        results = []
        for i, r in enumerate(rows):
            (head, t), a = heads[i], outs.get(i)
            ids, fin = head + (a.token_ids if a is not None else []), a.finish_reason if a else "stop"
            passes = sum(x.decoder_passes for x in (t, a) if x is not None)
            results.append(GenerationResult(r.prompt_ids, ids, self.decode(_shown(ids, fin, r.eos_ids)), fin,
                                            len(ids) / passes if passes else 0.0, passes))
        return results

    def generate_continuous(self, prompts, params: SamplingParams | list | None = None, max_batch: int = 16,
                            max_model_len: int | None = None, prefix_caching: bool | None = None,
                            use_tqdm: bool | None = None, prefill_chunk: int = 512) -> list[GenerationResult]:
        """`generate` through the serving engine (continuous batching): up to `max_batch` requests share
        each encoder and decoder call, and a request that finishes frees its slot for the next prompt at
        once, instead of its batch waiting for its slowest row. Prompts sharing whole prefill chunks
        encode them once (prefix caching). Same prompts, SamplingParams and results as `generate`; each
        output depends only on its prompt, parameters, seed, `max_model_len` (default: what the longest
        request needs) and `prefill_chunk` (the prompt is encoded in chunks of that many tokens), not on
        the other prompts (on the CPU, bit for bit), and for a lone prompt of 16+ tokens that fits one
        chunk it equals `generate`'s. Requests with an `on_draft` or a shared generator need `generate`."""
        import asyncio

        from .engine.engine import Engine, EngineConfig, GenerationRequest

        prompts = _prompt_list(prompts)
        if not prompts:
            return []
        rows = self.rows(prompts, params)
        for r in rows:  # what `generate` checks, before the engine starts
            check_request(r.prompt_ids, r.params.max_new_tokens, self.cfg.vocab_size, self.cfg.max_position_embeddings,
                          self.cfg.canvas_length)
        plist = _params_list(prompts, params)
        C = self.cfg.canvas_length
        need = max(len(r.prompt_ids) + math.ceil(r.params.max_new_tokens / C) * C for r in rows)  # one request's
        max_model_len = max_model_len or need
        if max_model_len < need:
            raise GenerationError(f"generate_continuous: max_model_len={max_model_len} is below the {need} "
                                  "positions the longest request needs")
        depth = max(1, max(r.params.stability_depth for r in rows))
        engine = Engine(self.model, EngineConfig(max_batch=max_batch, max_model_len=max_model_len,
                                                 prefix_caching=prefix_caching, prefill_chunk=prefill_chunk,
                                                 sampler_impl=self.sampler_impl),
                        history_depth=depth).start()
        seeds = [sp.seed if sp.seed is not None else random.randrange(2**62) for sp in plist]

        async def run():
            with tqdm(total=len(rows), desc="generate", unit="req",
                      disable=not (use_tqdm if use_tqdm is not None else len(rows) > max_batch)) as bar:
                async def one(i, r, seed):
                    out = await engine.run(GenerationRequest.from_row(f"g{i}", r, seed))
                    bar.update(1)
                    return out
                return await asyncio.gather(*(one(i, r, seed) for i, (r, seed) in enumerate(zip(rows, seeds))))

        try:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop here: the usual case
                outs = asyncio.run(run())
            else:  # called from a running loop (a notebook, an async app): run ours on a thread of its own
                import concurrent.futures

                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    outs = pool.submit(asyncio.run, run()).result()
        finally:
            engine.shutdown()
        results = []
        for r, (tokens, fin) in zip(rows, outs):
            if fin.reason not in ("stop", "length"):
                raise GenerationError(f"generate_continuous: a request ended with {fin.reason}: {fin.message}")
            results.append(GenerationResult(r.prompt_ids, tokens, self.decode(_shown(tokens, fin.reason, r.eos_ids)),
                                            fin.reason,
                                            len(tokens) / fin.decoder_passes if fin.decoder_passes else 0.0,
                                            fin.decoder_passes))
        return results

    def chat(self, messages: list, params: SamplingParams | list | None = None, tools: list | None = None,
             tool_choice=None, continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             **kw) -> GenerationResult | list[GenerationResult]:
        """A reply to `messages` through the chat template. `tools` (OpenAI function declarations) are
        rendered by the template; with tool_choice "required" (the model picks one of the tools) or
        {"type": "function", "function": {"name": ...}} the reply is a call whose arguments always
        parse and fit the function's parameter schema, in `tool_calls` (the server's tool calls, the
        same constraints). With "auto" the model writes freely and calls in its own syntax are read out
        of its tokens into `tool_calls` (`text` keeps the rest; the tokenizer needs the native call
        tokens). tool_choice None leaves the whole reply as text; "none" also leaves the declarations
        out of the prompt. A thought channel (thinking mode) goes to `reasoning`; with thinking on
        (chat_template_kwargs enable_thinking) a constrained reply (a JSON schema, a forced call, ...) thinks
        first, then answers under its constraint (`_thought_first`). continue_final_message:
        the last message is the start of the assistant's reply, which the model goes on with (the result
        holds only the continuation); chat_template_kwargs: more variables for the template (e.g.
        enable_thinking). `messages` may also be a list of conversations (vLLM's LLM.chat): they run as
        one batch (`params` one for all or one per conversation) and a list of results comes back."""
        if self.tokenizer is None:
            raise GenerationError(f"{self.model_dir} has no tokenizer.json, so chat is not available")
        import uuid

        from .tokenizer import TEMPLATE_RESERVED, tool_arguments_as_objects

        batch = bool(messages) and isinstance(messages[0], (list, tuple))
        shown = tools if tools and tool_choice != "none" else None
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise GenerationError(f"chat: chat_template_kwargs must be a dict, got {chat_template_kwargs!r:.80}")
        clash = sorted(TEMPLATE_RESERVED & set(chat_template_kwargs or {}))
        if clash:
            own = {"add_generation_prompt": "continue_final_message= (True: no generation prompt)"}
            raise GenerationError(f"chat: chat_template_kwargs may not set {clash[0]!r}; use LLM.chat's "
                                  f"{own.get(clash[0], clash[0] + '=')}")
        from .multimodal import image_parts_to_placeholders

        prompts = []
        for k, conversation in enumerate(messages if batch else [messages]):
            try:
                details = []
                conversation, images = image_parts_to_placeholders(list(conversation), self.image_placeholder,
                                                                   details)
                ids = self.tokenizer.encode_chat(
                    tool_arguments_as_objects(conversation), not continue_final_message, tools=shown,
                    continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
            except ValueError as e:
                raise GenerationError(f"chat{f' (conversation {k})' if batch else ''}: {e}") from None
            prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}, "image_details": details}
                           if images else ids)
        sps = _params_list(prompts, params)
        thinking = {**self.tokenizer.template_defaults, **(chat_template_kwargs or {})}.get("enable_thinking")
        if thinking and not continue_final_message and not (kw.get("generator") or kw.get("on_draft")):
            def generate(ps, ss):  # a constrained reply thinks first, then answers under its constraint
                return self._thought_first(ps, ss, kw.get("use_tqdm"))
        else:
            def generate(ps, ss):
                return self.generate(ps, ss, **kw)

        def calls(pairs):
            return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                     "function": {"name": n, "arguments": a}} for n, a in pairs]

        if tool_choice in (None, "none"):
            outs = [self._without_thought(r, sp)[0] for r, sp in zip(generate(prompts, sps), sps)]
        elif tool_choice == "auto":
            from .tool_parser import CALL_OPEN, NativeToolParser, response_stop_ids

            names = [t["function"].get("name") for t in tools or ()
                     if isinstance(t, dict) and isinstance(t.get("function"), dict)]
            parser = NativeToolParser.for_tokenizer(self.tokenizer, names)
            if parser is None:
                raise GenerationError(f"tool_choice 'auto' reads calls in the model's own syntax ({CALL_OPEN}...), "
                                      "and this tokenizer has no such tokens: pass 'required', name the function, "
                                      "or leave it None for text")
            stops = response_stop_ids(self.tokenizer)
            sps = [dataclasses.replace(sp, stop_token_ids=tuple(sp.stop_token_ids or ()) + stops) for sp in sps]
            outs = []
            for r, sp in zip(generate(prompts, sps), sps):
                res, content = self._without_thought(r, sp)
                text, found, _ = parser.split(content, final=True)
                if found:
                    res.text, res.tool_calls = text, calls(found)
                outs.append(res)
        else:
            from .sampling.tool_call import call_arguments, call_constraint

            constraint, forced = call_constraint(tools, tool_choice, self.tokenizer)
            outs = [self._without_thought(r, sp)[0]
                    for r, sp in zip(generate(prompts, [dataclasses.replace(sp, constraint=constraint) for sp in sps]),
                                     sps)]
            for res in outs:
                try:
                    names = constraint.names if forced is None else []  # the model picked among the constraint's
                    res.tool_calls = calls([call_arguments(res.text, names, forced)])
                except ValueError:  # cut by max_new_tokens: no whole call
                    pass
        return outs if batch else outs[0]

    def _without_thought(self, res: GenerationResult, sp: SamplingParams | None = None
                         ) -> tuple[GenerationResult, list]:
        """A chat reply with its thought channel (canvaslm.reasoning) moved from `text` to `reasoning`, and
        the ids outside it that the text shows (what tool calls are read from; without the EOS or stop token
        that ended the reply). A thought the prompt left open is the reply's, as the server reads it."""
        from .reasoning import ThoughtSplitter

        splitter = ThoughtSplitter.for_tokenizer(self.tokenizer)
        content, thought = (splitter.answer(res.token_ids, res.prompt_ids) if splitter is not None
                            else (list(res.token_ids), None))
        stops = self.eos_ids + tuple((sp.stop_token_ids if sp is not None else None) or ())
        content = _shown(content, res.finish_reason, stops)
        if thought is not None:
            res.text, res.reasoning = self.decode(content), thought
        return res, content

    def infill(self, prefix: str, suffix: str, params: SamplingParams | None = None, gaps=None):
        """Generate the text between prefix and suffix (see canvaslm.infill). gaps: the middle lengths (tokens) to
        try, a list or one int (default: powers of two up to what max_new_tokens leaves). With max_time, every
        candidate (middle, suffix, EOS) must fit one canvas. -> InfillResult."""
        from .infill import infill
        return infill(self, prefix, suffix, params, gaps)

    def edit(self, text: str, start: int, end: int, params: SamplingParams | None = None, gaps=None):
        """Regenerate text[start:end], keeping both sides exactly (see canvaslm.infill). -> InfillResult."""
        from .infill import edit
        return edit(self, text, start, end, params, gaps)

    def loglikelihood(self, requests: list, batch_size: int = 16, use_tqdm: bool | None = None) -> list:
        """lm-evaluation-harness's `loglikelihood`: for each (context, continuation), texts or token id
        lists, the summed log-probability of the continuation after the context and whether it is the
        greedy continuation, under the encoder's causal pass (DiffusionGemma's encoder is trained with a
        next-token loss). A text context is encoded like a prompt (with BOS), a text continuation without
        special tokens. -> [(float, bool)], in order."""
        pairs = []
        for i, req in enumerate(requests):
            if not isinstance(req, (tuple, list)) or len(req) != 2:
                raise GenerationError(f"loglikelihood: requests[{i}] must be a (context, continuation) pair")
            ctx, cont = req
            cont_ids = (self.tokenizer.encode(cont, add_special_tokens=False) if isinstance(cont, str)
                        and self.tokenizer is not None else self.encode_prompt(cont))
            pairs.append((self.encode_prompt(ctx), cont_ids))
        return self._scored(pairs, batch_size, use_tqdm, "loglikelihood")

    def loglikelihood_rolling(self, texts: list, batch_size: int = 16, use_tqdm: bool | None = None) -> list:
        """lm-evaluation-harness's `loglikelihood_rolling`: the summed log-probability of each whole text
        (every token after BOS), as for perplexity; `texts`: a text (or token id list) or a list of them. Texts
        must fit max_position_embeddings. -> [float], one per text."""
        pairs = []
        for i, text in enumerate(_prompt_list(texts)):  # a lone text (or id list) is one, as `embed` takes it
            ids = self.encode_prompt(text)
            if len(ids) < 2:
                raise GenerationError(f"loglikelihood_rolling: texts[{i}] has no token after the first")
            pairs.append((ids[:1], ids[1:]))
        return [lp for lp, _ in self._scored(pairs, batch_size, use_tqdm, "loglikelihood_rolling")]

    def embed(self, texts, pooling: str = "mean", normalize: bool = True, batch_size: int = 16,
              lora: str | None = None) -> torch.Tensor:
        """Embeddings of texts (or token id lists) from the encoder's final hidden states: the mean over
        each text's tokens, BOS included (`pooling="mean"`), or its last token's (`"last"`),
        L2-normalised unless `normalize=False`; `lora` names an adapter to embed with. -> float32 [N, d]."""
        from .lora_serving import with_adapter
        from .scoring import embed_rows

        seqs = [self.encode_prompt(t) for t in _prompt_list(texts)]
        limit = self.cfg.max_position_embeddings
        for i, ids in enumerate(seqs):
            if not ids or len(ids) > limit:
                raise GenerationError(f"embed: texts[{i}] has {len(ids)} tokens; expected 1..{limit}")
            check_in_vocab(ids, self.cfg.vocab_size, f"embed: texts[{i}]")
        _check_batch_size(batch_size, "embed")
        if not seqs:
            return torch.empty(0, self.cfg.hidden_size)
        adapter = self._lora_id(lora, "embed: lora")
        try:
            return with_adapter(self.model, adapter, lambda m: embed_rows(m, seqs, pooling, normalize, batch_size))
        except ValueError as e:
            raise GenerationError(f"embed: {e}") from None

    def _scored(self, pairs, batch_size, use_tqdm, what):
        from .scoring import loglikelihoods

        limit = self.cfg.max_position_embeddings
        vocab = sampleable_vocab(self.model) or self.cfg.vocab_size  # a padded embedding's extra rows score -inf
        for i, (ctx, cont) in enumerate(pairs):
            check_in_vocab([*ctx, *cont], vocab, f"{what}: request {i}")
            if len(ctx) + len(cont) > limit:
                raise GenerationError(f"{what}: request {i} has {len(ctx) + len(cont)} tokens, over the model's "
                                      f"max_position_embeddings={limit}")
        _check_batch_size(batch_size, what)
        show = use_tqdm if use_tqdm is not None else len(pairs) > batch_size
        with tqdm(total=len(pairs), desc=what, disable=not show) as bar:
            try:
                return loglikelihoods(self.model, pairs, batch_size, bar.update)
            except ValueError as e:
                raise GenerationError(str(e)) from None

    def _generator(self, seed: int | None) -> torch.Generator:
        return seeded_generator(seed if seed is not None else random.randrange(2**63), self.device)


def _adapters(lora_modules) -> list:
    if not lora_modules:
        return []
    from .lora_serving import AdapterError, adapters_from

    try:
        return adapters_from(lora_modules)
    except AdapterError as e:
        raise GenerationError(f"LLM(lora_modules=...): {e}") from None


def _install(model, adapters: list, num_slots: int) -> dict:
    """Serve `adapters` on the model -> {name: adapter id}."""
    if not adapters:
        return {}
    from .lora_serving import AdapterError, install

    try:
        return dict(install(model, adapters, num_slots).ids)
    except AdapterError as e:
        raise GenerationError(f"LLM(lora_modules=...): {e}") from None


def _checked_max_batch(max_batch) -> int:
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise GenerationError(f"LLM(max_batch={max_batch!r}): expected an int >= 1")
    return max_batch


def _check_batch_size(batch_size, what: str) -> None:
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise GenerationError(f"{what}: batch_size must be an integer >= 1, got {batch_size!r}")


def _prompt_list(prompts, attention_mask: torch.Tensor | None = None) -> list:
    """A string, a list of token ids (or a 1-D tensor), a list of either, or a padded [B, T] id tensor (with
    its attention_mask) -> a list of prompts."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        return unpad(prompts, attention_mask)
    if getattr(prompts, "ndim", None) == 0 or isinstance(prompts, (numbers.Number, bytes)) or \
            not hasattr(prompts, "__iter__"):
        raise GenerationError(f"prompts must be a string, a list of token ids, a prompt dict or a list of these, "
                              f"got {type(prompts).__name__} {prompts!r:.80}")
    single = (isinstance(prompts, (str, dict)) or getattr(prompts, "ndim", None) == 1
              or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], numbers.Number)))
    return [prompts] if single else list(prompts)


def _shown(ids: list, finish_reason: str, stop_ids) -> list:
    """The ids a result's text shows: the EOS or stop token that ended it is left out (vLLM's text; the id
    stays in token_ids)."""
    return ids[:-1] if finish_reason == "stop" and ids and ids[-1] in stop_ids else ids


def _params_list(prompts: list, params) -> list:
    """One SamplingParams per prompt: a list as given (its length checked), else `params` for all."""
    if isinstance(params, SamplingParams) or params is None:
        return [params or SamplingParams()] * len(prompts)
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
        raise GenerationError(f"params must be a SamplingParams or a list of them (one per prompt), got {params!r}")
    if len(params) != len(prompts):
        raise GenerationError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
    return list(params)


def unpad(ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Rows of a padded [B, T] batch without their padding (mask 1 = token, 0 = padding, either side)."""
    if attention_mask is None:
        return ids.tolist()
    if attention_mask.shape != ids.shape:
        raise GenerationError(f"attention_mask shape {tuple(attention_mask.shape)} does not match the "
                              f"input ids shape {tuple(ids.shape)}")
    rows = []
    for b, (row, keep) in enumerate(zip(ids.tolist(), attention_mask.bool().tolist())):
        kept = [t for t, k in zip(row, keep) if k]
        first = keep.index(True) if kept else 0
        if kept and not all(keep[first:first + len(kept)]):
            raise GenerationError(f"attention_mask row {b} has padding in the middle of the prompt")
        rows.append(kept)
    return rows
