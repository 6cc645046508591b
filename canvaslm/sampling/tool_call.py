"""A call to one of several functions, chosen by the model: `{"name": "NAME", "arguments": {...}}`.

A canvas has a fixed layout before it is denoised, and the arguments of different functions have
different skeletons, so the call is laid out in two parts. The first canvases hold `{"name": "` pinned
and one slot that accepts `NAME", "arguments": ` for one of the functions, padded with whitespace to
the end of a canvas. Once those canvases are committed the name is known, and the canvases after them
hold that function's arguments as its parameter schema's JSON template (sampling/json_schema.py), then
`}` and EOS. The whitespace is valid JSON, so the output parses whatever the model picks; the model
picks the name, as it picks any enum value, from its own probabilities at commit.
"""

from __future__ import annotations

import json
import time

from .constraints import CanvasConstraint, ConstraintError, Layout, Slot, output_eos
from .json_schema import JsonSchemaConstraint
from .token_dfa import Vocab, literal_dfa

PREFIX = '{"name": "'
EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # a function without parameters: arguments {}


def declared_functions(tools, field: str = "tools") -> list:
    """[(name, parameters schema)] of OpenAI function declarations; ConstraintError naming the bad one."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ConstraintError(f"{field} must be a non-empty list of function declarations")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise ConstraintError(f"{field}[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                  "'parameters': {...}}}}")
        params = fn.get("parameters") or EMPTY_PARAMETERS
        if not isinstance(params, dict):
            raise ConstraintError(f"{field}[{i}].function.parameters must be a JSON schema object")
        if params.get("type", "object") not in ("object", ["object"]):
            raise ConstraintError(f"{field}[{i}].function.parameters of {name!r} must be an object schema "
                                  f"(type 'object'), got type {params['type']!r}")
        params = {"type": "object", **params}  # the arguments are an object: an untyped schema says so too
        out.append((name, params))
    if len({n for n, _ in out}) != len(out):
        raise ConstraintError(f"{field} declares a function name twice")
    return out


class _Deadline:
    """One compile limit (a server's --regex-timeout) shared by all the functions of a call: each schema
    compiles in the time the ones before it left, and running out names the function it ran out in."""

    def __init__(self, timeout: float | None, field: str, functions: int = 1):
        self.timeout, self.field, self.functions = timeout, field, functions
        self.at = None if timeout is None else time.monotonic() + timeout

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() > self.at

    def error(self, i: int, name: str) -> ConstraintError:
        shared = f" (all {self.functions} functions' schemas together)" if self.functions > 1 else ""
        return ConstraintError(f"{self.field}[{i}].function.parameters of {name!r}: compiling the tool call took "
                               f"longer than the limit of {self.timeout:g} s{shared}; simplify the schema")

    def left(self, i: int, name: str) -> float | None:
        """Seconds left for function i's schema (None: no limit); its error once none are."""
        if self.passed():
            raise self.error(i, name)
        return None if self.at is None else self.at - time.monotonic()

    def arguments(self, i: int, name: str, schema: dict, tokenizer) -> JsonSchemaConstraint:
        """Function i's arguments constraint in the time left; ConstraintErrors name the function."""
        try:
            return JsonSchemaConstraint(schema, tokenizer, timeout=self.left(i, name))
        except ConstraintError as e:
            if self.passed():  # its own limit was what was left: name the whole one
                raise self.error(i, name) from None
            raise ConstraintError(f"{self.field}[{i}].function.parameters: {e}") from None


def call_constraint(tools, tool_choice, tokenizer, field: str = "tools", canvas_length: int | None = None,
                    timeout: float | None = None):
    """(constraint, forced function name or None) for a reply that must be a call: tool_choice "required"
    (the model picks among several functions; with one, it is forced) or {"type": "function",
    "function": {"name": ...}}. A forced call's output is its arguments; a picked one's is
    `{"name": ..., "arguments": ...}` (`call_arguments` reads both). With canvas_length, arguments that
    cannot be laid out on canvases that long are refused here (a ConstraintError naming the function).
    `timeout`: seconds the whole compile may take, all the functions' schemas together (a ConstraintError
    naming `field` and the function after), as a server's --regex-timeout."""
    functions = declared_functions(tools, field)
    if tool_choice == "required" and len(functions) > 1:
        c = ToolChoiceConstraint(functions, tokenizer, field, timeout)
        if canvas_length is not None:
            for i, args in enumerate(c.arguments):
                try:
                    args.layout(canvas_length)
                except ConstraintError as e:
                    raise ConstraintError(f"{field}[{i}].function.parameters: {e}") from None
        return c, None
    if tool_choice == "required":
        index = 0
    else:
        name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
        names = [n for n, _ in functions]
        if name not in names:
            raise ConstraintError(f"tool_choice must be 'required' or name one of {names}, got {tool_choice!r}")
        index = names.index(name)
    c = _Deadline(timeout, field).arguments(index, functions[index][0], functions[index][1], tokenizer)
    try:
        if canvas_length is not None:
            c.layout(canvas_length)
        return c, functions[index][0]
    except ConstraintError as e:
        raise ConstraintError(f"{field}[{index}].function.parameters: {e}") from None


class ToolChoiceConstraint(CanvasConstraint):
    def __init__(self, tools: list, tokenizer, field: str = "tools", timeout: float | None = None):
        """tools: [(name, parameters JSON schema)] of at least two functions with distinct names. `timeout`:
        seconds the whole compile may take (every function's schema, and the names), a ConstraintError after."""
        if len(tools) < 2:
            raise ConstraintError(f"{field}: a choice of function needs at least two functions")
        names = [n for n, _ in tools]
        if len(set(names)) != len(names):
            raise ConstraintError(f"{field}: a function name is declared twice")
        self.vocab, self.names = Vocab.of(tokenizer), names
        if not self.vocab.ws_ids:
            raise ConstraintError(f"{field}: the tokenizer has no whitespace token to pad the function name with")
        self.eos_id = output_eos(tokenizer, field)
        self.prefix = self.vocab.encode(PREFIX)
        self.alternatives = [self.vocab.encode(f'{n}", "arguments": ') for n in names]
        self.close = self.vocab.encode("}")
        deadline = _Deadline(timeout, field, len(tools))
        self.arguments = [deadline.arguments(i, name, schema, tokenizer) for i, (name, schema) in enumerate(tools)]
        try:
            self.name_dfa = literal_dfa(self.vocab, self.alternatives, deadline.at)
        except ConstraintError:
            if deadline.passed():
                raise ConstraintError(f"{field}: compiling the tool call's function names took longer than the "
                                      f"limit of {timeout:g} s; declare fewer functions") from None
            raise
        self.chosen: int | None = None

    def for_row(self) -> "ToolChoiceConstraint":
        c = super().for_row()
        c.chosen, c._ids = None, {}
        return c

    def name_canvases(self, C: int) -> int:
        """Canvases the name part takes: the prefix and the longest name, rounded up to whole canvases."""
        return -(-(len(self.prefix) + max(len(a) for a in self.alternatives)) // C)

    def _layout_for(self, C: int, tool: int | None) -> Layout:
        base = self.name_canvases(C) * C
        pinned = self.prefix + [-1] * (base - len(self.prefix))
        slots = [Slot(len(self.prefix), base - len(self.prefix), self.name_dfa)]
        if tool is None:
            return Layout(pinned, slots)
        args = self.arguments[tool].layout(C)
        pinned = pinned + args.pinned[:-1] + self.close + [self.eos_id]  # its EOS becomes "}" EOS
        slots += [Slot(base + s.start, s.width, s.dfa, s.finish) for s in args.slots]
        return Layout(pinned, slots)

    def layout(self, C: int) -> Layout:
        return self._layout_for(C, self.chosen)

    def min_new_tokens(self, C: int) -> int:
        return max(self._layout_for(C, i).length for i in range(len(self.names)))

    def max_template_tokens(self, C: int) -> int:
        return self.min_new_tokens(C)

    def canvas(self, k: int, C: int, V: int):
        if k == 0:
            self.chosen, self._ids = None, {}
        return super().canvas(k, C, V)

    def commit(self, k: int, ids, logits):
        ids = super().commit(k, ids, logits)
        m = self.name_canvases(ids.shape[0])
        if k < m:
            self._ids = {**getattr(self, "_ids", {}), k: ids.tolist()}
            if k == m - 1:  # the name slot is complete: which alternative is it?
                flat = [t for j in range(m) for t in self._ids[j]][len(self.prefix):]
                hits = [i for i, a in enumerate(self.alternatives) if flat[:len(a)] == a]
                if not hits:
                    raise ConstraintError("internal: the committed name slot matches no function")
                self.chosen = max(hits, key=lambda i: len(self.alternatives[i]))
        return ids


def split_call(text: str, names: list) -> tuple[str, int] | None:
    """(name, offset where the arguments start) once `text` holds the whole name part and the first
    character of the arguments, else None. The arguments run to the last '}' (the wrapper's) at the end."""
    for name in names:
        head = f'{PREFIX}{name}", "arguments":'
        if text.startswith(head):
            rest = text[len(head):]
            start = len(rest) - len(rest.lstrip())
            return (name, len(head) + start) if start < len(rest) else None
    return None


def call_arguments(text: str, names: list, forced: str | None = None) -> tuple[str, str]:
    """(name, arguments JSON text) of a complete output (of `call_constraint`: `forced` is the forced
    function's name, None when the model picked among `names`); ValueError if it is not a call."""
    if forced is not None:
        json.loads(text)  # raises ValueError if the arguments do not parse
        return forced, text
    split = split_call(text, names)
    body = text.rstrip()
    if split is None or not body.endswith("}"):
        raise ValueError(f"not a complete function call: {text[:80]!r}")
    arguments = body[split[1]:-1]
    json.loads(arguments)  # raises ValueError if the arguments do not parse
    return split[0], arguments


__all__ = ["ToolChoiceConstraint", "declared_functions", "call_constraint", "split_call", "call_arguments",
           "PREFIX", "EMPTY_PARAMETERS"]
