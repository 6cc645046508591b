"""Grammar output: GBNF grammars (llama.cpp's format, which vLLM's `guided_grammar` takes with its
xgrammar backend) compiled to a regular expression and run as regex output (sampling.regex).

A grammar is rules `name ::= expression`, starting from `root`. Expressions: "literals" (escapes \\n \\t
\\r \\\\ \\" \\xHH \\uHHHH), [character classes] with ranges and [^negation], `.` (any character), rule
names, ( groups ), alternation `|`, and `*` `+` `?` `{m}` `{m,}` `{m,n}`; `#` starts a comment. Rule
references are inlined. A rule may refer to itself (directly or through others): a finite automaton
cannot nest without bound, so each rule is expanded at most `max_depth` times along any path and a
deeper nesting is not in the language (as the JSON mode bounds nesting: sampling.json_any). The regex
then compiles under the same deadline and state limits as `guided_regex`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_DEPTH = 4  # expansions of one rule nested along one path
MAX_PATTERN = 200_000  # characters of the unrolled regex
MAX_REPEAT = 1000


class GrammarError(ValueError):
    """The grammar cannot be parsed or unrolled; the message names the line and column or the rule."""


@dataclass(frozen=True)
class _Tok:
    kind: str  # name, assign, lit, cls, any, lpar, rpar, bar, rep
    value: object
    pos: int


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_REPEAT = re.compile(r"\{\s*(\d+)\s*(,\s*(\d*)\s*)?\}")  # {m}, {m,}, {m,n}
_ESC = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "]": "]", "[": "[", "-": "-", "^": "^", "/": "/"}


class _Lexer:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def where(self, pos: int) -> str:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return f"line {line}, column {col}"

    def fail(self, pos: int, msg: str):
        raise GrammarError(f"guided_grammar: {msg} at {self.where(pos)}")

    def escape(self) -> str:
        """The character of the escape at self.i (just after a backslash)."""
        t = self.text
        if self.i >= len(t):
            self.fail(self.i, "a backslash ends the grammar")
        c = t[self.i]
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = t[self.i + 1:self.i + 1 + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                self.fail(self.i, f"\\{c} needs {n} hex digits")
            self.i += 1 + n
            return chr(int(digits, 16))
        if c not in _ESC:
            self.fail(self.i, f"unknown escape \\{c}")
        self.i += 1
        return _ESC[c]

    def tokens(self) -> list[_Tok]:
        t, out = self.text, []
        while True:
            while self.i < len(t) and (t[self.i].isspace() or t[self.i] == "#"):
                if t[self.i] == "#":
                    while self.i < len(t) and t[self.i] != "\n":
                        self.i += 1
                else:
                    self.i += 1
            if self.i >= len(t):
                return out
            start, c = self.i, t[self.i]
            if t.startswith("::=", self.i):
                self.i += 3
                out.append(_Tok("assign", None, start))
            elif (m := _NAME.match(t, self.i)) is not None:  # ASCII names only: "ê" is an unexpected character
                self.i = m.end()
                out.append(_Tok("name", m.group(), start))
            elif c == '"':
                self.i += 1
                chars = []
                while True:
                    if self.i >= len(t):
                        self.fail(start, "a string literal is not closed")
                    c = t[self.i]
                    if c == '"':
                        self.i += 1
                        break
                    self.i += 1
                    chars.append(self.escape() if c == "\\" else c)
                out.append(_Tok("lit", "".join(chars), start))
            elif c == "[":
                out.append(_Tok("cls", self.char_class(), start))
            elif c in "()|.":
                self.i += 1
                out.append(_Tok({"(": "lpar", ")": "rpar", "|": "bar", ".": "any"}[c], None, start))
            elif c in "*+?":
                self.i += 1
                out.append(_Tok("rep", {"*": (0, None), "+": (1, None), "?": (0, 1)}[c], start))
            elif c == "{":
                m = _REPEAT.match(t, self.i)
                if m is None:
                    self.fail(start, "a repetition is {m}, {m,} or {m,n}")
                lo = int(m.group(1))
                hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
                if hi is not None and hi < lo:
                    self.fail(start, f"repetition {{{lo},{hi}}} has its maximum below its minimum")
                if max(lo, hi or 0) > MAX_REPEAT:
                    self.fail(start, f"repetition bound over {MAX_REPEAT}")
                self.i = m.end()
                out.append(_Tok("rep", (lo, hi), start))
            else:
                self.fail(start, f"unexpected character {c!r}")

    def char_class(self) -> tuple[bool, list]:
        """[...] at self.i -> (negated, [(lo, hi) code points])."""
        t, start = self.text, self.i
        self.i += 1
        neg = self.i < len(t) and t[self.i] == "^"
        self.i += neg
        ranges = []

        def one() -> str:
            c = t[self.i]
            self.i += 1
            return self.escape() if c == "\\" else c

        while True:
            if self.i >= len(t):
                self.fail(start, "a character class is not closed")
            if t[self.i] == "]":
                self.i += 1
                break
            lo = one()
            hi = lo
            if self.i + 1 < len(t) and t[self.i] == "-" and t[self.i + 1] != "]":
                self.i += 1
                hi = one()
                if ord(hi) < ord(lo):
                    self.fail(start, f"range {lo!r}-{hi!r} runs backwards")
            ranges.append((ord(lo), ord(hi)))
        if not ranges and not neg:
            self.fail(start, "an empty character class matches nothing")
        return neg, ranges


class _Parser:
    def __init__(self, text: str):
        self.lex = _Lexer(text)
        self.toks, self.k = self.lex.tokens(), 0

    def peek(self, n: int = 0):
        return self.toks[self.k + n] if self.k + n < len(self.toks) else None

    def rules(self) -> dict:
        rules = {}
        while self.peek() is not None:
            name, assign = self.peek(), self.peek(1)
            if name.kind == "rpar":
                self.lex.fail(name.pos, "unexpected ')': no group is open")
            if name.kind != "name" or assign is None or assign.kind != "assign":
                self.lex.fail(name.pos, "expected a rule: name ::= expression")
            if name.value in rules:
                self.lex.fail(name.pos, f"rule {name.value!r} is defined twice")
            self.k += 2
            rules[name.value] = self.alternation()
        return rules

    def at_rule_start(self) -> bool:
        a, b = self.peek(), self.peek(1)
        return a is not None and a.kind == "name" and b is not None and b.kind == "assign"

    def alternation(self):
        alts = [self.sequence()]
        while self.peek() is not None and self.peek().kind == "bar":
            self.k += 1
            alts.append(self.sequence())
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def sequence(self):
        items = []
        while True:
            tok = self.peek()
            if tok is None or tok.kind in ("bar", "rpar") or self.at_rule_start():
                break
            self.k += 1
            if tok.kind == "lit":
                node = ("lit", tok.value)
            elif tok.kind == "cls":
                node = ("cls", tok.value)
            elif tok.kind == "any":
                node = ("any",)
            elif tok.kind == "name":
                node = ("ref", tok.value, tok.pos)
            elif tok.kind == "lpar":
                node = self.alternation()
                close = self.peek()
                if close is None or close.kind != "rpar":
                    self.lex.fail(tok.pos, "a group is not closed")
                self.k += 1
            elif tok.kind == "rep":  # a repetition with nothing before it to repeat
                text = self.lex.text
                end = text.index("}", tok.pos) + 1 if text[tok.pos] == "{" else tok.pos + 1
                self.lex.fail(tok.pos, f"unexpected {text[tok.pos:end]!r}: a repetition needs an item before it")
            else:
                self.lex.fail(tok.pos, "unexpected '::='")
            while self.peek() is not None and self.peek().kind == "rep":
                node = ("rep", node, *self.peek().value)
                self.k += 1
            items.append(node)
        return items[0] if len(items) == 1 else ("seq", items)


def _char(cp: int, special: str) -> str:
    """One character in a regex: control characters as \\xHH, `special` ones backslashed."""
    c = chr(cp)
    if cp < 0x20 or cp == 0x7F:
        return f"\\x{cp:02x}"
    return "\\" + c if c in special else c


def _lit_regex(s: str) -> str:
    return "".join(_char(ord(c), ".^$*+?{}[]\\|()/-#&~ ") for c in s)


def _class_regex(neg: bool, ranges: list) -> str:
    def ch(cp: int) -> str:
        return _char(cp, "]\\^-[")
    body = "".join(ch(lo) if lo == hi else f"{ch(lo)}-{ch(hi)}" for lo, hi in ranges)
    return f"[{'^' if neg else ''}{body}]" if body else r"[\s\S]"


def grammar_regex(text: str, max_depth: int = DEFAULT_DEPTH) -> str:
    """A GBNF grammar -> a regular expression for its language, recursion unrolled `max_depth` deep."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("guided_grammar must be a non-empty grammar")
    try:
        return _unrolled(text, max_depth)
    except RecursionError:
        raise GrammarError("guided_grammar: groups or rules nest too deeply to unroll") from None


