"""JSON-schema structured output as a canvas template.

The schema compiles to a sequence of pieces: skeleton text (braces, keys, quotes, commas, colons),
pinned, and value slots of fixed token width, each with an automaton (see token_dfa) so that whatever
the model writes there, the committed slot is a valid value: integers and numbers padded with
trailing spaces (whitespace is valid JSON between tokens), strings of bounded length without escapes,
enums / booleans / null / const as a choice among whole token sequences. Every property is emitted
(so every `required` holds); arrays get a fixed item count within [minItems, maxItems]. The template
is followed by a pinned EOS, and may span several canvases.

Supported: type object / array / string / integer / number / boolean / null, properties, required,
additionalProperties (true/false, or a schema on an object without properties: a map of `array_items`
entries, pydantic's dict[str, X]), items, prefixItems (tuples), minItems, maxItems, minLength, maxLength, pattern (a regex the
content matches, anywhere unless anchored, compiled as guided_regex is), format (date, time, date-time, uuid,
ipv4, hostname, email, uri: patterns of values every validator takes), minimum, maximum,
exclusiveMinimum / exclusiveMaximum (integers; numbers: the nearest value past the bound in the 6th
decimal), enum, const; annotations (title, description, ...) are
ignored, $defs / definitions are read through $ref only. `$ref`: a JSON pointer into the root schema
("#/$defs/NAME", "#/definitions/NAME", "#"; ~0 / ~1 escapes), compiled in place; a recursion stops at the
first union with null (writes null) or array without minItems (writes []), else it is refused naming the
cycle. `allOf` of one schema is that schema; of several, their merge (properties and required joined,
bounds tightened; members that disagree otherwise are refused). `anyOf` / `oneOf` / 'type' lists of scalars (string, integer,
number, boolean, null, enum, const: pydantic's Optional[int], int | str) are one slot whose automaton is
the union of the alternatives' (token_dfa.union_dfa), as wide as the widest. A oneOf's alternatives must
exclude each other (`_Compiler.excludes`: different types, consts, or object keys one requires or forbids),
else it is refused naming two of them: a value both take is invalid under oneOf. A union of one object / array with null (Optional[Model])
always writes the object / array (a valid value of it). Other unions with an object / array (pydantic's
Cat | Dog, discriminated unions, list[int] | str) are one slot too: each alternative compiles to its own
template, and the slot's automaton takes any alternative's template (token_dfa.sequence_dfa: its skeleton
tokens and value slots in order) padded with whitespace to the widest. Anything else raises ConstraintError naming the keyword. An enum or const keeps
only the values the schema's other keywords allow (ConstraintError when none is left). A value the schema leaves open
(`{}`, an object with no `properties` keyword that allows others, an array without items) is one slot of
`free_tokens` that takes any JSON of its kind, nested a few levels at most (sampling.json_any). An
explicit `"properties": {}` stays `{}`, as tools without arguments declare it. A template over
`JsonTemplateOptions.max_tokens` tokens (at most MAX_TEMPLATE_TOKENS) is refused while it compiles.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, localcontext
from urllib.parse import unquote

from .constraints import CanvasConstraint, ConstraintError, Layout, Slot, output_eos
from .json_any import json_dfa
from .regex_fsm import RegexCompileError, char_fsm, char_fsm_with_deadline
from .token_dfa import (Vocab, dfa_accepts, literal_dfa, number_dfa, pattern_string_dfa, sequence_dfa, string_dfa,
                        union_dfa)

# (`discriminator`, OpenAPI's, which pydantic writes next to a tagged union's oneOf, names the tag the
# alternatives already pin: nothing more to hold)
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "discriminator"}
KEYWORDS = {
    "object": {"type", "properties", "required", "additionalProperties"},
    "array": {"type", "items", "prefixItems", "minItems", "maxItems"},
    "string": {"type", "minLength", "maxLength", "pattern", "format"},
    "integer": {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": {"type"},
    "null": {"type"},
}
CONTAINERS = {"$defs", "definitions"}  # where $ref targets live: allowed anywhere, compiled only through a $ref
SCALARS = {"string", "integer", "number", "boolean", "null"}
NUMERIC = {"integer", "number"}  # keywords of one (minimum, exclusiveMaximum, ...) bind both
_PY_TYPES = {"string": str, "boolean": bool, "null": type(None), "object": dict, "array": list}
MAX_TEMPLATE_TOKENS = 1 << 17  # a template over this many tokens is refused while it compiles
# JSON schema `format`s written as patterns of values every validator takes: dates only where every year has
# them (no 29 February, no 31 in a 30-day month), times with an offset as RFC 3339 (and pydantic) require
_DATE = (r"[1-9][0-9]{3}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)"
         r"|(?:0[13578]|1[02])-31)")
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_LABEL = r"[a-z0-9]{1,12}(?:-[a-z0-9]{1,8})?"  # no "--" (IDNA reserves it at places 3-4)
_TLD = r"[a-z]{2,6}"  # a top-level label of letters: an all-digit last label reads as an IPv4 address
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    "hostname": rf"(?:{_LABEL}\.){{0,2}}{_TLD}",
    "email": rf"[a-z0-9_+-]{{1,16}}(?:\.[a-z0-9_+-]{{1,15}})?@(?:{_LABEL}\.){{1,2}}{_TLD}",  # a dot-atom local part
    "uri": rf"https?://(?:{_LABEL}\.){{1,2}}{_TLD}(?:/[A-Za-z0-9._~-]{{1,16}}){{0,2}}",
}


@dataclass(frozen=True)
class JsonTemplateOptions:
    """Widths (in tokens) of value slots and defaults for unbounded schemas."""

    string_tokens: int = 24  # content tokens of a string without a smaller maxLength
    integer_tokens: int = 8  # sign + digits + padding
    number_tokens: int = 12
    array_items: int = 3  # item count when the schema allows it: clamped to [minItems, maxItems]
    free_tokens: int = 64  # tokens of a value the schema leaves free ({}, an object without properties, ...)
    enum_range: int = 64  # integer ranges up to this size become an enum (exact bounds by construction)
    max_depth: int = 32  # levels of objects, arrays, $refs, allOfs and unions (a longer chain is refused)
    max_tokens: int | None = None  # refuse a template over this many tokens (EOS included), else MAX_TEMPLATE_TOKENS

    def __post_init__(self):
        for name in ("string_tokens", "integer_tokens", "number_tokens", "enum_range", "max_depth", "free_tokens"):
            if getattr(self, name) < 1:
                raise ConstraintError(f"JsonTemplateOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.array_items < 0:
            raise ConstraintError(f"JsonTemplateOptions.array_items must be >= 0, got {self.array_items}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConstraintError(f"JsonTemplateOptions.max_tokens must be >= 1, got {self.max_tokens}")


class _Cycle(ConstraintError):
    """A $ref met again inside its own expansion: a union with null or an array that may be empty stops
    there (null, []), anything else refuses the schema with this error."""


class _Lit:
    """A union member's literal values (token sequences), joined with the others' into one automaton."""

    def __init__(self, alts: list):
        self.alts = alts


class _Exact(tuple):
    """A (width, dfa, finish) value slot whose width is a bound of its value (see _Compiler.slot)."""


class _Str:
    """A union member's string of lo..hi characters (hi None: any), whose automaton waits for the union's
    width: a maxLength that a narrower string slot could never reach may be reached in a wider union slot.
    `pattern`: a regex its content must match whole (a `pattern` or `format`), and where (for errors)."""

    def __init__(self, width: int, lo: int, hi, pattern: str | None = None, path: str = ""):
        self.width, self.lo, self.hi, self.pattern, self.path = width, lo, hi, pattern, path


def _branches(pattern: str) -> list[str]:
    """A regex's top-level alternatives (split at each `|` outside groups and classes)."""
    out, cur, depth, in_class, i = [], [], 0, False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            cur.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "^":
                cur.append(c)
                c, i = "^", i + 1
            if pattern[i + 1:i + 2] == "]":  # a leading ] is a literal
                cur.append(c)
                c, i = "]", i + 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append("".join(cur))
            cur, i = [], i + 1
            continue
        cur.append(c)
        i += 1
    return out + ["".join(cur)]


