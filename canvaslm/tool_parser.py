"""Tool calls in the model's own syntax (Gemma 4's; DiffusionGemma has Gemma 4's vocabulary), for
`tool_choice: "auto"`: the model writes text, calls, or both, and the calls are read out of its tokens.

A call is `<|tool_call>call:NAME{key:value,...}<tool_call|>`, where `<|tool_call>` and `<tool_call|>`
are single special tokens and every string value sits between two `<|"|>` tokens (no escapes inside).
Keys are bare words; values are strings, numbers, true / false / null, `{...}` objects and `[...]`
arrays, nested at most MAX_DEPTH deep. Gemma 4 models also drift from that syntax under long agent prompts
(reported to vLLM, Ollama and the MLX servers), and those calls are read too rather than lost: the argument
list in parentheses, `call:NAME(key:value, ...)` or `call:NAME(key=value, ...)`, and strings or keys in JSON's
double quotes (with its escapes) or in single quotes; `declared_name` reads a namespaced name
(`default_api:NAME`) as the declared tool it ends with. The parser works on token ids, since a plain decode drops
the special tokens. A block that does not parse stays in the text rather than becoming a wrong call, and so does
an unfinished one.
A reply that may call tools also stops at `<|tool_response>`: the tools' answers come from the caller.
This module has no torch dependency.
"""

from __future__ import annotations

import ast
import json
import math
import re

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
RESPONSE_OPEN = "<|tool_response>"  # after its calls the model would go on with the tools' answers: stop there
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_SINGLE_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'", re.DOTALL)
_JSON = json.JSONDecoder()
_STRUCTURAL = re.compile(r"[,{}\[\]()\"']")  # never inside a bare key
MAX_DEPTH = 64  # arrays and objects nested deeper than this are no call (and never reach Python's recursion limit)


class NativeSyntaxError(ValueError):
    """A call block whose text is not the native call syntax."""


class NativeToolParser:
    """Splits generated ids into text and calls. `for_tokenizer` gives None when the tokenizer lacks the
    call tokens (then the checkpoint has no native calls to read). names: the request's declared functions, which
    a namespaced call name is read as (`declared_name`)."""

    def __init__(self, tokenizer, open_id: int, close_id: int, names=()):
        self.tokenizer, self.open_id, self.close_id, self.names = tokenizer, open_id, close_id, tuple(names)

    @classmethod
    def for_tokenizer(cls, tokenizer, names=()) -> "NativeToolParser | None":
        try:
            ids = [tokenizer.token_to_id(t) for t in (CALL_OPEN, CALL_CLOSE, QUOTE)]
        except (KeyError, AttributeError):
            return None
        return cls(tokenizer, ids[0], ids[1], names)

    def split(self, ids: list, final: bool = False) -> tuple[str, list, bool]:
        """(text outside complete calls, [(name, arguments JSON text)], whether a call is still open).
        With `final`, an unfinished call is given back as text."""
        text, calls, still_open = self.split_at(ids, final)
        return text, [(name, args) for name, args, _ in calls], still_open

    def split_at(self, ids: list, final: bool = False) -> tuple[str, list, bool]:
        """As `split`, each call with where in the text it sat: [(name, arguments, offset)], the text before
        the call being text[:offset] (APIs whose replies are ordered blocks put it back there)."""
        text, calls, i, n = [], [], 0, len(ids)
        at = 0  # characters of text so far

        def add(part: str) -> None:
            nonlocal at
            text.append(part)
            at += len(part)

        while i < n:
            try:
                start = ids.index(self.open_id, i)
            except ValueError:
                add(self.tokenizer.decode(ids[i:]))
                break
            add(self.tokenizer.decode(ids[i:start]))
            try:
                end = ids.index(self.close_id, start + 1)
            except ValueError:  # the call is not finished (yet)
                if final:
                    add(self.tokenizer.decode(ids[start:], skip_special_tokens=False))
                return "".join(text), calls, not final
            body = self.tokenizer.decode(ids[start + 1:end], skip_special_tokens=False)
            try:
                name, args = parse_call(body)
                calls.append((declared_name(name, self.names), args, at))
            except NativeSyntaxError:
                add(self.tokenizer.decode(ids[start:end + 1], skip_special_tokens=False))
            i = end + 1
        return "".join(text), calls, False


def declared_name(name: str, names) -> str:
    """A call's name as the request declared it. Gemma 4 sometimes puts a namespace before it
    (`default_api:NAME`, `functions.NAME`); a function name holds neither ':' nor '.' (OpenAI's pattern), so
    the declared name such a name ends with is the one meant. Any other name is kept as written."""
    if name in names:
        return name
    tail = re.split(r"[:.]", name)[-1].strip()
    return tail if tail in names else name


def response_stop_ids(tokenizer) -> tuple:
    """Ids that end a reply that may call tools: the tool-response opener (the caller runs the tools)."""
    try:
        return (tokenizer.token_to_id(RESPONSE_OPEN),)
    except (KeyError, AttributeError):
        return ()


