"""Infilling and region editing by pinning: the model writes a middle between a fixed prefix and suffix.

The prefix goes to the encoder (it is the prompt); the suffix is pinned on the output canvas right
after a gap of g free positions, followed by a pinned EOS. The middle's length is unknown, so several
gap lengths are tried as rows of one batch (one generation pass), and the candidate whose
middle + suffix the model finds most likely wins: the mean per-token log-probability under the
encoder's causal (autoregressive) pass, one batched encoder call (with no suffix: middle + the EOS that
ends the text, so that an empty middle is scored too). Free middle positions never take
EOS, padding or other special tokens, so the output always reads prefix + middle + suffix. With a latency
budget (max_time), a candidate the budget ends inside its middle is left out (not scored, not returned); the
first canvas is always committed, so the shortest middle must fit one canvas (else the call is refused).

Region editing is infilling with prefix = text[:start] and suffix = text[end:]; by default the new span
keeps the old span's token count (pass `gaps` to let it grow or shrink).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch

from .config import ConfigError
from .generate import GenerationError, RowRequest, check_in_vocab, generate_rows
from .lora_serving import with_adapter
from .scoring import score_continuations  # noqa: F401 - re-exported: infill picks middles by it
from .sampling.constraints import PinnedConstraint
from .sampling.logit_bias import LogitBiasError, normalize as normalize_bias
from .sampling.token_dfa import Vocab

@dataclass
class InfillResult:
    prefix: str
    middle: str
    suffix: str
    text: str  # prefix + middle + suffix
    middle_ids: list
    gap: int  # tokens in the chosen middle
    scores: dict  # gap -> mean log-prob per token of middle + suffix (higher is better; middles max_time cut: none)
    decoder_passes: int  # over all candidates


def default_gaps(max_middle: int) -> tuple:
    """Powers of two from 2 up to the largest middle the token budget allows, plus that budget itself
    (a middle may use all of `max_tokens`: a function body is often longer than the last power of two)."""
    gaps, g = [], 2
    while g <= max_middle:
        gaps.append(g)
        g *= 2
    if max(1, max_middle) not in gaps:
        gaps.append(max(1, max_middle))
    return tuple(gaps)


def checked_gaps(gaps, max_new_tokens: int, n_suffix: int, budget_given: bool = True) -> list:
    """The gap lengths to try: `gaps` (validated: an iterable of non-negative ints, or one int for a single gap) or
    `default_gaps` of what the token budget leaves. Every candidate (middle, suffix, EOS) must fit
    max_new_tokens when the caller gave it (`budget_given`)."""
    need = n_suffix + 1  # the suffix and its EOS
    if _is_int(gaps):  # one gap length
        gaps = (gaps,)
    elif gaps is not None and (isinstance(gaps, (str, bytes)) or not hasattr(gaps, "__iter__")):
        raise GenerationError(f"infill: gaps must be a list of non-negative integers (middle lengths in tokens) or "
                              f"one such integer, got {type(gaps).__name__} {gaps!r}")
    if gaps is None:
        if max_new_tokens - need < 1:
            raise GenerationError(f"infill: max_new_tokens={max_new_tokens} leaves no room for a middle: the suffix "
                                  f"and its EOS take {need} tokens (raise it to at least {need + 1})")
        gaps = default_gaps(max_new_tokens - need)
    gaps = list(gaps)
    if not gaps or any(not _is_int(g) or g < 0 for g in gaps):
        raise GenerationError(f"infill: gaps must be non-negative integers, got {gaps}")
    gaps = sorted({int(g) for g in gaps})
    if budget_given and gaps[-1] + need > max_new_tokens:
        raise GenerationError(f"infill: a middle of {gaps[-1]} tokens, the suffix and its EOS need {gaps[-1] + need} "
                              f"tokens, over max_new_tokens={max_new_tokens}")
    return gaps


def _is_int(v) -> bool:
    """An integer (numpy's and 0-d tensors' too, as prompts take them), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) or (
        isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point() and v.dtype != torch.bool)