def _whole_match(pattern: str) -> str:
    """A JSON schema `pattern` (which matches anywhere in the string unless anchored) as a regex that must match
    the whole string: its top-level alternatives grouped by the sides they anchor, each group with `.*` on a side
    it does not (one `.*` around a group: `.*(?:cat).*|.*(?:dog).*|...` grows exponentially as an automaton)."""
    groups: dict = {}
    for b in _branches(pattern):
        start = b.startswith("^")
        b = b[1:] if start else b
        slashes = len(b[:-1]) - len(b[:-1].rstrip("\\"))  # before the last character: an odd count escapes it
        end = b.endswith("$") and slashes % 2 == 0
        groups.setdefault((start, end), []).append(b[:-1] if end else b)
    return "|".join(("" if start else ".*") + "(?:" + "|".join(bs) + ")" + ("" if end else ".*")
                    for (start, end), bs in groups.items())


def _match_lengths(fsm) -> tuple[int, int | None]:
    """(fewest, most) characters of a match of a character automaton; most None when matches may be as long as
    they like (a loop on the way to a final state); (0, 0) when nothing matches."""
    live = set(fsm.finals)  # states from which a final state is reached
    back: dict = {}
    for q, row in fsm.trans.items():
        for t in row.values():
            back.setdefault(t, set()).add(q)
    todo = list(live)
    while todo:
        for q in back.get(todo.pop(), ()):
            if q not in live:
                live.add(q)
                todo.append(q)
    if fsm.initial not in live:
        return 0, 0
    succ = {q: {t for t in fsm.trans.get(q, {}).values() if t in live} for q in live}
    dist, frontier, fewest = {fsm.initial: 0}, [fsm.initial], None
    while frontier and fewest is None:  # breadth first: the first final state met is the nearest
        fewest = next((dist[q] for q in frontier if q in fsm.finals), None)
        nxt = []
        for q in frontier:
            for t in succ[q]:
                if t not in dist:
                    dist[t] = dist[q] + 1
                    nxt.append(t)
        frontier = nxt
    most, state, order = {}, {}, [(fsm.initial, False)]  # longest path by depth-first search; a loop: None
    while order:
        q, done = order.pop()
        if done:
            state[q] = 2
            most[q] = max([most[t] + 1 for t in succ[q]] + ([0] if q in fsm.finals else []))
            continue
        if state.get(q) == 2:
            continue
        if state.get(q) == 1:
            return fewest or 0, None
        state[q] = 1
        order.append((q, True))
        for t in succ[q]:
            if state.get(t) == 1:
                return fewest or 0, None
            if state.get(t) != 2:
                order.append((t, False))
    return fewest or 0, most[fsm.initial]


_LOWER = {"minimum", "exclusiveMinimum", "minLength", "minItems"}  # allOf keeps the largest
_UPPER = {"maximum", "exclusiveMaximum", "maxLength", "maxItems"}  # ... and the smallest


def _merged(members: list, path: str) -> dict:
    """One schema for all of `members` (each an object, $refs resolved): properties joined (a property two members
    give is the allOf of both), required joined, bounds tightened, additionalProperties false kept where every
    property is one of that member's; any other keyword must agree."""
    out, closed = {}, []
    for i, m in enumerate(members):
        where = f"{path}.allOf[{i}]"
        if not isinstance(m, dict):
            raise ConstraintError(f"json_schema: allOf member at {where} must be a schema object")
        if "anyOf" in m or "oneOf" in m or "allOf" in m or isinstance(m.get("type"), list):
            raise ConstraintError(f"json_schema: a union inside an allOf of several schemas is not supported (at "
                                  f"{where})")
        for k, v in m.items():
            if k in ANNOTATIONS or k in CONTAINERS:
                out.setdefault(k, v)
            elif k == "additionalProperties":
                if v is False:
                    closed.append(set(m.get("properties", {})))
                elif v is not True:
                    raise ConstraintError(f"json_schema: an 'additionalProperties' schema in an allOf of several "
                                          f"schemas is not supported (at {where})")
            elif k not in out:
                out[k] = dict(v) if k == "properties" and isinstance(v, dict) else v
            elif k == "properties" and isinstance(v, dict) and isinstance(out[k], dict):
                for name, sub in v.items():
                    old = out[k].get(name)
                    out[k][name] = sub if old is None or old == sub else {"allOf": [old, sub]}
            elif k == "required" and isinstance(v, list) and isinstance(out[k], list):
                out[k] = list(dict.fromkeys(out[k] + v))
            elif k in _LOWER | _UPPER and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              for x in (v, out[k])):
                out[k] = max(out[k], v) if k in _LOWER else min(out[k], v)
            elif not _same(out[k], v):
                raise ConstraintError(f"json_schema: the allOf members disagree on {k!r} ({out[k]!r:.40} and "
                                      f"{v!r:.40}) (at {where})")
    names = set(out.get("properties", {}))
    for member in closed:
        if names - member:
            raise ConstraintError(f"json_schema: an allOf member with additionalProperties false does not list "
                                  f"{sorted(names - member)[:3]} (at {path})")
    if closed:
        out["additionalProperties"] = False
    return out


def _fills(dfa, width: int) -> bool:
    """Whether some value fills a slot of `width` tokens from the automaton's start (an accepted sequence of exactly
    that many tokens, padding included)."""
    return bool(dfa.coreach_rows(width)[width][dfa.start])


def _fsm_matches(fsm, value: str) -> bool:
    """Whether a character automaton takes `value` whole (linear in its length, whatever the pattern)."""
    q = fsm.initial
    for c in value:
        q = fsm.step(q, fsm.classify(c))
        if q is None:
            return False
    return q in fsm.finals


def _type_ok(value, typ: str) -> bool:
    if typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, float) and value.is_integer())
    if typ == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _PY_TYPES[typ])