def parse_call(body: str) -> tuple[str, str]:
    """`call:NAME{...}` (or `call:NAME(...)`) -> (NAME, the arguments as JSON text)."""
    body = body.strip()
    opens = [k for k in (body.find("{"), body.find("(")) if k >= 0]
    if not body.startswith("call:") or not opens:
        raise NativeSyntaxError(f"not a call: {body[:60]!r}")
    at = min(opens)
    name = body[len("call:"):at].strip()
    if not name:
        raise NativeSyntaxError("a call without a function name")
    if body[at] == "{":
        value, pos = _value(body, at)
    else:  # the parenthesised drift: an object, or members whose keys may take `=`, up to `)`
        pos = _skip(body, at + 1)
        if body.startswith("{", pos):
            value, pos = _value(body, pos)
            if not body.startswith(")", pos):
                raise NativeSyntaxError(f"expected ')' at {body[pos:pos + 20]!r}")
            pos = _skip(body, pos + 1)
        else:
            value, pos = _members(body, pos, ")", 0, ":=")
    if pos != len(body) or not isinstance(value, dict):
        raise NativeSyntaxError(f"trailing text after the arguments of {name!r}")
    return name, json.dumps(value, ensure_ascii=False)


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def _string(s: str, i: int):
    """The string at s[i] and where it ends, or None when none starts there: `<|"|>`-quoted (the syntax), or in
    JSON's double quotes or single quotes (the drift)."""
    if s.startswith(QUOTE, i):
        end = s.find(QUOTE, i + len(QUOTE))
        if end < 0:
            raise NativeSyntaxError("an unclosed string")
        return s[i + len(QUOTE):end], end + len(QUOTE)
    if s.startswith('"', i):
        try:
            return _JSON.raw_decode(s, i)
        except ValueError:
            raise NativeSyntaxError(f"an unclosed or malformed JSON string at {s[i:i + 20]!r}") from None
    if s.startswith("'", i):
        m = _SINGLE_QUOTED.match(s, i)
        if m is None:
            raise NativeSyntaxError(f"an unclosed string at {s[i:i + 20]!r}")
        try:
            return ast.literal_eval(m.group(0)), m.end()
        except (ValueError, SyntaxError):
            raise NativeSyntaxError(f"a malformed string at {s[i:i + 20]!r}") from None
    return None


def _value(s: str, i: int, depth: int = 0):
    i = _skip(s, i)
    string = _string(s, i)
    if string is not None:
        return string[0], _skip(s, string[1])
    if i < len(s) and s[i] in "{[":
        if depth >= MAX_DEPTH:
            raise NativeSyntaxError(f"arguments nested more than {MAX_DEPTH} deep")
        return _members(s, _skip(s, i + 1), "}" if s[i] == "{" else "]", depth)
    for word, v in (("true", True), ("false", False), ("null", None)):
        if s.startswith(word, i):
            return v, _skip(s, i + len(word))
    m = _NUMBER.match(s, i)
    if m:
        text = m.group(0)
        try:
            number = float(text) if m.group(1) or m.group(2) else int(text)
        except ValueError:  # an integer over Python's digit limit for str -> int (4300)
            raise NativeSyntaxError(f"a number with too many digits ({len(text)}): {text[:20]!r}...") from None
        if not math.isfinite(number):
            raise NativeSyntaxError(f"a number out of JSON's range: {text[:20]!r}")
        return number, _skip(s, m.end())
    raise NativeSyntaxError(f"no value at {s[i:i + 20]!r}")


def _members(s: str, i: int, close: str, depth: int, seps: str = ":"):
    """An object's members (close `}` or `)`) or an array's items (`]`) from s[i] on, and where the value ends
    (past `close`). seps: what may stand between a key and its value."""
    out = [] if close == "]" else {}
    if i < len(s) and s[i] == close:
        return out, _skip(s, i + 1)
    while True:
        if isinstance(out, dict):
            key, i = _key(s, i, seps)
            out[key], i = _value(s, i, depth + 1)
        else:
            item, i = _value(s, i, depth + 1)
            out.append(item)
        if i < len(s) and s[i] == ",":
            i = _skip(s, i + 1)
            continue
        if i < len(s) and s[i] == close:
            return out, _skip(s, i + 1)
        raise NativeSyntaxError(f"expected ',' or {close!r} at {s[i:i + 20]!r}")


def _key(s: str, i: int, seps: str = ":") -> tuple[str, int]:
    i = _skip(s, i)
    string = _string(s, i)
    if string is not None:
        key, i = string
    else:
        ends = [k for k in (s.find(sep, i) for sep in seps) if k >= 0]
        if not ends:
            raise NativeSyntaxError(f"a key without ':' at {s[i:i + 20]!r}")
        key, i = s[i:min(ends)].strip(), min(ends)
        if _STRUCTURAL.search(key):  # not a key but a mangled list: `{a 1, b:2}` is no call
            raise NativeSyntaxError(f"a key without ':' at {key[:20]!r}")
    i = _skip(s, i)
    if i >= len(s) or s[i] not in seps or not key:
        raise NativeSyntaxError(f"expected 'key:' at {s[i:i + 20]!r}")
    return key, _skip(s, i + 1)


__all__ = ["NativeToolParser", "parse_call", "declared_name", "response_stop_ids", "NativeSyntaxError", "CALL_OPEN", "CALL_CLOSE",
           "QUOTE", "RESPONSE_OPEN"]