def candidates(base, suffix_ids: list, gaps: list, eos_ids, pad_id: int, tokenizer=None) -> list:
    """One (params, constraint) per gap: `g` free middle positions (no EOS, padding or special tokens: the
    middle is text), then the suffix and an EOS pinned."""
    banned = set(eos_ids) | {pad_id}
    if tokenizer is not None:  # special tokens would decode to nothing
        banned |= set(Vocab.of(tokenizer).special_ids)
    banned = tuple(sorted(banned))
    return [(dataclasses.replace(base, max_new_tokens=g + len(suffix_ids) + 1),
             PinnedConstraint({g: list(suffix_ids) + [eos_ids[0]]}, ban_ids=banned, ban_until=g)) for g in gaps]


def check_time_budget(max_time, gaps: list, canvas: int, error=GenerationError):
    """`error` naming max_time when a latency budget is set and even the shortest middle is longer than a canvas.
    A spent budget ends a candidate with the canvas in progress: one whose middle lies within the canvases
    committed by then keeps it whole (the suffix after it is pinned: it reads as given), a longer one is cut and
    left out (`whole`); the first canvas is always committed, so a middle within it always comes back (as pins
    with max_time are refused past one canvas)."""
    if max_time is not None and min(gaps) > canvas:
        raise error(f"infill: max_time needs a middle length within one canvas of {canvas} tokens, but the shortest "
                    f"asked for is {min(gaps)}: a spent budget would end every candidate inside its middle. Add a "
                    "shorter middle length (gaps) or drop max_time")


def whole(lengths: list, gaps: list) -> list:
    """Indices of the candidates whose committed output (`lengths` tokens) holds all of their middle (`gaps`):
    a spent max_time ends a candidate with the canvas in progress, and one that ended inside its middle holds a
    cut middle that would read as complete before the suffix, so it is not scored or returned."""
    return [i for i, (n, g) in enumerate(zip(lengths, gaps)) if n >= g]


def scored_part(middle: list, suffix_ids: list, eos_id: int) -> list:
    """What a candidate is scored on: its middle and the suffix; with no suffix, its middle and the EOS pinned after
    it (the candidate says the text ends there: without it an empty middle scores nothing, a mean of 0.0 that
    beats every real middle)."""
    return list(middle) + (list(suffix_ids) if suffix_ids else [eos_id])


def best(gaps: list, scores: list) -> int:
    """Index of the winning candidate: the highest mean log-prob of middle + suffix (the shortest gap on a tie)."""
    return max(range(len(gaps)), key=lambda i: scores[i])


def infill_ids(llm, prompt_ids: list, suffix_ids: list, params=None, gaps=None) -> tuple:
    """Token-level infill. -> (best gap, middle ids, scores {gap: score}, decoder passes)."""
    from .llm import SamplingParams

    sp = SamplingParams() if params is None else params
    if not isinstance(sp, SamplingParams):
        raise GenerationError(f"infill: params must be a SamplingParams, got {type(sp).__name__}")
    # each candidate's output is pinned to its gap, the suffix and EOS: fields that shape the output otherwise
    given = [n for n in ("constraint", "json_schema", "json_object", "choice", "regex", "grammar", "stop_token_ids",
                         "min_tokens") if getattr(sp, n, None) not in (None, False, 0, ())]
    if given:
        raise GenerationError(f"infill: SamplingParams.{given[0]} cannot be combined with infilling (the middle is "
                              "pinned between the prefix and the suffix)")
    if not isinstance(suffix_ids, (list, tuple)):
        raise GenerationError(f"infill: suffix ids must be a list of token ids, got {type(suffix_ids).__name__}")
    check_in_vocab(list(suffix_ids), llm.cfg.vocab_size, "infill: suffix")
    try:  # generation_config.json's max_length: a total, so the prompt counts (as LLM.generate reads it)
        base = sp.resolve(llm.defaults).for_prompt(len(prompt_ids))
    except ConfigError as e:
        raise GenerationError(f"infill: {e}") from None
    eos = llm.eos_ids
    gaps = checked_gaps(gaps, base.max_new_tokens, len(suffix_ids), sp.max_new_tokens is not None)
    check_time_budget(base.max_time, gaps, llm.cfg.canvas_length)
    try:
        bias = normalize_bias(sp.logit_bias, "SamplingParams.logit_bias", llm.cfg.vocab_size)
    except LogitBiasError as e:
        raise GenerationError(f"infill: {e}") from None
    lora = llm._lora_id(sp.lora)
    rows = [RowRequest(list(prompt_ids), p, eos, llm.pad_id, pins, bias, lora=lora)
            for p, pins in candidates(base, suffix_ids, gaps, eos, llm.pad_id, llm.tokenizer)]
    seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, ()).item())
    gens = [llm._generator((seed + i) % 2**63) for i in range(len(rows))]  # as the server's candidates (int64)
    outs = generate_rows(llm.model, rows, gens, sampler_impl=llm.sampler_impl)
    passes = sum(o.decoder_passes for o in outs)
    keep = whole([len(o.token_ids) for o in outs], gaps)  # all but middles a spent max_time cut (check_time_budget)
    gaps, middles = [gaps[i] for i in keep], [outs[i].token_ids[:gaps[i]] for i in keep]
    scores = with_adapter(llm.model, lora,  # ranked by the model that wrote them
                          lambda m: score_continuations(m, prompt_ids, [scored_part(mid, suffix_ids, eos[0])
                                                                        for mid in middles]))
    i = best(gaps, scores)
    return gaps[i], middles[i], dict(zip(gaps, scores)), passes


