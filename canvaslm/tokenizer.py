"""Text <-> token ids for a checkpoint directory.

Owns: loading `tokenizer.json` with the `tokenizers` library, reading the special tokens from the HF side
files as `transformers` does (the chat template's token variables, the tokens decode skips), resolving the
special ids (bos, pad and the set of ids that end generation), and rendering the chat template with a
sandboxed jinja2 environment configured like `transformers` so prompts match token for token.
Also builds tiny char-level tokenizers for recipe models.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the file is absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # Special tokens are serialised either as plain strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any, path: Path, key: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{path}: {key} must be an int or a list of ints, got {value!r}")
    return list(values)


def _special_token_files(tok_cfg: dict, special_map: dict) -> list[tuple[str, dict]]:
    """The files transformers reads special tokens from, later ones overriding: tokenizer_config.json, then
    special_tokens_map.json, which it reads only when the config has no added_tokens_decoder (the legacy layout)."""
    files = [("tokenizer_config.json", tok_cfg)]
    if "added_tokens_decoder" not in tok_cfg:
        files.append(("special_tokens_map.json", special_map))
    return files


def _named_special_tokens(files: list[tuple[str, dict]]) -> dict[str, tuple[str, str]]:
    """transformers' special_tokens_map, each with the file that names it: every `*_token` key holding a token
    (bos, eos, unk, sep, pad, cls, mask and model-specific ones such as image_token) and the entries of an
    extra_special_tokens dict. These are the chat template's variables and the source of the bos/eos/pad ids."""
    named: dict[str, tuple[str, str]] = {}
    for fname, cfg in files:
        extra = cfg.get("extra_special_tokens")
        items = list(cfg.items()) + (list(extra.items()) if isinstance(extra, dict) else [])
        for key, value in items:
            token = _token_content(value)
            if key.endswith("_token") and token is not None:
                named[key] = (token, fname)
    return named


def _extra_special_tokens(files: list[tuple[str, dict]]) -> list[str]:
    """The unnamed special tokens (additional_special_tokens, or transformers 5's extra_special_tokens list)."""
    extra: list[str] = []
    for _, cfg in files:
        for key in ("additional_special_tokens", "extra_special_tokens"):
            values = cfg.get(key)
            if isinstance(values, list):
                extra += [t for t in map(_token_content, values) if t is not None]
    return list(dict.fromkeys(extra))


# encode_chat's own arguments: chat_template_kwargs (server and LLM.chat) may not set them
TEMPLATE_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "continue_final_message"})
_ADDED_TOKEN_FIELDS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _added_token(entry: Any, where: str) -> AddedToken:
    """An added_tokens_decoder entry ({"content", "special", "lstrip", ...}) as an AddedToken."""
    if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)):
        raise ValueError(f"{where} must be an object with a string 'content', got {entry!r:.80}")
    return AddedToken(entry["content"], **{k: bool(entry[k]) for k in _ADDED_TOKEN_FIELDS if k in entry})