def _finite(value) -> bool:
    """Whether a JSON value holds no NaN / Infinity (which Python's json reads, and 1e400 becomes)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _same(a, b) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _key(v):
    """A hashable key of a JSON value, equal for two values exactly when _same says they are: numbers by
    value (1 and 1.0 share a key, Python hashes equal numbers alike), booleans apart from numbers."""
    if isinstance(v, bool):
        return "b", v
    if isinstance(v, (int, float)):
        return "n", v
    if isinstance(v, list):
        return "l", tuple(_key(x) for x in v)
    if isinstance(v, dict):
        return "d", frozenset((k, _key(x)) for k, x in v.items())
    return "o", type(v), v  # str, None (and what else a Python caller sends: _same compares it with ==)


class _Members:
    """Membership in an enum by _same, in O(1) per value (a scan per value made a large enum quadratic)."""

    def __init__(self, values: list):
        self.values = values
        try:
            self.keys = {_key(v) for v in values}
        except TypeError:  # an unhashable value from a Python caller: scan as _same does
            self.keys = None

    def __contains__(self, v) -> bool:
        if self.keys is not None:
            try:
                return _key(v) in self.keys
            except TypeError:
                pass
        return any(_same(v, e) for e in self.values)


class _Compiler:
    """Schema -> pieces: str (skeleton text) or (width, dfa, finish) value slots. `size` is a lower bound
    on the template's tokens (EOS included): slot widths plus text characters over the longest token's."""

    def __init__(self, vocab: Vocab, opts: JsonTemplateOptions, timeout: float | None = None):
        self.vocab, self.opts, self.pieces = vocab, opts, []
        self.cap = min(opts.max_tokens or MAX_TEMPLATE_TOKENS, MAX_TEMPLATE_TOKENS)
        self.size, self.at = 1, "$"
        self.longest = vocab.longest
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        # per schema object (id -> (schema, result)), so that each is checked / indexed once however many
        # enum values are tested against it; the schema is kept so that its id is not reused meanwhile
        self.checked: dict = {}
        self.members: dict = {}
        self.unions: dict = {}  # id -> (schema, its alternatives or None), as `checked`
        self.kinds: dict = {}  # (id, the $refs being expanded) -> (schema, its kind), as `checked`
        self.shown: dict = {}  # a whole-match regex -> how the schema wrote it ("'pattern' 'ab'", "format 'date'")
        self.merges: dict = {}  # id -> (an allOf schema, its members merged), as `checked`
        self.root = None  # the schema that "#/..." $refs point into (the first one compiled if not set)
        self.refs: list = []  # the $refs being expanded, outermost first: one met again is a recursion
        self.quoted = 0  # > 0 while compiling a union member: strings take their quotes into the slot

    def in_time(self):
        """ConstraintError once the compile is past its deadline (a server's --regex-timeout)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ConstraintError(f"json_schema: compiling the schema took longer than the limit of "
                                  f"{self.timeout:g} s (at {self.at}); simplify it")

    def check(self, more: float = 0):
        """ConstraintError once the template (and `more` tokens) is over the token limit."""
        if self.size + more > self.cap:
            limit = f"the limit of {self.cap} tokens" if self.cap != self.opts.max_tokens else f"max_tokens={self.cap}"
            raise ConstraintError(f"json_schema: the output template is over {limit} (at {self.at})")

    def text(self, s: str):
        self.pieces.append(s)
        self.size += len(s) / self.longest
        self.check()

    def slot(self, width: int, dfa, finish=None, exact: bool = False):
        """A value slot; `exact`: its width bounds its value (a maxLength or a digit count the slot could never
        exceed was dropped from its automaton), so a template union keeps it at exactly that width."""
        self.pieces.append(_Exact((width, dfa, finish)) if exact else (width, dfa, finish))
        self.size += width
        self.check()

    def merged(self, pieces: list | None = None) -> list:
        """The pieces (the template's, or those given) with adjacent texts joined (so that they are tokenized
        together)."""
        out = []
        for p in self.pieces if pieces is None else pieces:
            if isinstance(p, str) and out and isinstance(out[-1], list):
                out[-1].append(p)
            else:
                out.append([p] if isinstance(p, str) else p)
        return ["".join(p) if isinstance(p, list) else p for p in out]

    def literal(self, values: list, path: str):
        alts = []
        for v in values:
            self.in_time()
            try:
                alts.append(self.vocab.encode(json.dumps(v, ensure_ascii=False)))
            except ConstraintError as e:
                raise ConstraintError(f"json_schema: {e} (at {path})") from None
        if self.quoted:  # a union member: joined with the union's other literals into one automaton
            self.pieces.append(_Lit(alts))
            return
        if len({tuple(a) for a in alts}) == 1:
            self.text(json.dumps(values[0], ensure_ascii=False))
            return
        try:
            dfa = literal_dfa(self.vocab, alts, self.deadline)
        except ConstraintError:
            self.in_time()  # the automaton ran out of time: say so as the compile's timeout
            raise
        self.slot(max(len(a) for a in alts), dfa)

    def value(self, schema, path: str, depth: int):
        self.at = path
        self.in_time()
        self.deep(depth, path)
        if self.root is None:
            self.root = schema
        if isinstance(schema, dict):  # a $ref, allOf or union is a level too: a chain of them ends at max_depth
            if "$ref" in schema:
                return self.ref(schema, path, lambda target: self.value(target, path, depth + 1))
            if "allOf" in schema:
                return self.value(self.all_of(schema, path), path, depth + 1)
            union = self.alternatives(schema, path)
            if union is not None and not (union[0] == "type" and ("enum" in schema or "const" in schema)):
                return self.union(*union, path, depth + 1)
        typ = self.keywords(schema, path, depth)
        if "const" in schema or "enum" in schema:
            return self.literal(self.choices(schema, path, depth), path)
        if typ is None:  # only annotations are left (checked above): {} is any JSON value
            return self.free("any")
        getattr(self, "_" + typ)(schema, path, depth)

    def deep(self, depth: int, path: str):
        """ConstraintError once `depth` (objects, arrays, $refs, allOfs, unions entered) is over max_depth."""
        if depth > self.opts.max_depth:
            raise ConstraintError(f"json_schema: nesting deeper than {self.opts.max_depth} levels at {path}")

    def keywords(self, schema, path: str, depth: int):
        """The schema's type (None if it has none), after a ConstraintError for what is not supported.
        Checked once per schema object (the first check's path names an error), its depth every time."""
        self.deep(depth, path)  # here, not cached: a schema object met again deeper (or a cycle)
        hit = self.checked.get(id(schema))
        if hit is not None and hit[0] is schema:
            return hit[1]
        typ = self.checked_keywords(schema, path, depth)
        self.checked[id(schema)] = schema, typ
        return typ

    def checked_keywords(self, schema, path: str, depth: int):
        """The type: None, a name, or a tuple of names (a 'type' list, with an enum / const; see alternatives)."""
        if not isinstance(schema, dict):
            raise ConstraintError(f"json_schema: schema at {path} must be an object, got {type(schema).__name__}")
        types = self.types(schema, path)
        typ = None if types is None else types[0] if len(types) == 1 else types
        allowed = set().union(*(KEYWORDS[t] for t in types)) if types else {"type"}
        allowed |= ANNOTATIONS | CONTAINERS | {"enum", "const"}
        for key in schema:
            if key not in allowed:
                raise ConstraintError(f"json_schema: {key!r} is not supported (at {path})")
        if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
            raise ConstraintError(f"json_schema: 'enum' must be a non-empty list (at {path})")
        for key in ("const", "enum"):
            if key in schema and not _finite(schema[key]):
                raise ConstraintError(f"json_schema: {key!r} holds a non-finite number (NaN or Infinity), which "
                                      f"JSON cannot write (at {path})")
        return typ

    @staticmethod
    def types(schema: dict, path: str):
        """schema["type"] as a tuple of distinct supported names (None without one), else a ConstraintError."""
        typ = schema.get("type")
        if typ is None:
            return None
        types = tuple(dict.fromkeys(typ)) if isinstance(typ, list) else (typ,)
        if not types or not all(isinstance(t, str) for t in types):
            raise ConstraintError(f"json_schema: 'type' must be a type name or a non-empty list of them, got {typ!r} "
                                  f"(at {path})")
        for t in types:
            if t not in KEYWORDS:
                raise ConstraintError(f"json_schema: type {t!r} is not supported (at {path})")
        return types

    # --- $ref, allOf, anyOf / oneOf / type lists --------------------------------------------------

    def target(self, schema: dict, path: str):
        """(ref, the schema it points at) for a local $ref: a JSON pointer into the root schema
        ("#/$defs/NAME", "#/definitions/NAME", "#", with ~0 / ~1 escapes), else a ConstraintError."""
        ref = schema["$ref"]
        for key in schema:
            if key != "$ref" and key not in ANNOTATIONS and key not in CONTAINERS:
                raise ConstraintError(f"json_schema: {key!r} next to '$ref' is not supported (at {path})")
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ConstraintError(f"json_schema: $ref {ref!r} is not supported: only refs into the schema itself, "
                                  f"like '#/$defs/NAME' (at {path})")
        node = self.root
        for part in ref[2:].split("/") if ref != "#" else ():
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ConstraintError(f"json_schema: $ref {ref!r} points at nothing in the schema (at {path})")
        return ref, node

    def ref(self, schema: dict, path: str, then):
        """then(target) for the schema a $ref points at, with the ref on the stack meanwhile (a _Cycle when
        it is already there: the template is finite)."""
        ref, target = self.target(schema, path)
        if ref in self.refs:
            cycle = " -> ".join(self.refs[self.refs.index(ref):] + [ref])
            raise _Cycle(f"json_schema: recursive $ref {cycle} (at {path}) is not supported: the output template is "
                         "finite, so a recursion must be able to stop at a null alternative (anyOf with "
                         "{'type': 'null'}) or an array without minItems")
        self.refs.append(ref)
        try:
            return then(target)
        finally:
            self.refs.pop()

    def all_of(self, schema: dict, path: str):
        """The schema an allOf stands for: its one member (as pydantic writes around a $ref), or its members merged
        (an OpenAPI-style extension of a base object: properties and required joined, bounds tightened; members
        that disagree otherwise, or a union among them, are a ConstraintError). Merged once per schema object."""
        subs = schema["allOf"]
        if not isinstance(subs, list) or not subs:
            raise ConstraintError(f"json_schema: 'allOf' must be a non-empty list of schemas (at {path})")
        for key in schema:
            if key != "allOf" and key not in ANNOTATIONS and key not in CONTAINERS:
                raise ConstraintError(f"json_schema: {key!r} next to 'allOf' is not supported (at {path})")
        if len(subs) == 1:
            return subs[0]
        hit = self.merges.get(id(schema))
        if hit is None or hit[0] is not schema:
            members = [self.resolved(m, f"{path}.allOf[{i}]") for i, m in enumerate(subs)]
            hit = self.merges[id(schema)] = schema, _merged(members, path)
        return hit[1]

    def alternatives(self, schema: dict, path: str):
        """(keyword, [(schema, path)]) for a union: anyOf / oneOf, or a 'type' list (one schema per type, with
        that type's keywords); None for any other schema. Once per schema object, as `keywords`."""
        hit = self.unions.get(id(schema))
        if hit is None or hit[0] is not schema:
            hit = self.unions[id(schema)] = schema, self.split(schema, path)
        return hit[1]

    def split(self, schema: dict, path: str):
        keys = [k for k in ("anyOf", "oneOf") if k in schema]
        if keys:
            key, alts = keys[0], schema[keys[0]]
            if not isinstance(alts, list) or not alts:
                raise ConstraintError(f"json_schema: {key!r} must be a non-empty list of schemas (at {path})")
            for k in schema:
                if k != key and k not in ANNOTATIONS and k not in CONTAINERS:
                    raise ConstraintError(f"json_schema: {k!r} next to {key!r} is not supported (at {path})")
            return key, [(a, f"{path}.{key}[{i}]") for i, a in enumerate(alts)]
        types = self.types(schema, path)
        if types is None or len(types) == 1:
            return None
        self.keywords(schema, path, 0)  # every keyword belongs to one of the types
        for t in types:  # a keyword that binds this type too (minimum: integers and numbers) must be honoured
            family = NUMERIC if t in NUMERIC else {t}
            for k in schema:
                if k not in KEYWORDS[t] and any(k in KEYWORDS[f] for f in family):
                    raise ConstraintError(f"json_schema: {k!r} is not supported for type {t!r} (at {path}<{t}>)")
        return "type", [({k: v for k, v in schema.items() if k in KEYWORDS[t]} | {"type": t}, f"{path}<{t}>")
                        for t in types]

    def kind(self, schema, path: str, depth: int, seen: frozenset = frozenset()) -> str:
        """'null', 'scalar' (a value one slot takes: string, number, boolean, enum, ...) or 'other' (an
        object, an array, any value, a recursion), through $ref, allOf and nested unions.
        A schema that reaches a recursion is 'other' whichever way it is reached (max over the alternatives),
        so the kind is kept per schema object and compile stack (`self.refs`), not per path: unions whose
        alternatives $ref the same schema, chained, would otherwise be visited once per path (2**n). Each
        $ref, allOf and union is a level deeper, as when compiled."""
        self.in_time()
        while isinstance(schema, dict) and ("$ref" in schema or "allOf" in schema):
            depth += 1
            self.deep(depth, path)
            if "$ref" in schema:
                ref, schema = self.target(schema, path)
                if ref in seen or ref in self.refs:
                    return "other"  # a recursion: compiled as one (it stops at null or is refused)
                seen = seen | {ref}
            else:
                schema = self.all_of(schema, path)
        if not isinstance(schema, dict):
            return "other"  # refused when compiled
        key = id(schema), tuple(self.refs)
        hit = self.kinds.get(key)
        if hit is None or hit[0] is not schema:
            hit = self.kinds[key] = schema, self.own_kind(schema, path, depth, seen)
        return hit[1]

    def own_kind(self, schema: dict, path: str, depth: int, seen: frozenset) -> str:
        """kind() of a schema that is neither a $ref nor an allOf."""
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            return "null" if isinstance(values, list) and all(v is None for v in values) else "scalar"
        union = self.alternatives(schema, path)
        if union is not None:
            kinds = {self.kind(a, p, depth + 1, seen) for a, p in union[1]}
            return "other" if "other" in kinds else "scalar" if "scalar" in kinds else "null"
        typ = schema.get("type")
        return "null" if typ == "null" else "scalar" if typ in SCALARS else "other"

    def union(self, key: str, alts: list, path: str, depth: int):
        """anyOf / oneOf / a 'type' list. Scalar alternatives: one slot that takes any of them. One object /
        array alternative, the others null: that alternative's template, always written (a valid value
        of the union), or null where it recurses. Else: one slot that takes any alternative's template."""
        if len(alts) == 1:
            return self.value(alts[0][0], alts[0][1], depth)
        if key == "oneOf":  # a value two alternatives both take is invalid under oneOf
            for i, (a, pa) in enumerate(alts):
                for b, pb in alts[i + 1:]:
                    if not (self.excludes(a, b, pa) and self.excludes(b, a, pb)):
                        raise ConstraintError(
                            f"json_schema: 'oneOf' alternatives {pa} and {pb} may both take one value, which oneOf "
                            "then refuses: tell them apart (different types, or a required property with a different "
                            f"const in each, as a tagged union has) or use anyOf (at {path})")
        kinds = [self.kind(a, p, depth) for a, p in alts]
        others = [i for i, k in enumerate(kinds) if k == "other"]
        if not others:
            return self.scalar_union(alts, path, depth)
        if len(others) == 1 and kinds.count("null") == len(alts) - 1:
            start, size = len(self.pieces), self.size
            try:
                return self.value(*alts[others[0]], depth)
            except _Cycle:
                del self.pieces[start:]
                self.size = size
                return self.text("null")
        return self.template_union(alts, path, depth)

    def template_union(self, alts: list, path: str, depth: int):
        """A union with an object, an array or any value among its alternatives: one slot whose automaton takes
        any alternative's whole template (its skeleton's tokens and its value slots in order,
        token_dfa.sequence_dfa), padded with whitespace to the widest. An alternative that recurses without a
        stop is left out while another remains."""
        start, size = len(self.pieces), self.size
        members, cycle = [], None
        for a, p in alts:
            got = None
            try:
                self.value(a, p, depth)
                got = self.pieces[start:]
            except _Cycle as e:
                cycle = cycle or e
            finally:
                del self.pieces[start:]
                self.size = size
            if got is not None:
                members.append(self.sequence(got, p))
        self.at = path
        if not members:
            raise cycle
        width = max(sum(len(x) if isinstance(x, list) else x[0] for x in m) for m in members)
        try:
            dfas = [sequence_dfa(self.vocab, _counted(m), self.deadline) for m in members]
            dfa = union_dfa(self.vocab, dfas, self.deadline)
        except ConstraintError:
            self.in_time()  # an automaton ran out of time: say so as the compile's timeout
            raise
        finishes = [_sequence_finish(m) for m in members]
        finish = _union_finish(self.vocab, list(zip(dfas, finishes)), width) if any(finishes) else None
        self.slot(width, dfa, finish)

    def resolved(self, schema, path: str):
        """The schema behind $refs and allOfs of one (None for a chain longer than max_depth: a loop)."""
        for _ in range(self.opts.max_depth):
            if not isinstance(schema, dict) or not ("$ref" in schema or "allOf" in schema):
                return schema
            schema = self.target(schema, path)[1] if "$ref" in schema else self.all_of(schema, path)
        return None

    def json_kinds(self, schema, path: str, depth: int = 0) -> set:
        """The JSON kinds ("object", "array", "string", "number", "boolean", "null") a value of `schema` may have."""
        everything = {"object", "array", "string", "number", "boolean", "null"}
        schema = self.resolved(schema, path)
        if not isinstance(schema, dict) or depth > self.opts.max_depth:
            return everything
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            return {k for v in values if isinstance(values, list) for k in everything if _type_ok(v, k)}
        union = self.alternatives(schema, path)
        if union is not None:
            return set().union(*(self.json_kinds(a, p, depth + 1) for a, p in union[1]))
        typ = schema.get("type")
        return everything if typ is None else {"number" if typ == "integer" else typ}

    def excludes(self, a, b, path: str, depth: int = 0) -> bool:
        """Whether no value that `a`'s template writes is valid under `b` (a sure answer, False when unsure): their
        kinds differ, `a`'s values are consts that `b` refuses, or `a`'s object (which writes every property it
        lists) lacks a property `b` requires, has one `b` forbids, or has one whose values `b`'s refuses."""
        if depth > self.opts.max_depth:
            return False
        if not self.json_kinds(a, path) & self.json_kinds(b, path):
            return True
        a, b = self.resolved(a, path), self.resolved(b, path)
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return False
        if "const" in a or "enum" in a:
            values = [a["const"]] if "const" in a else a["enum"]
            return not any(self.fits(v, b, path, depth) for v in values)
        union = self.alternatives(a, path)
        if union is not None:  # a union: each of its alternatives
            return all(self.excludes(x, b, p, depth + 1) for x, p in union[1])
        if (a.get("type") != "object" or b.get("type") != "object" or self.alternatives(b, path) is not None
                or "properties" not in a):  # (an object without properties is written as any object)
            return False
        props, _, _ = self.object_keywords(a, path)
        b_props, b_extra, b_required = self.object_keywords(b, path)
        return (any(k not in props for k in b_required) or (not b_extra and any(k not in b_props for k in props))
                or any(self.excludes(props[k], b_props[k], f"{path}.{k}", depth + 1) for k in props if k in b_props))

    def sequence(self, pieces: list, path: str) -> list:
        """An alternative's pieces as sequence_dfa parts: its texts (adjacent ones joined) as token ids, its
        slots as they are."""
        if not all(isinstance(p, (str, tuple)) for p in pieces):
            raise ConstraintError(f"json_schema: alternative {path} is not a template (internal)")
        try:
            return [self.vocab.encode(p) if isinstance(p, str) else p for p in self.merged(pieces)]
        except ConstraintError as e:
            raise ConstraintError(f"json_schema: {e} (at {path})") from None

    def scalar_union(self, alts: list, path: str, depth: int):
        """One slot whose automaton takes any alternative: each compiled alone (a string's quotes inside the
        slot), the literals joined in one automaton, then the product of all (token_dfa.union_dfa); its width
        the widest."""
        start, size = len(self.pieces), self.size
        lits, members = [], []  # members: _Str or (width, dfa, finish) slots
        self.quoted += 1
        try:
            for a, p in alts:
                self.value(a, p, depth)
                got = self.pieces[start:]
                del self.pieces[start:]
                self.size = size
                if all(isinstance(g, str) for g in got):  # null, a const of one spelling
                    lits.append(self.vocab.encode("".join(got)))
                    continue
                for g in got:  # one piece, or a nested union's parts
                    if isinstance(g, _Lit):
                        lits += g.alts
                    elif isinstance(g, (_Str, tuple)):
                        members.append(g)
                    else:
                        raise ConstraintError(f"json_schema: alternative {p} is not one value slot (at {path})")
        finally:
            self.quoted -= 1
            self.at = path
        if self.quoted:  # inside an enclosing union: its parts join that union's
            self.pieces += members + ([_Lit(lits)] if lits else [])
            return
        self.slot(*self.joined(lits, members))

    def joined(self, lits: list, members: list):
        """(width, automaton, finish, exact) of a slot taking any literal of `lits` or any value of the `members`
        (exact: see `slot`)."""
        try:
            if lits:
                members = [(max(map(len, lits)), literal_dfa(self.vocab, lits, self.deadline), None)] + members
            width = max(m.width if isinstance(m, _Str) else m[0] for m in members)
            # a string bound stays unless the slot can never hold that many characters
            dropped = [isinstance(m, _Str) and m.hi is not None and m.hi >= width * self.longest for m in members]
            members = [(m.width, self.string_automaton(m.lo, None if drop else m.hi, True, m.pattern, m.path), None)
                       if isinstance(m, _Str) else m for m, drop in zip(members, dropped)]
            dfa = union_dfa(self.vocab, [m[1] for m in members], self.deadline)
        except ConstraintError:
            self.in_time()  # an automaton ran out of time: say so as the compile's timeout
            raise
        if not _fills(dfa, width):
            raise ConstraintError(f"json_schema: no value of the union fits in its slot of {width} tokens (its strings' "
                                  f"patterns need more room, or characters that need escapes) (at {self.at})")
        finish = None
        if any(m[2] for m in members):
            finish = _union_finish(self.vocab, [(m[1], m[2]) for m in members], width)
        return width, dfa, finish, any(dropped) or any(isinstance(m, _Exact) for m in members)

    def choices(self, schema: dict, path: str, depth: int) -> list:
        """The enum / const values that the schema's other keywords allow (const and enum: both)."""
        values = [schema["const"]] if "const" in schema else schema["enum"]
        kept = [v for v in values if self.fits(v, schema, path, depth)]
        if not kept:
            which = " / ".join(repr(k) for k in ("enum", "const") if k in schema)
            raise ConstraintError(f"json_schema: no {which} value fits the schema's other keywords (at {path})")
        return kept

    def fits(self, v, schema, path: str, depth: int) -> bool:
        """Whether the JSON value `v` is valid under `schema` (whose keywords are checked as when compiling)."""
        self.in_time()
        self.deep(depth, path)
        if isinstance(schema, dict):
            if "$ref" in schema:  # a level deeper each time (as allOf, a union): a recursion ends at max_depth
                return self.fits(v, self.target(schema, path)[1], path, depth + 1)
            if "allOf" in schema:
                return self.fits(v, self.all_of(schema, path), path, depth + 1)
            union = self.alternatives(schema, path)
            if union is not None and union[0] != "type":
                n = sum(self.fits(v, a, p, depth + 1) for a, p in union[1])
                return n == 1 if union[0] == "oneOf" else n >= 1
        typ = self.keywords(schema, path, depth)
        if "const" in schema and not _same(v, schema["const"]):
            return False
        if "enum" in schema and v not in self.enum_members(schema):
            return False
        if isinstance(typ, tuple):  # a 'type' list: one of its types, with that type's keywords
            return any(self.fits(v, a, p, depth) for a, p in self.alternatives(schema, path)[1])
        if typ is not None and not _type_ok(v, typ):
            return False
        if typ in ("integer", "number"):
            lo, hi = self.bound(schema, "minimum", path), self.bound(schema, "maximum", path)
            xlo, xhi = self.bound(schema, "exclusiveMinimum", path), self.bound(schema, "exclusiveMaximum", path)
            return ((lo is None or v >= lo) and (hi is None or v <= hi) and (xlo is None or v > xlo)
                    and (xhi is None or v < xhi))
        if typ == "string":
            lo, hi = self.count(schema, "minLength", path, 0), self.count(schema, "maxLength", path)
            # a `format` is an annotation here (validators check formats only when asked), so given values that the
            # narrower patterns written for it would refuse (2024-02-29) stay; a `pattern` is checked by its automaton
            pattern = self.string_pattern(schema, path) if "pattern" in schema else None
            return lo <= len(v) and (hi is None or len(v) <= hi) and (
                pattern is None or _fsm_matches(self.pattern_fsm(pattern, path), v))
        if typ == "array":
            lo, hi = self.count(schema, "minItems", path, 0), self.count(schema, "maxItems", path)
            prefix, items = self.array_items(schema, path)
            if items is None:
                raise ConstraintError(f"json_schema: arrays need an 'items' schema (at {path})")
            at = lambda i: prefix[i] if i < len(prefix) else items  # noqa: E731
            return (lo <= len(v) and (hi is None or len(v) <= hi) and all(
                self.fits(x, at(i), f"{path}[{i}]", depth + 1) if isinstance(at(i), dict) else at(i)
                for i, x in enumerate(v)))
        if typ == "object":
            props, extra, required = self.object_keywords(schema, path)
            return all(k in v for k in required) and all(
                self.fits(x, props[k], f"{path}.{k}", depth + 1) if k in props else
                self.fits(x, extra, f"{path}.*", depth + 1) if isinstance(extra, dict) else extra for k, x in v.items())
        return True

    def enum_members(self, schema) -> _Members:
        """schema["enum"] indexed for membership, once per schema object."""
        hit = self.members.get(id(schema))
        if hit is None or hit[0] is not schema:
            hit = self.members[id(schema)] = schema, _Members(schema["enum"])
        return hit[1]

    @staticmethod
    def count(schema, key: str, path: str, default=None):
        """schema[key] as a count (minLength, maxItems, ...): an integer >= 0, else a ConstraintError naming it."""
        v = schema.get(key, default)
        if key in schema and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConstraintError(f"json_schema: {key!r} must be an integer >= 0, got {v!r} (at {path})")
        return v

    @staticmethod
    def bound(schema, key: str, path: str):
        """schema[key] as a numeric bound (minimum, exclusiveMaximum, ...): a finite number, else a ConstraintError."""
        v = schema.get(key)
        try:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        except OverflowError:  # an integer beyond the float range
            raise ConstraintError(f"json_schema: {key!r} is too large, over the float range (at {path})") from None
        if key in schema and not ok:
            raise ConstraintError(f"json_schema: {key!r} must be a number, got {v!r} (at {path})")
        return v

    def free(self, top: str):
        """A value the schema does not shape (any object, array or value): one slot whose automaton
        accepts any JSON of that kind (sampling.json_any), padded with whitespace."""
        if self.opts.free_tokens < 2:
            raise ConstraintError("json_schema: free_tokens must be >= 2 for a free-form value")
        self.slot(self.opts.free_tokens, json_dfa(self.vocab, top))

    @staticmethod
    def object_keywords(schema, path: str):
        """(properties, additionalProperties, required) of an object schema, else a ConstraintError."""
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise ConstraintError(f"json_schema: 'properties' must be an object (at {path})")
        extra = schema.get("additionalProperties", True)
        if not isinstance(extra, (bool, dict)):
            raise ConstraintError(f"json_schema: 'additionalProperties' must be a boolean or a schema (at {path})")
        if isinstance(extra, dict) and props:
            raise ConstraintError(f"json_schema: an 'additionalProperties' schema beside 'properties' is not supported "
                                  f"(only a map of it alone, like pydantic's dict[str, X]) (at {path})")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            raise ConstraintError(f"json_schema: 'required' must be a list of property names (at {path})")
        return props, extra, required

    def _object(self, schema, path, depth):
        props, extra, required = self.object_keywords(schema, path)
        missing = [k for k in required if k not in props]
        if missing:
            raise ConstraintError(f"json_schema: required keys {missing} have no 'properties' entry (at {path})")
        if isinstance(extra, dict):
            return self.map(extra, path, depth)
        if "properties" not in schema and extra:  # any object ("properties": {} keeps {}: tools without arguments)
            return self.free("object")
        self.text("{")
        for i, (key, sub) in enumerate(props.items()):
            self.text((", " if i else "") + json.dumps(key, ensure_ascii=False) + ": ")
            self.value(sub, f"{path}.{key}", depth + 1)
        self.text("}")

    def map(self, values: dict, path: str, depth: int):
        """An object of any keys whose values all follow `values` (additionalProperties as a schema: pydantic's
        dict[str, X]): `array_items` entries, each a key string slot (at least one character) and a value; keys
        the model writes twice are one key to a JSON reader, so the map may hold fewer. Values that recurse
        without a stop make it {}."""
        self.text("{")
        n, start, size = self.opts.array_items, len(self.pieces), self.size
        try:
            if n:
                self._string({"type": "string", "minLength": 1}, f"{path}<key>", depth + 1)
                self.text(": ")
                self.value(values, f"{path}.*", depth + 1)
        except _Cycle:
            del self.pieces[start:]
            self.size, n = size, 0
        self.repeat(start, size, n, path)
        self.text("}")

    def repeat(self, start: int, size: float, n: int, path: str):
        """Write the pieces from `start` (one item, compiled when the template was `size` long) n - 1 times more,
        each after ", " (once they are known to fit)."""
        if n < 2:
            return
        item = self.pieces[start:]
        self.at = path
        self.check((n - 1) * (self.size - size + 2 / self.longest))
        for _ in range(n - 1):
            self.text(", ")
            for p in item:
                if isinstance(p, str):
                    self.text(p)
                else:
                    self.slot(*p, exact=isinstance(p, _Exact))

    @staticmethod
    def array_items(schema: dict, path: str) -> tuple[list, object]:
        """(prefixItems, the schema of the items after them): a tuple's per-place schemas (2020-12 prefixItems, or
        an older schema's `items` list) and `items` (a schema, True for any, False for none after the prefix;
        None when an array with no prefix gives no items schema)."""
        prefix = schema.get("prefixItems", [])
        items = schema.get("items", True if "prefixItems" in schema else None)
        if isinstance(items, list) and "prefixItems" not in schema:  # draft 2019's tuple form
            prefix, items = items, True
        if not isinstance(prefix, list) or not all(isinstance(x, dict) for x in prefix):
            raise ConstraintError(f"json_schema: 'prefixItems' must be a list of schemas (at {path})")
        if items is not None and not isinstance(items, (dict, bool)):
            raise ConstraintError(f"json_schema: 'items' must be a schema (at {path})")
        return prefix, items

    def _array(self, schema, path, depth):
        if set(schema) - {"type"} <= ANNOTATIONS:  # any array
            return self.free("array")
        lo, hi = self.count(schema, "minItems", path, 0), self.count(schema, "maxItems", path)
        if hi is not None and hi < lo:
            raise ConstraintError(f"json_schema: maxItems {hi} < minItems {lo} (at {path})")
        prefix, items = self.array_items(schema, path)
        if prefix:
            return self.tuple(prefix, items, lo, hi, path, depth)
        if not isinstance(items, dict):
            raise ConstraintError(f"json_schema: arrays need an 'items' schema (at {path})")
        n = max(lo, self.opts.array_items if hi is None else min(hi, self.opts.array_items))
        self.text("[")
        start, size = len(self.pieces), self.size
        try:
            if n:
                self.value(schema["items"], f"{path}[0]", depth + 1)
        except _Cycle:  # items that recurse: none, if the array may be empty
            if lo:
                raise
            del self.pieces[start:]
            self.size, n = size, 0
        self.repeat(start, size, n, path)  # every item has the same template: the first, repeated
        self.text("]")

    def tuple(self, prefix: list, items, lo: int, hi, path: str, depth: int):
        """A tuple (prefixItems: pydantic's tuple[int, str]): its places in order, as many as maxItems lets, then
        items of the `items` schema (any value for true) up to minItems; none past the prefix for `items` false."""
        n = len(prefix) if hi is None else min(hi, len(prefix))
        more = max(0, lo - n)
        if more and items is False:
            raise ConstraintError(f"json_schema: minItems {lo} is more than the {len(prefix)} prefixItems, and "
                                  f"'items' is false (at {path})")
        self.text("[")
        for i in range(n + more):
            if i:
                self.text(", ")
            if i < n:
                self.value(prefix[i], f"{path}[{i}]", depth + 1)
            elif isinstance(items, dict):
                self.value(items, f"{path}[{i}]", depth + 1)
            else:
                self.free("any")
        self.text("]")

    def _string(self, schema, path, depth):
        lo, hi = self.count(schema, "minLength", path, 0), self.count(schema, "maxLength", path)
        if hi is not None and hi < lo:
            raise ConstraintError(f"json_schema: maxLength {hi} < minLength {lo} (at {path})")
        pattern = self.string_pattern(schema, path)
        room = self.opts.string_tokens
        if pattern is not None:  # room for its longest match (characters: never fewer than tokens), or its shortest
            shortest, longest = _match_lengths(self.pattern_fsm(pattern, path))
            room = max(shortest, longest if longest is not None else room)
        content = max(lo, room if hi is None else min(hi, room))
        if self.quoted:  # a union member: the opening quote is the slot's too; its automaton waits for the width
            self.pieces.append(_Str(content + 2, lo, hi, pattern, path))
            self.size += content + 2
            return self.check()
        exact = hi is not None and hi >= content * self.longest  # the slot never holds that many characters:
        if exact:  # no bound (a large maxLength would only cost automaton states), the slot's width is it
            hi = None
        self.text('"')
        self.check(content + 1)
        dfa = self.string_automaton(lo, hi, False, pattern, path)
        if pattern is not None and not _fills(dfa, content + 1):
            raise ConstraintError(f"json_schema: no string that matches {self.shown.get(pattern, pattern)} fits in its "
                                  f"slot of {content} "
                                  "tokens (raise maxLength or string_tokens), or none can be written without escapes "
                                  f"(at {path})")
        self.slot(content + 1, dfa, exact=exact)

    def string_pattern(self, schema: dict, path: str) -> str | None:
        """The regex a string's content must match whole: its `pattern` (JSON schema's, which matches anywhere
        unless anchored) or the pattern of its `format`; None for neither."""
        if "pattern" in schema and "format" in schema:
            raise ConstraintError(f"json_schema: 'pattern' and 'format' together are not supported (at {path})")
        if "format" in schema:
            fmt = schema["format"]
            if fmt not in FORMATS:
                raise ConstraintError(f"json_schema: format {fmt!r} is not supported (supported: "
                                      f"{', '.join(sorted(FORMATS))}) (at {path})")
            self.shown[FORMATS[fmt]] = f"format {fmt!r}"
            return FORMATS[fmt]
        if "pattern" not in schema:
            return None
        pattern = schema["pattern"]
        if not isinstance(pattern, str):
            raise ConstraintError(f"json_schema: 'pattern' must be a string, got {pattern!r} (at {path})")
        whole = _whole_match(pattern)
        self.shown[whole] = f"'pattern' {pattern!r}"
        return whole

    def pattern_fsm(self, pattern: str, path: str):
        """The character automaton of a whole-match pattern, compiled under the compile's deadline (in a child
        process, as a guided_regex is) once per tokenizer."""
        key = ("pattern fsm", pattern)
        hit = self.vocab.dfas.get(key)
        if hit is not None:
            return hit[0]
        try:
            if self.deadline is None:
                fsm = char_fsm(pattern)
            else:
                fsm = char_fsm_with_deadline(pattern, max(0.0, self.deadline - time.monotonic()))
        except RegexCompileError as e:  # named as the schema wrote it, not as rewritten for a whole match
            shown = self.shown.get(pattern, repr(pattern))
            raise ConstraintError(f"json_schema: {shown}: {str(e).replace(repr(pattern), 'it')} (at {path})") from None
        self.vocab.dfas.put(key, (fsm,))
        return fsm

    def string_automaton(self, lo: int, hi, quoted: bool, pattern: str | None, path: str):
        """string_dfa, or with a pattern its content matches whole."""
        if pattern is None:
            return string_dfa(self.vocab, lo, hi, quoted=quoted)
        key = ("pattern", pattern, lo, hi, quoted)
        hit = self.vocab.dfas.get(key)
        if hit is not None:
            return hit
        fsm = self.pattern_fsm(pattern, path)
        try:
            return pattern_string_dfa(self.vocab, fsm, key, lo, hi, quoted, self.deadline)
        except ConstraintError:
            self.in_time()  # an automaton ran out of time: say so as the compile's timeout
            raise

    def _boolean(self, schema, path, depth):
        self.literal([True, False], path)

    def _null(self, schema, path, depth):
        self.text("null")

    def _integer(self, schema, path, depth):
        lo, hi = self.bound(schema, "minimum", path), self.bound(schema, "maximum", path)
        if (x := self.bound(schema, "exclusiveMinimum", path)) is not None:
            lo = max(lo, math.floor(x) + 1) if lo is not None else math.floor(x) + 1
        if (x := self.bound(schema, "exclusiveMaximum", path)) is not None:
            hi = min(hi, math.ceil(x) - 1) if hi is not None else math.ceil(x) - 1
        lo = math.ceil(lo) if lo is not None else None
        hi = math.floor(hi) if hi is not None else None
        if lo is not None and hi is not None:
            if hi < lo:
                raise ConstraintError(f"json_schema: no integer lies in [{lo}, {hi}] (at {path})")
            if hi - lo < self.opts.enum_range:
                return self.literal(list(range(lo, hi + 1)), path)
        self._ranged(lo, hi, True, self.opts.integer_tokens)

    def _number(self, schema, path, depth):
        lo, hi = self.bound(schema, "minimum", path), self.bound(schema, "maximum", path)
        lo, hi = (None if b is None else Decimal(json.dumps(b)) for b in (lo, hi))
        width = self.opts.number_tokens
        for key, sign in (("exclusiveMinimum", 1), ("exclusiveMaximum", -1)):  # (pydantic's gt / lt)
            x = self.bound(schema, key, path)
            if x is not None:  # the nearest number past it that the slot writes: an inclusive bound
                b = self.past(Decimal(json.dumps(x)), sign, width, key, path)
                lo, hi = (b if lo is None else max(lo, b), hi) if sign > 0 else (lo, b if hi is None else min(hi, b))
        if lo is not None and hi is not None and hi < lo:
            raise ConstraintError(f"json_schema: no number lies between the bounds {_text(lo)} and {_text(hi)} "
                                  f"(at {path})")
        self._ranged(lo, hi, False, width)

    def past(self, x: Decimal, sign: int, width: int, key: str, path: str) -> Decimal:
        """x moved by one unit in its 6th decimal (or the one after its own last) in the direction `sign`: the
        nearest value past an exclusive bound that a number slot of `width` tokens writes (a value between them
        is out of reach, which only narrows what the slot takes)."""
        places = max(-x.as_tuple().exponent, 0)
        for d in range(max(places + 1, 6), places, -1):
            with localcontext() as ctx:
                ctx.prec = len(x.as_tuple().digits) + d + 2
                b = x + sign * Decimal(1).scaleb(-d)
            if len(self.vocab.encode(_text(b))) <= width:
                return b
        raise ConstraintError(f"json_schema: {key} {_text(x)} has too many digits for a number slot of {width} tokens "
                              f"(at {path})")

    def _ranged(self, lo, hi, integer: bool, width: int):
        # exact decimals (2**60 + 1 > 2**60; 0.1 is 0.1), written out without an exponent (1e20 is 100...0)
        lo, hi = (b if b is None or isinstance(b, Decimal) else Decimal(json.dumps(b)) for b in (lo, hi))
        fits = lambda b: b is None or len(self.vocab.encode(_text(b))) <= width  # noqa: E731
        if not integer:  # a bound too long for the slot: fewer decimals, rounded inwards (still within it)
            lo, hi = self.shortened(lo, width, ROUND_CEILING), self.shortened(hi, width, ROUND_FLOOR)
        # A bound still too long is never reached when the slot only takes values with fewer integer digits:
        # a maximum of 10**20 needs no clamp (nor a 21-token slot) when values have at most 20 digits.
        digits = None
        if not fits(hi) and hi >= 10 and (lo is None or lo < 10 ** (_int_digits(hi) - 1)):
            digits, hi = _int_digits(hi) - 1, None
        if not fits(lo) and lo <= -10 and (hi is None or hi > -10 ** (_int_digits(lo) - 1)):
            digits, lo = min(d for d in (digits, _int_digits(lo) - 1) if d is not None), None
        texts = {b: _text(b) for b in (lo, hi) if b is not None}
        width = max([width] + [len(self.vocab.encode(t)) for t in texts.values()])
        exact = digits is not None and digits >= width * self.longest and not self.quoted  # (a union slot may be
        if exact:  # wider) the slot is full before it holds that many digits: its width is the bound
            digits = None
        dfa = number_dfa(self.vocab, integer, allow_minus=lo is None or lo < 0, max_digits=digits)
        if lo is not None and lo == 0:  # no '-' at all keeps every value >= 0: nothing to clamp there (pydantic's
            lo = None  # ge=0; a clamped slot must sit in one canvas, and in a union it pins the offsets before it)
        texts = {b: _text(b) for b in (lo, hi) if b is not None}
        finish = _clamp(self.vocab, lo, hi, width, texts) if texts else None
        self.slot(width, dfa, finish, exact=exact)

    def shortened(self, b, width: int, rounding):
        """A decimal bound with as many of its decimals as fit in `width` tokens, rounded as asked."""
        places = -b.as_tuple().exponent if b is not None else 0
        with localcontext() as ctx:
            ctx.prec = len(b.as_tuple().digits) + max(places, 0) + 2 if b is not None else 28  # quantize exactly
            while places > 0 and len(self.vocab.encode(_text(b))) > width:
                places -= 1
                b = b.quantize(Decimal(1).scaleb(-places), rounding=rounding)
        return b


