"""Choice output: the text is exactly one of a list of strings (classification, yes/no, labels).

One value slot as wide as the longest choice's tokens accepts each choice's tokens followed by EOS up
to the slot's end, then a pinned EOS: the sampler can only write a whole choice, and the output is cut
at the first EOS, so its text is that choice. The model picks which (the slot's most likely valid
sequence at commit). vLLM users know this as `guided_choice`.
"""

from __future__ import annotations

from .constraints import ConstraintError, OneSlotConstraint, output_eos
from .token_dfa import Vocab, literal_dfa

MAX_CHOICES = 256


class ChoiceConstraint(OneSlotConstraint):
    def __init__(self, choices, tokenizer, field: str = "choice"):
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConstraintError(f"{field} must be a non-empty list of strings")
        if len(choices) > MAX_CHOICES:
            raise ConstraintError(f"{field}: {len(choices)} choices is over the limit of {MAX_CHOICES}")
        for i, c in enumerate(choices):
            if not isinstance(c, str) or not c.strip():
                raise ConstraintError(f"{field}[{i}] must be a non-empty string, got {c!r}")
        if len(set(choices)) != len(choices):
            twice = next(i for i, c in enumerate(choices) if c in choices[:i])
            raise ConstraintError(f"{field} lists a choice twice: {field}[{twice}] = {choices[twice]!r} is "
                                  f"{field}[{choices.index(choices[twice])}]")
        eos = output_eos(tokenizer, field)
        self.vocab, self.choices = Vocab.of(tokenizer), list(choices)
        ids = []
        for i, c in enumerate(choices):
            try:
                ids.append(self.vocab.encode(c))
            except ConstraintError as e:
                raise ConstraintError(f"{field}[{i}]: {e}") from None
        width = max(len(a) for a in ids)
        self.alternatives = [a + [eos] * (width - len(a)) for a in ids]  # [width] each
        try:
            dfa = literal_dfa(self.vocab, self.alternatives, what="choices'", hint="use fewer or shorter choices")
        except ConstraintError as e:
            raise ConstraintError(f"{field}: {e}") from None
        super().__init__(dfa, width, eos)


__all__ = ["ChoiceConstraint", "MAX_CHOICES"]
