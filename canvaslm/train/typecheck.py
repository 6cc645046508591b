"""Config values checked against their dataclass annotations ("float", "str | None", "tuple[float, float]", ...),
so that a YAML value of the wrong type is an error naming the field, not a TypeError deep in a run. A float field
also takes an int or a numeric string: PyYAML (YAML 1.1) reads `lr: 1e-4`, without a dot, as the string '1e-4'."""

from __future__ import annotations

import dataclasses
import re

from ..config import ConfigError

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_WORDS = {"None": "null", "bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
          "dict": "a mapping"}
_PLURAL = {"int": "integers", "float": "numbers", "str": "strings"}


def number(value) -> float | None:
    """value as a float when it is an int, a float or a numeric string; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return None


def _match(kind: str, value) -> tuple[bool, object]:
    """(whether value is of `kind`, one member of an annotation's union; value converted)."""
    if kind == "None":
        return value is None, None
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind == "float":
        v = number(value)
        return v is not None, v
    if kind == "str":
        return isinstance(value, str), value
    if kind == "dict":
        return isinstance(value, dict), value
    m = re.fullmatch(r"tuple\[(.*)\]", kind)
    if m:
        items = [k.strip() for k in m.group(1).split(",")]
        if not isinstance(value, (list, tuple)) or (items[-1] != "..." and len(value) != len(items)):
            return False, None
        kinds = [items[0]] * len(value) if items[-1] == "..." else items
        got = [_match(k, v) for k, v in zip(kinds, value)]
        return all(ok for ok, _ in got), tuple(v for _, v in got)
    return True, value  # an annotation this module does not know: not checked


def _words(kind: str) -> str:
    m = re.fullmatch(r"tuple\[(.*)\]", kind)
    if not m:
        return _WORDS.get(kind, kind)
    items = [k.strip() for k in m.group(1).split(",")]
    what = _PLURAL.get(items[0], items[0])
    return f"a list of {what}" if items[-1] == "..." else \
        f"a pair of {what}" if len(items) == 2 else f"a list of {len(items)} {what}"


def checked(name: str, value, annotation: str, prefix: str = ""):
    """value converted to `annotation`'s type, else ConfigError "<prefix><name> must be <type>, got <value>"."""
    kinds = [k.strip() for k in annotation.split("|")]
    for kind in kinds:
        ok, v = _match(kind, value)
        if ok:
            return v
    raise ConfigError(f"{prefix}{name} must be {' or '.join(_words(k) for k in kinds)}, got {value!r}")


def check_fields(obj, prefix: str = ""):
    """Check every field of the (frozen) dataclass instance `obj` against its annotation, converting in place."""
    for f in dataclasses.fields(obj):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        object.__setattr__(obj, f.name, checked(f.name, getattr(obj, f.name), ann, prefix))


def safe_load_unique(stream):
    """yaml.safe_load, except that a key written twice in one mapping is a YAMLError naming it and both lines
    (PyYAML keeps the last silently: a second `lr:` further down trained at that value)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the constructor's own error names it
                break
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(stream, Loader=Loader)


def yaml_problem(e) -> str:
    """A PyYAML error in one line: its problem and where ("expected ',' or ']' at line 3, column 1")."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or ' '.join(str(e).split())}{where}"