def _apply_hf_added_tokens(backend: _Backend, d: Path, tok_cfg: dict, named: Iterable[str],
                           extra: Iterable[str]) -> None:
    """Sets the added tokens as transformers' fast tokenizer does on loading, so encode and
    decode(skip_special_tokens) match it: tokenizer_config.json's added_tokens_decoder entries (else tokenizer.json's
    own added tokens) replace tokenizer.json's, each named special token among them made special; a named or extra
    special token that is not an added token yet is added as a special one. A token missing from the vocabulary
    is left out: transformers appends it, which gives an id past the model's embeddings."""
    decoder = tok_cfg.get("added_tokens_decoder")
    where = f"{d / 'tokenizer_config.json'}: added_tokens_decoder"
    if decoder is None:
        entries = [t for _, t in sorted(backend.get_added_tokens_decoder().items())]
    elif isinstance(decoder, dict):
        entries = [_added_token(v, f"{where}[{k!r}]") for k, v in decoder.items()]
    else:
        raise ValueError(f"{where} must be an object of id -> token, got {decoder!r:.80}")
    named = set(named)
    for token in entries:
        token.special = token.special or token.content in named
    present = {t.content for t in backend.get_added_tokens_decoder().values()} | {t.content for t in entries}
    new = [AddedToken(t, special=True) for t in dict.fromkeys([*named, *extra]) if t not in present]
    backend.add_tokens([t for t in entries + new if backend.token_to_id(t.content) is not None])


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson HTML-escapes; HF templates expect plain json.dumps output.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask templates: TRL's assistant_only_loss,
    SmolLM3): marks the assistant's text for a loss mask; rendering it is rendering its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    # Same environment as transformers' apply_chat_template: templates come from the Hub, so sandbox them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _compile_template(source: str, origin: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{origin}: chat template has a syntax error at line {e.lineno}: {e.message}") from e


# What a template does with a message's content decides how a list of parts reaches it (vLLM's content formats):
# as the list (as transformers always passes it) when the template treats content as a list (loops over it,
# indexes it, filters it as a list) or hands it to something we cannot follow; joined into one string when it
# only uses content as a string (prints it, trims it, calls its string methods).
_STRING_FILTERS = frozenset({
    "trim", "string", "safe", "e", "escape", "forceescape", "replace", "lower", "upper", "capitalize", "title",
    "truncate", "wordcount", "wordwrap", "indent", "center", "striptags", "format", "urlize", "urlencode",
    "length", "count", "tojson", "int", "float", "reverse", "default", "d"})


@functools.lru_cache(maxsize=64)
def _takes_parts(source: str | None) -> bool:
    """Whether the chat template `source` treats a message's content as a list of parts, read from its syntax
    tree: content is any `x.content`, `x['content']` or `x.get('content')`, and the names it is given to (`set`,
    `with`, a macro's parameters) are content too."""
    if source is None:
        return False
    try:
        tree = _environment().parse(source)
    except jinja2.exceptions.TemplateSyntaxError:
        return False  # rendering reports the error
    N = jinja2.nodes
    macros = {m.name: m for m in tree.find_all(N.Macro)}
    aliases: set[str] = set()  # names (and `ns.attr` namespace slots) that hold a message's content

    def is_content(x) -> bool:
        if isinstance(x, N.Getattr):
            return x.attr == "content" or (isinstance(x.node, N.Name) and f"{x.node.name}.{x.attr}" in aliases)
        if isinstance(x, N.Getitem):
            return isinstance(x.arg, N.Const) and x.arg.value == "content"
        if isinstance(x, N.Name):
            return x.name in aliases
        if isinstance(x, N.Call):  # x.get('content', ...)
            return (isinstance(x.node, N.Getattr) and x.node.attr == "get" and x.args[:1] != []
                    and isinstance(x.args[0], N.Const) and x.args[0].value == "content")
        if isinstance(x, N.CondExpr):
            return is_content(x.expr1) or (x.expr2 is not None and is_content(x.expr2))
        if isinstance(x, N.Filter):  # `content | default('')` is still the content
            return x.name in ("default", "d") and x.node is not None and is_content(x.node)
        return False

    def bind(target, value) -> bool:
        """Make `target` (an assignment's) an alias of content when `value` is content; True when it is new."""
        if not is_content(value):
            return False
        name = (target.name if isinstance(target, N.Name) else
                f"{target.name}.{target.attr}" if isinstance(target, N.NSRef) else None)
        if name is None or name in aliases:
            return False
        aliases.add(name)
        return True

    changed = True
    while changed:  # aliases of aliases, in any order
        changed = False
        for a in tree.find_all(N.Assign):
            changed |= bind(a.target, a.node)
        for w in tree.find_all(N.With):
            for t, v in zip(w.targets, w.values):
                changed |= bind(t, v)
        for c in tree.find_all(N.Call):
            macro = macros.get(c.node.name) if isinstance(c.node, N.Name) else None
            if macro is not None:
                params = {p.name: p for p in macro.args}
                for p, v in [*zip(macro.args, c.args), *((params.get(k.key), k.value) for k in c.kwargs)]:
                    if p is not None:
                        changed |= bind(p, v)

    for f in tree.find_all(N.For):  # a loop over the content, or over a filter of it
        it = f.iter
        while isinstance(it, N.Filter) and it.node is not None:
            it = it.node
        if is_content(it):
            return True
    for f in tree.find_all(N.Filter):  # a list filter (join, selectattr, map, first, ...) or one we do not know
        if f.node is not None and is_content(f.node) and f.name not in _STRING_FILTERS:
            return True
    for g in tree.find_all(N.Getitem):  # content[0]
        if is_content(g.node) and isinstance(g.arg, N.Const) and isinstance(g.arg.value, int):
            return True
    for c in tree.find_all(N.Call):  # given to a function that is not a macro of the template's
        if not (isinstance(c.node, N.Name) and c.node.name in macros) and not isinstance(c.node, N.Getattr) \
                and any(is_content(v) for v in [*c.args, *(k.value for k in c.kwargs)]):
            return True
    return False


def _validate_messages(messages: Any, keep_parts: bool = False) -> list[dict]:
    """Copies of the messages with list-of-parts content joined into one string (by "\\n", as vLLM does
    for a template that takes content as a string) and a thought under each of its names
    (`reasoning_content`, `thinking`). Image parts ({"type": "image", "text": the image token's text}, as
    multimodal.image_parts_to_placeholders writes them) join as that text. With `keep_parts` (a template
    that loops over the parts itself) every list stays a list, as transformers and vLLM pass it, with its
    parts as [{"type": "text", "text"} | {"type": "image"}]: the template writes the image token and
    whatever goes between parts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        # Like HF: drop None-valued keys (OpenAI clients send content=None, tool_calls=None).
        msg = {k: v for k, v in msg.items() if v is not None}
        if not isinstance(msg.get("role"), str):
            raise ValueError(f"messages[{i}].role must be a string, got {msg.get('role')!r}")
        content = msg.get("content")
        if content is None and "tool_calls" in msg:
            content = ""  # an assistant turn that only calls tools
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") in ("text", "image")
                        and isinstance(part.get("text"), str)):
                    raise ValueError(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': str}}, "
                                     f"got {part!r}")
            if keep_parts:
                content = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]}
                           for p in content]
            else:
                content = "\n".join(p["text"] for p in content)  # as vLLM does for text-only models
        if not isinstance(content, (str, list)):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts, got {content!r}")
        msg["content"] = content
        # Like HF: a thought sent as `thinking` or `reasoning` reaches the template as `reasoning_content`
        # too (the name templates read), and as `thinking` (gpt-oss templates read that one).
        thought = next((msg[k] for k in ("reasoning_content", "thinking", "reasoning") if k in msg), None)
        if thought is not None:
            msg.setdefault("thinking", thought)
            msg["reasoning_content"] = thought
        out.append(msg)
    return out


# appended to the content of the message continue_final_message goes on with; the rendering is cut there
_CONTINUE_MARK = "<canvaslm:continue-here> "


def _mark_final_content(msg: dict) -> None:
    """Appends _CONTINUE_MARK to the message's content (its last text part when it holds parts)."""
    content = msg["content"]
    if isinstance(content, str):
        msg["content"] = content + _CONTINUE_MARK
        return
    for part in reversed(content):
        if part["type"] == "text":
            part["text"] += _CONTINUE_MARK
            return
    raise ValueError("continue_final_message: the last message has no text part to continue")


def tool_arguments_as_objects(messages: list) -> list:
    """Copies of the messages with each tool call's `arguments` JSON text parsed into an object, as chat
    templates expect (OpenAI clients and fine-tuning files send text). Text that does not parse to an
    object stays text. The server and the trainer both render calls this way, so training and serving
    see the same prompt."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(calls, list):
            out.append(m)
            continue
        new = []
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    value = json.loads(fn["arguments"])
                except ValueError:
                    value = None
                if isinstance(value, dict):
                    c = {**c, "function": {**fn, "arguments": value}}
            new.append(c)
        out.append({**m, "tool_calls": new})
    return out


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPACE_PIECE = "\u2581"  # SentencePiece's space


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for themselves, the
    others for the characters from U+0100 on, in byte order."""
    direct = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {chr(b): b for b in direct}, 0
    for b in range(256):
        if b not in direct:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and chat template of one checkpoint."""

    def __init__(self, backend: _Backend, *, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                 pad_id: int | None = None, chat_template: str | dict[str, str] | None = None,
                 special_tokens: dict[str, str] | None = None, name: str = "<memory>"):
        """special_tokens: the chat template's token variables ({"bos_token": "<bos>", ...}, transformers'
        special_tokens_map); by default the tokens of bos_id, the first eos id and pad_id."""
        self._backend = backend
        self.name = name
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))  # first id is the primary eos token
        self.pad_id = pad_id
        for role, i in [("bos", bos_id), ("pad", pad_id)] + [("eos", e) for e in self.eos_ids]:
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"{name}: {role} id {i} is outside the vocabulary [0, {self.vocab_size})")
        if special_tokens is None:  # built in memory: no tokenizer config names the tokens, the ids do
            special_tokens = {f"{role}_token": backend.id_to_token(i)
                              for role, i in [("bos", bos_id), ("eos", self.eos_id), ("pad", pad_id)] if i is not None}
        self.special_tokens = dict(special_tokens)
        self._set_templates({"default": chat_template} if isinstance(chat_template, str) else chat_template or {})
        self.template_defaults: dict = {}  # variables every rendering gets unless the call sets them (vLLM's
        # --default-chat-template-kwargs)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        d = Path(model_dir)
        tok_path = d / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d} (a checkpoint directory must ship one)")
        try:
            backend = _Backend.from_str(tok_path.read_text(encoding="utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON or schema
            raise ValueError(f"{tok_path}: not a valid tokenizer.json ({e})") from e

        tok_cfg = _read_json(d / "tokenizer_config.json") or {}
        special_map = _read_json(d / "special_tokens_map.json") or {}
        gen_cfg = _read_json(d / "generation_config.json") or {}
        model_cfg = _read_json(d / "config.json") or {}
        text_cfg = model_cfg.get("text_config") if isinstance(model_cfg.get("text_config"), dict) else {}

        files = _special_token_files(tok_cfg, special_map)
        named = _named_special_tokens(files)
        _apply_hf_added_tokens(backend, d, tok_cfg, [t for t, _ in named.values()], _extra_special_tokens(files))

        def by_token(key: str) -> int | None:
            # Token strings win: they are what HF's tokenizer itself uses.
            if key not in named:
                return None
            token, fname = named[key]
            tid = backend.token_to_id(token)
            if tid is None:
                raise ValueError(f"{d / fname}: {key} {token!r} is not in tokenizer.json's vocabulary")
            return tid

        def by_id(key: str) -> list[int]:
            for fname, cfg in [("generation_config.json", gen_cfg), ("config.json", model_cfg),
                               ("config.json", text_cfg)]:
                ids = _as_id_list(cfg.get(key), d / fname, key)
                if ids:
                    return ids
            return []

        bos = by_token("bos_token")
        pad = by_token("pad_token")
        eos = by_token("eos_token")
        # generation_config may list several stop ids (e.g. <eos> and <end_of_turn>); stop on all of them.
        eos_ids = ([eos] if eos is not None else []) + by_id("eos_token_id")
        return cls(
            backend,
            bos_id=bos if bos is not None else next(iter(by_id("bos_token_id")), None),
            eos_ids=eos_ids,
            pad_id=pad if pad is not None else next(iter(by_id("pad_token_id")), None),
            chat_template=_load_chat_template(d, tok_cfg),
            special_tokens={key: token for key, (token, _) in named.items()},
            name=str(d),
        )

    # -- vocabulary ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def token_to_id(self, token: str) -> int:
        tid = self._backend.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.name}")
        return tid

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise KeyError(f"id {token_id} is not in the vocabulary of {self.name} (size {self.vocab_size})")
        return token

    @property
    def renders_parts(self) -> bool:
        """The chat template loops over a message's content parts (vLLM's "openai" content format): a message
        sent as parts then reaches it as parts (as transformers passes them), and the template writes each
        image's token where it puts it."""
        return _takes_parts(self.chat_template)

    def set_chat_template(self, source: str, origin: str = "chat template") -> None:
        """Use `source` (Jinja) as the chat template instead of the checkpoint's, its named ones included
        (vLLM's --chat-template)."""
        compiled = _compile_template(source, origin)  # raises ValueError naming the origin on bad syntax
        self._set_templates({"default": source})
        self._compiled["default"] = compiled

    def _set_templates(self, templates: dict[str, str]) -> None:
        # name -> Jinja source, compiled on first use: a template with a syntax error breaks chat, not loading
        self.chat_templates = dict(templates)
        self.chat_template = templates.get("default", next(iter(templates.values()), None))
        self._compiled: dict[str, jinja2.Template] = {}

    def _template_for(self, tools: Any) -> tuple[jinja2.Template, str]:
        """The compiled template a rendering uses and its source: 'tool_use' when tools are passed and the
        checkpoint names one, else 'default' (transformers' choice)."""
        if not self.chat_templates:
            raise ValueError(f"{self.name}: this checkpoint has no chat template "
                             "(no chat_template.jinja and no chat_template in tokenizer_config.json)")
        name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        if name not in self.chat_templates:
            raise ValueError(f"{self.name}: the chat templates are named {sorted(self.chat_templates)} and none is "
                             "'default', so a chat without tools has no template")
        if name not in self._compiled:
            origin = self.name if name == "default" else f"{self.name} (chat template {name!r})"
            self._compiled[name] = _compile_template(self.chat_templates[name], origin)
        return self._compiled[name], self.chat_templates[name]

    # -- text <-> ids -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` applies tokenizer.json's post-processor (e.g. a leading bos)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as e:  # e.g. a char-level vocab without <unk> meeting an unknown character
            raise ValueError(f"{self.name}: cannot encode {self._unencodable(text)}: {e}") from e

    def _unencodable(self, text: str) -> str:
        """Names the first character of `text` outside the added tokens (<bos>, turn markers) that does not
        encode alone, with its place and the text around it (a chat prompt starts with the template's
        header, not with the user's text)."""
        added = sorted({t.content for t in self._backend.get_added_tokens_decoder().values() if t.content},
                       key=len, reverse=True)
        pieces = re.split("(" + "|".join(map(re.escape, added)) + ")", text) if added else [text]
        start, tried = 0, set()
        for k, piece in enumerate(pieces):  # odd pieces are added tokens
            for i, ch in enumerate(piece if k % 2 == 0 else "", start):
                if ch in tried:
                    continue
                tried.add(ch)
                try:
                    self._backend.encode(ch, add_special_tokens=False)
                except Exception:
                    return (f"character {ch!r} (U+{ord(ch):04X}) at index {i} of the text, "
                            f"in {text[max(0, i - 30):i + 10]!r}")
            start += len(piece)
        return repr(text[:40])  # every character encodes alone: only the text as a whole fails

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]  # accepts tensors / numpy rows as well as lists
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.name}: ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, which its decoded text loses when it is part of a character: a
        byte-fallback token (`<0xE2>`, SentencePiece and Gemma) is that byte, a byte-level BPE token (GPT-2's
        `Ġ` alphabet) maps back through that alphabet, any other token is the UTF-8 of its text. Joining the
        bytes of a sequence's tokens gives the bytes of its text (OpenAI's logprobs `bytes`)."""
        if token_id not in self._added_ids:  # an added token (<eos>, a turn marker) is its text
            piece = self.id_to_token(token_id)
            byte = _BYTE_FALLBACK.fullmatch(piece)
            if byte is not None:
                return bytes([int(byte.group(1), 16)])
            table = _byte_level_alphabet() if self._byte_level else {}
            if table and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._backend.get_added_tokens_decoder())

    @functools.cached_property
    def _byte_level(self) -> bool:
        """tokenizer.json decodes with the byte-level decoder (alone or inside a sequence). Read from the decoder's
        own JSON, not the whole tokenizer's (a 262k-token vocabulary)."""
        decoder = self._backend.decoder
        decoder = json.loads(decoder.__getstate__()) if decoder is not None else {}
        parts = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]
        return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)

    def decode_batch(self, seqs: list, skip_special_tokens: bool = True) -> list[str]:
        """`decode` of many id lists in one call (the tokenizers library decodes them in parallel)."""
        seqs = [[int(i) for i in ids] for ids in seqs]
        bad = [i for ids in seqs for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.name}: ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self._backend.decode_batch(seqs, skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            **kwargs: Any) -> str:
        """The prompt text for `messages`, rendered exactly as transformers would render it.

        continue_final_message: the model goes on with the last message (a prefilled reply, or any role's
        text): the text is cut right after that message's content, before the template closes the turn
        (transformers' rule: its content is rendered with a marker after it and the text is cut at the
        marker, trailing space too where the template strips it); it cannot be combined with
        add_generation_prompt."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message continues the last message; it cannot be combined with "
                             "add_generation_prompt (send add_generation_prompt=false)")
        template, source = self._template_for(tools)
        messages = _validate_messages(messages, keep_parts=_takes_parts(source))
        if continue_final_message:
            _mark_final_content(messages[-1])
        # caller kwargs override; the special tokens are transformers' special_tokens_map
        variables = {"documents": None, **self.special_tokens, **self.template_defaults, **kwargs}
        try:
            text = template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                   **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{self.name}: chat template rejected the messages: {e}") from e
        if continue_final_message:
            at = text.rfind(_CONTINUE_MARK.rstrip())
            if at < 0:
                raise ValueError("continue_final_message: the chat template left the last message's content out of "
                                 "the rendered chat, so there is no place to continue from")
            # a template that strips the content also strips the marker's space: then strip the content's end too
            return text[:at] if text.startswith(_CONTINUE_MARK, at) else text[:at].rstrip()
        return text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        # The template already writes bos and turn markers, so add nothing more (HF does the same).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)


def _load_chat_template(d: Path, tok_cfg: dict) -> dict[str, str]:
    """The checkpoint's chat templates by name: 'default' (chat_template.jinja, else chat_template.json's or
    tokenizer_config.json's chat_template), the named ones of a chat_template list ([{name, template}]), and
    additional_chat_templates/NAME.jinja (which replaces a listed NAME)."""
    templates: dict[str, str] = {}
    jinja_path = d / "chat_template.jinja"
    if jinja_path.is_file():
        templates["default"] = jinja_path.read_text(encoding="utf-8")
    # Processor-style checkpoints (multimodal Gemma) keep it in chat_template.json.
    for fname, cfg in [("chat_template.json", _read_json(d / "chat_template.json") or {}),
                       ("tokenizer_config.json", tok_cfg)]:
        template = cfg.get("chat_template")
        if templates or template is None:
            continue
        if isinstance(template, str):
            templates["default"] = template
        elif isinstance(template, list) and template:
            for i, t in enumerate(template):
                if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)):
                    raise ValueError(f"{d / fname}: chat_template[{i}] must be {{'name': str, 'template': str}}, "
                                     f"got {t!r:.80}")
                templates[t["name"]] = t["template"]
        else:
            raise ValueError(f"{d / fname}: chat_template must be a string or a non-empty list of {{name, template}}, "
                             f"got {template!r:.80}")
    extra = d / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.name[:-len(".jinja")]] = path.read_text(encoding="utf-8")
    return templates


def build_char_tokenizer(chars: Iterable[str], special_tokens: list[str], out_dir: str | Path,
                         chat_template: str | None = None, *, bos_token: str | None = None,
                         eos_token: str | None = None, pad_token: str | None = None,
                         extra_tokens: Iterable[str] = (), byte_fallback: bool = False) -> Tokenizer:
    """Write a char-level tokenizer.json + tokenizer_config.json for a tiny model and load it.

    Ids: special tokens first in the given order (['<pad>', '<eos>', '<bos>'] -> 0, 1, 2), then `chars`,
    then `extra_tokens` (multi-character tokens matched whole in text, e.g. '<r1c1:5>').
    Roles default to the conventional names '<bos>', '<eos>', '<pad>' when they are among the specials.
    There is no post-processor, so `encode` never adds a bos; add '<unk>' to the specials to map unknown
    characters to it instead of raising.
    `byte_fallback`: as SentencePiece and Gemma do, the 256 byte tokens `<0x00>`..`<0xFF>` come right after the
    specials and spell every character outside `chars` in its UTF-8 bytes (a space is the piece '\u2581').
    """
    chars = list(chars)
    for c in chars:
        if not isinstance(c, str) or len(c) != 1:
            raise ValueError(f"build_char_tokenizer: every entry of chars must be one character, got {c!r}")
    extra_tokens = list(extra_tokens)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []
    pieces = [SPACE_PIECE if c == " " else c for c in chars] if byte_fallback else chars
    vocab_list = list(special_tokens) + byte_tokens + pieces + extra_tokens
    if len(set(vocab_list)) != len(vocab_list):
        dupes = sorted({t for t in vocab_list if vocab_list.count(t) > 1})
        raise ValueError(f"build_char_tokenizer: duplicate entries in special_tokens + chars: {dupes}")
    roles = {}
    for role, given in [("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)]:
        if given is not None and given not in special_tokens:
            raise ValueError(f"build_char_tokenizer: {role} {given!r} is not in special_tokens {special_tokens}")
        token = given if given is not None else f"<{role[:3]}>"
        if token in special_tokens:
            roles[role] = token

    vocab = {t: i for i, t in enumerate(vocab_list)}
    unk = "<unk>" if "<unk>" in special_tokens else None
    if byte_fallback:  # no merges: one piece per character in the vocabulary, its UTF-8 bytes otherwise
        backend = _Backend(models.BPE(vocab, [], unk_token=unk, byte_fallback=True))
        backend.normalizer = normalizers.Replace(" ", SPACE_PIECE)
        backend.decoder = decoders.Sequence([decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(),
                                             decoders.Fuse()])
    else:
        backend = _Backend(models.WordLevel(vocab, unk_token=unk))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
        backend.decoder = decoders.Fuse()  # join pieces without the default space separator
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in list(special_tokens) + extra_tokens])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **roles}
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    return Tokenizer.from_dir(out)