def _text(b: Decimal) -> str:
    """A decimal bound as JSON (no exponent, no "-0")."""
    return format(b if b else Decimal(0), "f")


def _int_digits(b: Decimal) -> int:
    """Digits of the integer part of a nonzero decimal's magnitude."""
    return len(str(int(abs(b))))


def _clamp(vocab: Vocab, lo, hi, width: int, texts: dict):
    """Whole-slot repair: a value outside [lo, hi] (decimals, compared exactly) becomes the nearest bound
    (padded with spaces)."""
    if vocab.pad_id is None:
        raise ConstraintError("the tokenizer has no whitespace token to pad number slots with")

    def finish(ids: list) -> list:
        value = Decimal(vocab.text(ids).strip())
        bound = lo if lo is not None and value < lo else hi if hi is not None and value > hi else None
        if bound is None:
            return ids
        new = vocab.encode(texts[bound])
        return new + [vocab.pad_id] * (width - len(new))

    return finish


def _counted(parts: list) -> list:
    """An alternative's parts for sequence_dfa: its slots up to the last one with a whole-slot repair at fixed
    offsets (exactly their width), and those whose width bounds their value (_Exact), the rest as long as their
    values (a free value's automaton times its width in states would be too many)."""
    repaired = [i for i, p in enumerate(parts) if isinstance(p, tuple) and p[2] is not None]
    last = repaired[-1] if repaired else -1
    return [p if isinstance(p, list) else (p[0], p[1], i <= last or isinstance(p, _Exact)) for i, p in enumerate(parts)]


