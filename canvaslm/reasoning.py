"""Thinking in the model's own syntax (Gemma 4's; DiffusionGemma has Gemma 4's vocabulary and thinking
mode): a reply may open with a thought channel, `<|channel>thought\\n...<channel|>`, and then give its
answer. `<|channel>` and `<channel|>` are single special tokens; `thought\\n` is the channel's label.
The 26B-A4B Gemma 4 writes an empty channel even with thinking off, so a plain decode (which drops the
special tokens) would leave `thought` at the head of every answer.

`ThoughtSplitter` splits generated ids into the thought and the rest: the answer's text, what tool calls
are read from, what stop strings apply to. A channel that is still open holds everything after it (the
model is thinking, or was cut by max_tokens while thinking). Thinking is turned on by the chat template
(`chat_template_kwargs: {"enable_thinking": true}` renders its `<|think|>` system token); the splitter
only reads what came out. A prompt may leave a channel open (a prefilled thought, a generation prompt that
opens it); only one in the prompt's last turn, the model's, counts (`Turns`): a user's message may hold
the text `<|channel>`, which tokenizers read as the special token. No torch dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
THOUGHT_LABEL = "thought\n"
TURN_STARTS = ("<|turn>", "<start_of_turn>")  # Gemma 4's and Gemma 3's (the test checkpoints')
MODEL_ROLE = "model"  # the role a turn start names for the model's turns (`<|turn>model\n`)


@dataclass(frozen=True)
class Split:
    thought: list | None  # ids inside the channel (None: the reply opened none)
    content: list  # ids before the channel and after it
    closed: bool  # the channel was closed (False while it is open, or when there is none)
    span: tuple = (0, 0)  # where the channel is in the ids, its markers included: [start, end)


@dataclass(frozen=True)
class Turns:
    """How a vocabulary marks chat turns: the ids that start one and the ids the model's role is written with
    after them (with and without the header's newline, in case a tokenizer merges the two)."""
    starts: frozenset
    model: tuple  # of id tuples

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "Turns | None":
        """None when the vocabulary has none of TURN_STARTS (prompts are then read whole)."""
        starts, model = set(), set()
        for name in TURN_STARTS:
            try:
                start = tokenizer.token_to_id(name)
            except (KeyError, AttributeError):
                continue
            starts.add(start)
            for header in (name + MODEL_ROLE, name + MODEL_ROLE + "\n"):
                ids = list(tokenizer.encode(header, add_special_tokens=False))
                if len(ids) > 1 and ids[0] == start:  # the role as it is tokenized after the start
                    model.add(tuple(ids[1:]))
        return cls(frozenset(starts), tuple(sorted(model))) if starts and model else None

    def reply_start(self, ids) -> int:
        """Where in `ids` a channel may open: after the start of their last turn when it is the model's,
        len(ids) (nowhere) when it is another role's, 0 (anywhere) when `ids` have no turn (a raw prompt)."""
        last = next((i for i in range(len(ids) - 1, -1, -1) if ids[i] in self.starts), None)
        if last is None:
            return 0
        after = tuple(ids[last + 1:])
        return last + 1 if any(after[:len(m)] == m for m in self.model) else len(ids)


def open_channel(ids, open_id: int, close_id: int, turns: Turns | None = None) -> int | None:
    """Where the channel that `ids` leave open starts (the index of its `<|channel>`), or None: a prompt
    that ends inside a thought (a prefilled reply; a generation prompt that opens the channel) has one.
    With `turns`, only a channel in the prompt's last turn, the model's, counts: a `<|channel>` in an earlier
    turn (a user's message quoting it) opens nothing."""
    ids = list(ids)
    first = turns.reply_start(ids) if turns is not None else 0
    opens = [i for i in range(first, len(ids)) if ids[i] == open_id]
    if opens and close_id not in ids[opens[-1] + 1:]:
        return opens[-1]
    return None


class ThoughtSplitter:
    """`for_tokenizer` gives None when the tokenizer lacks the channel tokens (the checkpoint has no
    thought channel to read)."""

    def __init__(self, tokenizer, open_id: int, close_id: int, turns: Turns | None = None):
        self.tokenizer, self.open_id, self.close_id, self.turns = tokenizer, open_id, close_id, turns

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ThoughtSplitter | None":
        if tokenizer is None:
            return None
        try:
            open_id, close_id = tokenizer.token_to_id(CHANNEL_OPEN), tokenizer.token_to_id(CHANNEL_CLOSE)
        except (KeyError, AttributeError):
            return None
        return cls(tokenizer, open_id, close_id, Turns.for_tokenizer(tokenizer))

    def split(self, ids) -> Split:
        ids = list(ids)
        if self.open_id not in ids:
            return Split(None, ids, False)
        start = ids.index(self.open_id)
        end = next((k for k in range(start + 1, len(ids)) if ids[k] == self.close_id), None)
        if end is None:
            return Split(ids[start + 1:], ids[:start], False, (start, len(ids)))
        return Split(ids[start + 1:end], ids[:start] + ids[end + 1:], True, (start, end + 1))

    def answer(self, ids, prompt_ids=()) -> tuple[list, str | None]:
        """(the ids outside the channel, the thought's text, or None when the reply has no channel) of a
        finished reply. A thought `prompt_ids` leave open (a prefilled reply; a generation prompt that opens
        the channel) is the reply's: it is read with `ids`, and its text already in the prompt is left out."""
        head = self.prompt_thought(prompt_ids)
        split = self.split(head + list(ids))
        if split.thought is None:
            return split.content, None
        text, before = self.thought_text(split.thought), self.thought_text(head[1:]) if head else ""
        return split.content, text[len(before):] if text.startswith(before) else text

    def thought_text(self, thought_ids) -> str:
        """The thought's text without the channel's label. A text that is only a start of the label gives ""
        (the label is still arriving, or a budget closed the channel inside it)."""
        text = self.tokenizer.decode(list(thought_ids), skip_special_tokens=True)
        if text.startswith(THOUGHT_LABEL):
            return text[len(THOUGHT_LABEL):]
        if THOUGHT_LABEL.startswith(text):
            return ""
        return text

    def prompt_thought(self, prompt_ids) -> list:
        """The ids of the thought `prompt_ids` leave open in their last turn, the model's, from its `<|channel>`
        on ([] when none)."""
        start = open_channel(prompt_ids, self.open_id, self.close_id, self.turns)
        return [] if start is None else list(prompt_ids)[start:]


__all__ = ["ThoughtSplitter", "Turns", "open_channel", "Split", "CHANNEL_OPEN", "CHANNEL_CLOSE", "THOUGHT_LABEL"]