def middle_text(tokenizer, prompt_ids: list, middle_ids: list) -> str:
    """The middle's text as it reads after the prompt (a token may start with a space or join the prompt)."""
    head = tokenizer.decode(prompt_ids)
    both = tokenizer.decode(list(prompt_ids) + list(middle_ids))
    return both[len(head):] if both.startswith(head) else tokenizer.decode(middle_ids)


def infill(llm, prefix: str, suffix: str, params=None, gaps=None) -> InfillResult:
    """Generate the text between `prefix` and `suffix`."""
    for name, v in (("prefix", prefix), ("suffix", suffix)):
        if not isinstance(v, str):
            raise GenerationError(f"infill: {name} must be a string (\"\" for none), got {type(v).__name__}")
    tok = llm.tokenizer
    if tok is None:
        raise GenerationError(f"{llm.model_dir} has no tokenizer.json: use infill_ids with token ids")
    prompt = tok.encode(prefix) if prefix else []
    if not prompt:
        if tok.bos_id is None:
            raise GenerationError("infill: the prefix is empty and the tokenizer has no BOS token to start from")
        prompt = [tok.bos_id]
    suffix_ids = tok.encode(suffix, add_special_tokens=False) if suffix else []
    gap, mid, scores, passes = infill_ids(llm, prompt, suffix_ids, params, gaps)
    middle = middle_text(tok, prompt, mid)
    return InfillResult(prefix, middle, suffix, prefix + middle + suffix, mid, gap, scores, passes)


def edit(llm, text: str, start: int, end: int, params=None, gaps=None) -> InfillResult:
    """Regenerate text[start:end] with both sides as context; both sides come back unchanged."""
    if not isinstance(text, str):
        raise GenerationError(f"edit: text must be a string, got {type(text).__name__}")
    for name, v in (("start", start), ("end", end)):
        if not _is_int(v):
            raise GenerationError(f"edit: {name} must be an integer (a character offset), got {type(v).__name__} "
                                  f"{v!r}")
    start, end = int(start), int(end)
    if not 0 <= start <= end <= len(text):
        raise GenerationError(f"edit: span [{start}, {end}) must lie within the text (length {len(text)})")
    if llm.tokenizer is None:
        raise GenerationError(f"{llm.model_dir} has no tokenizer.json: use infill_ids with token ids")
    if gaps is None:
        old = llm.tokenizer.encode(text[start:end], add_special_tokens=False) if end > start else []
        gaps = (max(1, len(old)),)
    return infill(llm, text[:start], text[end:], params, gaps)
