"""Training data: load (prompt_ids, response_ids) examples and order them deterministically.

Sources: a JSONL file (or a .json file holding one JSON array; either may be gzipped, .gz) of {"prompt_ids",
"response_ids"} rows, {"prompt", "response"} texts (encoded with the checkpoint's tokenizer; TRL's
"completion" may stand for "response") or {"messages": [...], "tools": [...]} conversations (OpenAI's
fine-tuning format, rendered with the checkpoint's chat template: one example per assistant turn, the
conversation before it as the prompt; TRL's conversational {"prompt": [messages], "completion": [messages]}
trains the completion's turns), a Python callable `module:function` returning a list of examples (pairs,
or dicts as in the JSONL), or a Hugging Face dataset (`hf:owner/name`, or a mapping {dataset, subset,
split, revision, columns, max_examples}) read with the `datasets` library, whose rows are those dicts
(`columns` renames the dataset's columns).
Images (with `vision`, a `vision.TrainVision`): chat messages may hold image parts (OpenAI `image_url`,
{"type": "image", "image": src}, Responses `input_image`, or TRL's bare {"type": "image"} parts taking the
row's `images` list in order), and any row may carry `images` for the image tokens of its prompt text or
ids; such an example is an `ImageExample`: the pair, prompt expanded, plus its images.
The order is a pure function of (seed, global example counter): step s of a run with global batch size
G uses examples number s*G ... s*G+G-1 of an endless stream of shuffled epochs. Nothing about the order
lives in a loader's state, so a resumed run sees exactly the examples it would have seen, whatever the
number of processes or gradient-accumulation micro-batches.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import operator
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import torch

from ..multimodal import ImageError, image_parts_to_placeholders, image_token_text
from ..tokenizer import tool_arguments_as_objects

Example = tuple[list[int], list[int]]


class DataError(ValueError):
    """A data source cannot be read or holds a malformed example."""


class ImageExample(tuple):
    """An example whose prompt shows images: the (prompt_ids, response_ids) pair (it unpacks, indexes and
    compares as the pair; text-only examples stay plain pairs), its prompt expanded (each image's
    `boi + image_token * n + eoi`), and `images`: one `vision.TrainImage` per image, in prompt order."""

    def __new__(cls, prompt, response, images):
        self = super().__new__(cls, (prompt, response))
        self.images = tuple(images)
        return self

    def __getnewargs__(self):
        return self[0], self[1], self.images

    def replace(self, prompt, response) -> "ImageExample":
        """The same images with other ids (a transform's output: it must keep the image tokens)."""
        return ImageExample(prompt, response, self.images)

    def __repr__(self) -> str:
        return f"ImageExample({self[0]!r}, {self[1]!r}, {len(self.images)} image(s))"


def _coerce(item, where: str, tokenizer, vision=None, base: Path | None = None) -> list[Example]:
    response_key = "response"
    if isinstance(item, dict) and "response" not in item and "completion" in item:  # TRL's name
        item = {**{k: v for k, v in item.items() if k != "completion"}, "response": item["completion"]}
        response_key = "completion"
    if isinstance(item, dict) and _is_messages(item.get("prompt")) and _is_messages(item.get("response")):
        # TRL's conversational prompt-completion: train the completion's assistant turns only
        earlier = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in item["prompt"]]
        item = {"messages": earlier + item["response"], **{k: item[k] for k in ("tools", "images") if k in item}}
    if isinstance(item, dict) and "messages" in item:
        return _chat_examples(item, where, tokenizer, vision, base)
    if isinstance(item, ImageExample):
        return [item]
    names = ("prompt_ids", "response_ids")
    if isinstance(item, (tuple, list)) and len(item) == 2:
        prompt, response = item
        names = ("prompt ids", "response ids")
    elif isinstance(item, dict) and "prompt_ids" in item and "response_ids" in item:
        prompt, response = item["prompt_ids"], item["response_ids"]
    elif isinstance(item, dict) and "prompt" in item and "response" in item:
        for key, name in (("prompt", "prompt"), ("response", response_key)):
            if not isinstance(item[key], str):
                raise DataError(f"{where}: '{name}' must be a string, got {_shown(item[key])}")
        _need_tokenizer(tokenizer, where, "text examples ('prompt'/'response')")
        try:
            prompt = tokenizer.encode(item["prompt"])
            response = tokenizer.encode(item["response"], add_special_tokens=False)
        except ValueError as e:  # a character this vocabulary cannot write
            raise DataError(f"{where}: {e}") from None
    else:
        raise DataError(f"{where}: expected a (prompt_ids, response_ids) pair or a dict with "
                        f"'prompt_ids'/'response_ids', 'prompt'/'response' or 'messages', got {str(item)[:80]!r}")
    sources = item.get("images") if isinstance(item, dict) else None
    if sources is not None and not isinstance(sources, (list, tuple)):
        raise DataError(f"{where}: 'images' must be a list of images (one per image token of the prompt)")
    images = _row_images(list(sources or []), where, vision, base)
    return [_with_images(_checked(prompt, response, where, names), images, where, vision)]


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _shown(value) -> str:
    """A data value as a message shows it: JSON's null / true, shortened."""
    text = json.dumps(value) if isinstance(value, (type(None), bool, int, float, str)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _ids(value, where: str, name: str) -> list[int]:
    """value as a list of token ids: a list (or tuple, array) of integers; not text, floats or booleans."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise DataError(f"{where}: '{name}' must be a list of integer token ids, got {_shown(value)}")
    out = []
    for t in value:
        try:
            if isinstance(t, bool):  # JSON's true is no token id
                raise TypeError
            out.append(operator.index(t))  # ints (numpy's too), not floats or strings
        except TypeError:
            raise DataError(f"{where}: '{name}' must be a list of integer token ids, got {_shown(t)} in it") from None
    return out


def _checked(prompt, response, where: str, names=("prompt ids", "response ids")) -> Example:
    prompt, response = _ids(prompt, where, names[0]), _ids(response, where, names[1])
    if not prompt:
        raise DataError(f"{where}: empty prompt (at least one token is needed)")
    return prompt, response


def check_example(pair, where: str, vocab_size: int) -> Example:
    """A (prompt_ids, response_ids) pair that user code made (a transform's output), checked as a loaded
    example is: lists of integer ids, a prompt, ids inside the vocabulary."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise DataError(f"{where}: expected a (prompt_ids, response_ids) pair, got {_shown(pair)}")
    example = _checked(pair[0], pair[1], where)
    check_vocab(example, vocab_size, where)
    return example


def check_vocab(example: Example, vocab_size: int, where: str) -> None:
    """DataError naming `where` when a token id of the example is outside [0, vocab_size)."""
    bad = [t for t in example[0] + example[1] if not 0 <= t < vocab_size]
    if bad:
        raise DataError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")


def _need_tokenizer(tokenizer, where: str, what: str) -> None:
    if tokenizer is None:
        raise DataError(f"{where}: {what} need a tokenizer; set `tokenizer:` in the config or use a checkpoint "
                        "that ships tokenizer.json")


def _row_images(sources: list, where: str, vision, base: Path | None, details: list | None = None) -> list:
    """The loaded images (vision.TrainImage) of one data row, from their sources (details: each one's OpenAI
    detail, which sets its soft-token budget as at inference)."""
    if not sources:
        return []
    if vision is None:
        raise DataError(f"{where}: the example holds images, and this model takes text only (no vision tower, or "
                        "no image token ids inside its vocabulary)")
    return vision.images([_image_source(s, base, f"{where}: image {k}") for k, s in enumerate(sources)], where,
                         details)


_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")  # what images.load_image may take as bare base64


def _undecoded(src):
    """The image a `datasets` Image column that is not decoded gives as {"bytes", "path"}: its bytes, else its
    path; anything else as it is."""
    if isinstance(src, dict) and ("bytes" in src or "path" in src):
        return src.get("bytes") or src.get("path")
    return src


def _image_source(src, base: Path | None, where: str):
    """An image source as TrainVision reads it: a local file (trusted: training data is the user's own; a
    relative path is taken from the data file's directory, else the working directory) as a Path, a PIL
    image, bytes, a data URL, an http(s) URL or base64 as given. A `datasets` Image column that is not
    decoded gives {"bytes", "path"}."""
    src = _undecoded(src)
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if not isinstance(src, str):
        if src is None or not (isinstance(src, (bytes, bytearray)) or hasattr(src, "convert")):
            raise DataError(f"{where}: expected a PIL image, bytes, a path, a data URL or an http(s) URL, got "
                            f"{type(src).__name__}")
        return src
    text = src.strip()
    lower = text[:10].lower()
    if lower.startswith(("data:", "http://", "https://")):
        return text
    path = unquote(urlparse(text).path) if lower.startswith("file:") else text
    if len(path) < 4096 and "\n" not in path:
        p = Path(path).expanduser()
        for c in ([p] if p.is_absolute() or base is None else [base / p, p]):
            try:
                if c.is_file():
                    return c
            except OSError:
                break
    if lower.startswith("file:") or not _BASE64.fullmatch(text):  # not base64 either: a path that is not there
        raise DataError(f"{where}: no such image file {text[:120]!r}"
                        + (f" (relative paths are taken from {base} or the working directory)" if base else ""))
    return text  # bare base64 (images.load_image decides)


def _with_images(example: Example, images: list, where: str, vision) -> Example:
    """The example with its prompt's image tokens expanded, as an ImageExample when it has images."""
    if vision is None:
        return example
    prompt, response = example
    if vision.image_token_id in response:
        raise DataError(f"{where}: the response holds image tokens (id {vision.image_token_id}); only prompts can "
                        "show images")
    prompt = vision.expand(prompt, images, where)
    return ImageExample(prompt, response, images) if images else (prompt, response)


def _is_bare_image(part) -> bool:
    """TRL's {"type": "image"} part, whose image is the row's `images[k]` (datasets fills absent keys with None)."""
    return isinstance(part, dict) and part.get("type") == "image" and all(
        part.get(k) is None for k in ("image", "url", "image_url"))


def _fill_images(messages: list, images, where: str) -> list:
    """TRL's vision format: the k-th bare {"type": "image"} part takes images[k] (an undecoded datasets Image's
    {"bytes", "path"} unwrapped: an image part cannot hold that dict)."""
    if images is not None and not isinstance(images, (list, tuple)):
        raise DataError(f"{where}: 'images' must be a list of images (one per {{'type': 'image'}} part)")
    images = list(images or [])
    bare = sum(1 for m in messages if isinstance(m.get("content"), list) for p in m["content"] if _is_bare_image(p))
    if bare != len(images):
        raise DataError(f"{where}: {bare} {{'type': 'image'}} part(s) without an image for {len(images)} image(s) "
                        "in 'images'; the k-th such part takes images[k]")
    if not images:
        return messages
    it = iter(images)
    return [{**m, "content": [{"type": "image", "image": _undecoded(next(it))} if _is_bare_image(p) else p
                              for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]


def _placeholders(messages: list, placeholder: str, where: str, details: list | None = None) -> tuple[list, list]:
    try:
        return image_parts_to_placeholders(messages, placeholder, details)
    except ImageError as e:
        raise DataError(f"{where}: {e}") from None


def _chat_examples(item: dict, where: str, tokenizer, vision=None, base: Path | None = None) -> list[Example]:
    """One example per assistant turn (skipping turns with "weight": 0, as OpenAI's format allows): the
    prompt is the conversation before it with the generation prompt, the response is what the chat
    template renders for the turn, cut after its last EOS token (the turn's end marker). Image parts
    become the image token in the text (what the server does) and the turn's example carries the images
    of the conversation before it; a trained assistant turn cannot hold an image. A trained turn's thought
    (`reasoning_content`, `reasoning` or `thinking`) opens its response in the model's thought channel
    (`<|channel>thought\n...<channel|>`, what a thinking reply writes) and the row's prompts render in
    thinking mode (enable_thinking); earlier turns' thoughts are left out, as chat templates leave them."""
    _need_tokenizer(tokenizer, where, "chat examples ('messages')")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: chat examples need a chat template, and the tokenizer has none")
    messages, tools = item["messages"], item.get("tools")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of function declarations")
    for j, m in enumerate(messages):  # OpenAI's format: 0 or 1 (absent, or null as `datasets` fills it: 1)
        w = m.get("weight")
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w not in (0, 1)):
            raise DataError(f"{where}: messages[{j}]: 'weight' must be 0 (skip the turn) or 1 (train it), an "
                            f"integer as in OpenAI's fine-tuning format, got {_shown(w)}")
    turns = [j for j, m in enumerate(messages) if m.get("role") == "assistant" and m.get("weight", 1) != 0]
    if not turns:
        raise DataError(f"{where}: no assistant message to train on")
    thoughts = {j: _thought_of(messages[j], f"{where}: messages[{j}]") for j in turns}
    thinking = any(t is not None for t in thoughts.values())
    channel = _thought_channel(tokenizer, where) if thinking else None
    messages = [{k: v for k, v in m.items() if k not in THOUGHT_KEYS} for m in messages]  # earlier thoughts: left out
    messages = _fill_images(messages, item.get("images"), where)
    placeholder = image_token_text(tokenizer, vision.cfg) if vision is not None else "<|image|>"
    details = []  # each image's OpenAI detail: "low" trains on the short image LLM.chat and the server give it
    images = _row_images(_placeholders(messages, placeholder, where, details)[1], where, vision, base, details)
    eos = set(tokenizer.eos_ids)
    out = []
    for j in turns:
        history = tool_arguments_as_objects([{k: v for k, v in m.items() if k != "weight"} for m in messages[:j + 1]])
        if _placeholders(history[-1:], placeholder, where)[1]:
            raise DataError(f"{where}: messages[{j}]: an assistant turn to train on holds an image (the model reads "
                            "images, it does not write them); give it \"weight\": 0 or move the image to a user turn")
        earlier, shown = _placeholders(history[:-1], placeholder, where)
        history = earlier + history[-1:]
        mode = {"enable_thinking": True} if thinking else {}  # a thinking example: the prompt in thinking mode
        try:
            prompt_text = tokenizer.apply_chat_template(history[:-1], add_generation_prompt=True, tools=tools, **mode)
            full_text = tokenizer.apply_chat_template(history, add_generation_prompt=False, tools=tools, **mode)
        except ValueError as e:
            raise DataError(f"{where}: messages[{j}]: {e}") from None
        # a generation prompt that opens the thought channel itself (Gemma 4's, thinking on): the prompt keeps the
        # opening, as inference sees it, and the response starts inside the thought
        opened = channel is not None and prompt_text.endswith(channel[0])
        before = prompt_text[:-len(channel[0])] if opened else prompt_text
        if not full_text.startswith(before):
            raise DataError(f"{where}: messages[{j}]: the chat template does not render the conversation before "
                            "this turn as a prefix of the conversation with it; use 'prompt'/'response' rows")
        try:
            prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
            response = tokenizer.encode(full_text[len(before):], add_special_tokens=False)
            ends = [i for i, t in enumerate(response) if t in eos]
            if ends:
                response = response[:ends[-1] + 1]  # the turn's end marker, not the newline after it
            if opened:  # the thought (or none) and the close: the channel is open already
                response = tokenizer.encode((thoughts[j] or "") + channel[1], add_special_tokens=False) + response
            elif thoughts[j] is not None:  # the turn opens with its thought, as the model writes one
                response = tokenizer.encode(channel[0] + thoughts[j] + channel[1], add_special_tokens=False) + response
        except ValueError as e:  # a character this vocabulary cannot write
            raise DataError(f"{where}: messages[{j}]: {e}") from None
        out.append(_with_images(_checked(prompt, response, f"{where} messages[{j}]"), images[:len(shown)],
                                f"{where} messages[{j}]", vision))
    return out


THOUGHT_KEYS = ("reasoning_content", "reasoning", "thinking")  # vLLM's / DeepSeek's, vLLM's newer, Ollama's


def _thought_of(message: dict, where: str) -> str | None:
    """An assistant turn's thought (its reasoning_content, reasoning or thinking), or None."""
    given = [k for k in THOUGHT_KEYS if message.get(k) not in (None, "")]
    for k in given:
        if not isinstance(message[k], str):
            raise DataError(f"{where}: {k} must be a string (the thought's text)")
    if len({message[k] for k in given}) > 1:
        raise DataError(f"{where}: {given[0]} and {given[1]} disagree; give the thought once")
    return message[given[0]] if given else None


def _thought_channel(tokenizer, where: str) -> tuple[str, str]:
    """The text around a thought in the model's own syntax (canvaslm.reasoning): its opening, label included,
    and its close."""
    from ..reasoning import CHANNEL_CLOSE, CHANNEL_OPEN, THOUGHT_LABEL, ThoughtSplitter

    if ThoughtSplitter.for_tokenizer(tokenizer) is None:
        raise DataError(f"{where}: an assistant turn has a thought (reasoning_content), and this tokenizer has no "
                        f"thought channel tokens ({CHANNEL_OPEN}, {CHANNEL_CLOSE}) to write it with")
    return CHANNEL_OPEN + THOUGHT_LABEL, CHANNEL_CLOSE


def resolve_callable(spec: str, what: str = "data source") -> Callable:
    """The function `module:function` names; DataErrors name `what` (the config key) and spec."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise DataError(f"{what} {spec!r}: expected " + ("a .jsonl path or " if what == "data source" else "")
                        + "'module:function'")
    here = os.getcwd()
    if not any(p in ("", here) for p in sys.path):  # `python -m` / torchrun -m put it there, the console script
        sys.path.insert(0, here)  # does not: a module beside the config imports either way (uvicorn's app dir)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DataError(f"{what} {spec!r}: cannot import ({e}; modules are looked up in the working directory "
                        f"{here} and on sys.path)") from None
    if not callable(fn):
        raise DataError(f"{what} {spec!r}: {name} is not callable")
    return fn


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")  # a missing one is a missing file, not a callable


def calls_function(spec) -> bool:
    """Whether load_sourced calls `spec` as `module:function` (the one source `kwargs` apply to), rather than
    reading a data file or a dataset."""
    return isinstance(spec, str) and hf_source(spec) is None and not _is_data_file(spec)


def _is_data_file(spec: str) -> bool:
    return spec.endswith(DATA_FILE_SUFFIXES) or Path(spec).exists()


HF_KEYS = {"dataset", "subset", "split", "revision", "columns", "max_examples"}


def hf_source(spec) -> dict | None:
    """A Hugging Face dataset source as a mapping (defaults filled in), or None for other sources."""
    if isinstance(spec, str):
        if spec.startswith("hf:"):
            return {"dataset": spec[3:], "split": "train", "columns": {}}
        if Path(spec).is_dir():  # a local dataset directory (data files per split, or a saved dataset)
            return {"dataset": spec, "split": "train", "columns": {}}
        return None
    if not isinstance(spec, dict):
        raise DataError(f"data source {spec!r}: expected a path, 'module:function', 'hf:owner/name' or a mapping "
                        f"with {sorted(HF_KEYS)}")
    unknown = sorted(set(spec) - HF_KEYS)
    if unknown or not isinstance(spec.get("dataset"), str) or not spec["dataset"]:
        raise DataError(f"data source {spec!r}: a dataset mapping needs 'dataset' (a Hugging Face repo id or a "
                        f"local dataset dir) and only {sorted(HF_KEYS)} (unknown: {unknown})")
    columns = spec.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise DataError(f"data source {spec['dataset']!r}: 'columns' must map our field names to the dataset's "
                        f"columns, e.g. {{prompt: instruction, response: output}}")
    n = spec.get("max_examples")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise DataError(f"data source {spec['dataset']!r}: max_examples must be a positive integer, got {n!r}")
    return {"split": "train", **spec, "columns": columns}


def _hf_rows(src: dict) -> tuple[list[dict], str]:
    """The rows of a Hugging Face dataset split as dicts with our field names, and a name for messages."""
    name, split = src["dataset"], src["split"]
    where = f"dataset {name!r}" + (f" ({src['subset']})" if src.get("subset") else "") + f" split {split!r}"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{where}: reading Hugging Face datasets needs the `datasets` package "
                        "(pip install datasets, or canvaslm[train])") from None
    try:
        saved = Path(name).is_dir() and any((Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json"))
        if saved:  # Dataset.save_to_disk / DatasetDict.save_to_disk: read as saved (its split picked below)
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, src.get("subset"), split=split, revision=src.get("revision"))
    except Exception as e:  # noqa: BLE001 - not found, offline, bad split, bad files: all name the source
        hint = " (offline: HF_HUB_OFFLINE is set, so only the local cache is read)" if \
            getattr(datasets.config, "HF_HUB_OFFLINE", False) else ""
        raise DataError(f"{where} cannot be read{hint}: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):  # a saved DatasetDict
        if split not in ds:
            raise DataError(f"{where}: the saved dataset has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    renames = {theirs: ours for ours, theirs in src["columns"].items()}
    missing = sorted(set(renames) - set(ds.column_names))
    if missing:
        raise DataError(f"{where}: columns {missing} (from 'columns') are not in the dataset; it has "
                        f"{ds.column_names}")
    if src.get("max_examples"):
        ds = ds.select(range(min(src["max_examples"], len(ds))))
    # a mapped column replaces the dataset's own of that name (and a mapped prompt / response / completion wins
    # over a `messages` column), whatever the column order
    shadowed = set(renames.values()) - set(renames)
    if shadowed & {"prompt", "response", "completion", "prompt_ids", "response_ids"}:
        shadowed.add("messages")
    # a null column is an absent key: datasets fills a row's missing columns with None when rows differ in
    # format (a text row beside a chat row holds messages=None), and the row must read as its JSONL line does
    rows = [{renames.get(k, k): v for k, v in row.items() if (k in renames or k not in shadowed) and v is not None}
            for row in ds]
    return rows, where


def load_examples(spec, tokenizer=None, kwargs: dict | None = None, vocab_size: int | None = None,
                  vision=None) -> list[Example]:
    """Examples from a JSONL path, a `module:function` callable (called with **kwargs) or a Hugging Face
    dataset (`hf:owner/name` or a mapping: `hf_source`). vision: a `vision.TrainVision` for examples with
    images (None: the model takes text only, and an example with images is an error)."""
    return [ex for _, ex in load_sourced(spec, tokenizer, kwargs, vocab_size, vision)]


def load_sourced(spec, tokenizer=None, kwargs: dict | None = None, vocab_size: int | None = None,
                 vision=None) -> list[tuple[str, Example]]:
    """load_examples' examples, each with where its row is (FILE:LINE, `FILE: row N` of a JSON array, a
    dataset's row N, module:function[N]): the examples of one row (a conversation's turns) share it."""
    src = hf_source(spec)
    if src is not None:
        rows, where = _hf_rows(src)
        base = Path(src["dataset"]) if Path(src["dataset"]).is_dir() else None
        rows = [(f"{where} row {i}", item) for i, item in enumerate(rows)]
        spec = src["dataset"]
    elif _is_data_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        rows, base = _file_rows(path), path.parent
    else:
        items = _called(spec, kwargs or {})
        rows, base = [(f"{spec}[{i}]", item) for i, item in enumerate(items)], None
    out = [(where, ex) for where, item in rows for ex in _coerce(item, where, tokenizer, vision, base)]
    if not out:
        raise DataError(f"data source {spec!r} holds no examples")
    if vocab_size is not None:
        for where, ex in out:
            check_vocab(ex, vocab_size, where)
    return out


def _called(spec: str, kwargs: dict):
    """What a `module:function` source returns, called with data.kwargs: DataErrors naming the source and
    data.kwargs when the function does not take those keywords, or returns something that is no list of
    examples (None, a string, a mapping); an error the function itself raises stays the function's."""
    fn = resolve_callable(spec)
    called = f"data source {spec!r} called with data.kwargs {kwargs}"
    try:
        # the function's own parameters: a functools.wraps wrapper may take keywords the function it wraps does not
        inspect.signature(fn, follow_wrapped=False).bind(**kwargs)
    except TypeError as e:  # an unknown keyword, a missing argument
        raise DataError(f"{called}: {e}; data.kwargs must match the function's parameters") from None
    except ValueError:  # no signature to check (some builtins): the call tells
        pass
    items = fn(**kwargs)
    if items is None or isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise DataError(f"{called}: returned " + ("None (no `return`?)" if items is None else _shown(items))
                        + ", where a list (or iterable) of examples is expected")
    return items


def _file_rows(path: Path):
    """(where, row) of a data file: JSON lines, or for a .json file holding one JSON array, its items (what
    `datasets` reads from such a file); gzip-compressed when its name ends in .gz."""
    lines = _text_lines(path)
    if (Path(path.stem) if path.suffix == ".gz" else path).suffix == ".json":
        lines = list(lines)
        text = "".join(line for _, line in lines)
        if text.lstrip().startswith("["):
            rows = _json(text, str(path))
            yield from ((f"{path}: row {i}", item) for i, item in enumerate(rows))
            return
    for i, line in lines:
        if not line.strip():
            continue
        yield f"{path}:{i}", _json(line, f"{path}:{i}")


def _json(text: str, where: str):
    """The JSON value of a file's text or line; a DataError naming `where` when it is not JSON or an object
    in it gives a key twice."""
    try:
        return json.loads(text, object_pairs_hook=_no_repeated_keys)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    except _RepeatedKey as e:
        raise DataError(f"{where}: key {e.args[0]!r} appears twice in one object") from None


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list) -> dict:
    """json.loads' objects, refusing a key given twice (json keeps the last silently: a row that says
    "response_ids" twice trained on the second)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _RepeatedKey(k)
        out[k] = v
    return out


def _text_lines(path: Path):
    """(line number, text) of a data file's lines, decoded one at a time so that bytes that are not UTF-8
    (a Latin-1 export) are an error naming the file and line, not the codec's bare position."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    yield i, raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a BOM, as `datasets` reads it
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1} "
                                    "of the line); save the file as UTF-8") from None
    except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated .gz, an unreadable file
        raise DataError(f"{path}: cannot be read ({e})") from None


def split_holdout(examples: list[tuple[str, Example]], n_eval: int, seed: int) -> tuple[list, list]:
    """(train, eval) of (where, example) pairs: a fixed-seed random `n_eval` rows held out, each with all its
    examples (a conversation's turns stay together: none of them is trained on and evaluated)."""
    if n_eval <= 0:
        return examples, []
    rows = list(dict.fromkeys(where for where, _ in examples))
    if n_eval >= len(rows):
        raise DataError(f"eval_size={n_eval} leaves no training examples (only {len(rows)} rows in total)")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = {rows[i]: k for k, i in enumerate(perm[:n_eval])}
    train = [e for e in examples if e[0] not in held]
    return train, sorted((e for e in examples if e[0] in held), key=lambda e: held[e[0]])


class ExampleStream:
    """Endless shuffled epochs; `indices(start, count)` are the dataset indices of stream items
    start..start+count-1 (a pure function of seed and position)."""

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [self._perm(i // self.n)[i % self.n] for i in range(start, start + count)]


__all__ = ["Example", "ImageExample", "DataError", "load_examples", "load_sourced", "split_holdout", "ExampleStream",
           "resolve_callable", "calls_function", "check_example", "check_vocab"]