def _sequence_finish(parts: list):
    """Whole-slot repair of one alternative of a template union: each of its slots that has a repair (a
    bounded number clamped) gets it, in place; None when none has."""
    if not any(isinstance(p, tuple) and p[2] is not None for p in parts):
        return None

    def finish(ids: list) -> list:
        out, at = list(ids), 0
        for p in parts:
            if isinstance(p, list):
                at += len(p)
                continue
            width, _, fin = p
            if fin is not None:
                out[at:at + width] = fin(out[at:at + width])
            at += width
        return out

    return finish


def _union_finish(vocab: Vocab, members: list, width: int):
    """Whole-slot repair of a union slot: ids that a member takes as they are stay; else the first member
    automaton that takes them repairs them with its finish (a bounded number clamped), padded to `width`."""
    def finish(ids: list) -> list:
        fixed = None
        for dfa, fin in members:
            if not dfa_accepts(dfa, ids):
                continue
            new = ids if fin is None else fin(ids)
            if new == ids:
                return ids
            fixed = fixed or new
        if fixed is None:
            return ids
        return fixed + [vocab.pad_id] * (width - len(fixed))

    return finish


class JsonSchemaConstraint(CanvasConstraint):
    """Output = the schema's template (skeleton pinned, value slots constrained) followed by EOS."""

    def __init__(self, schema: dict, tokenizer, options: JsonTemplateOptions | None = None,
                 timeout: float | None = None):
        """`timeout`: seconds the compile may take (a ConstraintError after), as a server's --regex-timeout."""
        self.schema = schema
        self.vocab = Vocab.of(tokenizer)
        eos = output_eos(tokenizer, "json_schema")
        comp = _Compiler(self.vocab, options or JsonTemplateOptions(), timeout)
        comp.root = schema
        try:
            comp.value(schema, "$", 0)
        except RecursionError:  # a safety net (max_depth bounds the nesting): a refusal, not a server error
            raise ConstraintError(f"json_schema: the schema nests too deeply to compile (at {comp.at}); "
                                  "simplify it") from None
        self.pieces = [self.vocab.encode(p) if isinstance(p, str) else p for p in comp.merged()]
        self.eos_id = eos
        self._layouts: dict = {}

    def layout(self, C: int) -> Layout:
        if C in self._layouts:
            return self._layouts[C]
        pinned, slots = [], []
        for piece in self.pieces:
            if isinstance(piece, list):
                pinned += piece
                continue
            width, dfa, finish = piece
            off = len(pinned)
            if finish is not None and width > C:
                raise ConstraintError(f"json_schema: a slot repaired as a whole (a bounded number, or a union "
                                      f"holding one) needs {width} tokens in one canvas, more than canvas_length={C}")
            if finish is not None and off // C != (off + width - 1) // C:
                # keep a slot that is repaired as a whole inside one canvas: pad up to the boundary
                pinned += [self.vocab.pad_id] * (C - off % C)
            slots.append(Slot(len(pinned), width, dfa, finish))
            pinned += [-1] * width
        lay = self._layouts[C] = Layout(pinned + [self.eos_id], slots)
        return lay

    def template_tokens(self) -> int:
        """Output tokens without canvas-alignment padding, EOS included."""
        return self.layout(1 << 30).length

    def max_template_tokens(self) -> int:
        """Output tokens for any canvas length: alignment pads a whole-slot number by < its width."""
        return self.template_tokens() + sum(p[0] - 1 for p in self.pieces if isinstance(p, tuple) and p[2])