def _unrolled(text: str, max_depth: int) -> str:
    parser = _Parser(text)
    rules = parser.rules()
    if "root" not in rules:
        raise GrammarError("guided_grammar: no `root` rule (the grammar starts there)")
    active: dict = {}
    size = [0]

    def render(node):
        kind = node[0] if isinstance(node, tuple) else "seq"
        if kind == "lit":
            out = _lit_regex(node[1])
        elif kind == "cls":
            out = _class_regex(*node[1])
        elif kind == "any":
            out = r"[\s\S]"
        elif kind == "ref":
            name = node[1]
            if name not in rules:
                parser.lex.fail(node[2], f"rule {name!r} is not defined")
            if active.get(name, 0) >= max_depth:
                return None  # nested deeper than the bound: not in the language
            active[name] = active.get(name, 0) + 1
            try:
                inner = render(rules[name])
            finally:
                active[name] -= 1
            out = None if inner is None else f"(?:{inner})"
        elif kind == "seq":
            parts = [render(n) for n in node[1]]
            out = None if any(p is None for p in parts) else "".join(parts)
        elif kind == "alt":
            parts = [p for p in (render(n) for n in node[1]) if p is not None]
            out = None if not parts else (parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")")
        else:  # rep
            _, inner_node, lo, hi = node
            inner = render(inner_node)
            if inner is None:
                return "" if lo == 0 else None
            bound = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi))
            out = f"(?:{inner})" + (bound or (f"{{{lo}}}" if lo == hi else f"{{{lo},{'' if hi is None else hi}}}"))
        if out is not None:
            size[0] += len(out)
            if size[0] > 50 * MAX_PATTERN:
                raise GrammarError(f"guided_grammar: unrolling it builds a pattern of over {MAX_PATTERN} characters; "
                                   "lower the recursion or simplify the grammar")
        return out

    pattern = render(rules["root"])
    if pattern is None:
        raise GrammarError("guided_grammar: `root` matches nothing within the recursion bound")
    if len(pattern) > MAX_PATTERN:
        raise GrammarError(f"guided_grammar: unrolled, the grammar is a pattern of {len(pattern)} characters, over "
                           f"{MAX_PATTERN}; lower the recursion or simplify the grammar")
    return pattern


def GrammarConstraint(grammar: str, tokenizer, width: int, field: str = "guided_grammar",
                      compile_timeout: float | None = None, max_depth: int = DEFAULT_DEPTH):
    """The regex-output constraint (sampling.regex.RegexConstraint) of a GBNF grammar's language."""
    from .constraints import ConstraintError
    from .regex import RegexConstraint

    pattern = grammar_regex(grammar, max_depth)
    if pattern == "":  # RegexConstraint would call the pattern empty
        raise ConstraintError(f"{field}: the grammar matches only the empty string; constrained output needs "
                              "at least one character")
    try:
        return RegexConstraint(pattern, tokenizer, width, field, compile_timeout)
    except ConstraintError as e:  # it would quote the (long) unrolled pattern: name the grammar instead
        raise ConstraintError(str(e).replace(repr(pattern), "the grammar")) from None


__all__ = ["GrammarConstraint", "GrammarError", "grammar_regex", "DEFAULT_DEPTH"]