def constraint_from_response_format(response_format: dict, tokenizer, max_tokens: int | None,
                                    canvas_length: int | None = None, timeout: float | None = None):
    """OpenAI `response_format` -> a canvas constraint (json_schema or JSON mode), or None for {"type": "text"}.
    With canvas_length, a template that cannot be laid out on canvases that long (a whole-slot number wider
    than one) is refused here, a ConstraintError, rather than when the engine first lays it out. `timeout`:
    seconds a json_schema compile may take (a ConstraintError after)."""
    if not isinstance(response_format, dict):
        raise ConstraintError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":  # JSON mode: any object in max_tokens, EOS included
        from .json_any import DEFAULT_TOKENS, JsonObjectConstraint

        return JsonObjectConstraint(tokenizer, max_tokens - 1 if max_tokens else DEFAULT_TOKENS)
    if kind != "json_schema":
        raise ConstraintError(f"response_format type {kind!r} is not supported (use 'text', 'json_object' or "
                              "'json_schema')")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ConstraintError("response_format.json_schema.schema must be a JSON schema object")
    c = JsonSchemaConstraint(spec["schema"], tokenizer, JsonTemplateOptions(max_tokens=max_tokens or None), timeout)
    need = c.max_template_tokens()  # so that any canvas length fits: min_new_tokens(C) <= need
    if max_tokens is not None and need > max_tokens:
        raise ConstraintError(f"json_schema: the output template needs up to {need} tokens (EOS included), "
                              f"over max_tokens={max_tokens}")
    if canvas_length is not None:
        c.layout(canvas_length)
    return c


SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def closed_objects(schema, _in_all_of: bool = False):
    """`schema` with additionalProperties false on every object schema that lists properties (or
    patternProperties) and does not set it, outside allOf (whose branches each see only part of the object):
    vLLM's disable_additional_properties. Free-form objects stay open; only schema positions are visited,
    never enum / const / default values or the names in a properties map."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    inside = _in_all_of or isinstance(out.get("allOf"), list)
    for key in SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub, inside) for name, sub in out[key].items()}
    for key in SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub, inside) for sub in out[key]]
    for key in SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key], inside)
    lists = isinstance(out.get("properties"), dict) or isinstance(out.get("patternProperties"), dict)
    if lists and not inside and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_value(value, field: str):
    """A JSON schema given as an object or as its JSON text, as an object (a ValueError naming `field`)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise ValueError(f"{field} is not valid JSON: {e}") from None
