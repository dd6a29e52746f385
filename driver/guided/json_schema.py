"""JSON Schema -> a regular expression of the JSON texts it allows (the approach of outlines,
which vLLM used): objects list their properties in the schema's order, each required one
always and each optional one where it is given, and one optional space may follow each
':' and ',' and lead or end a bracket's contents.

Supported: type (one or a list), enum, const, properties/required, items/minItems/
maxItems (and prefixItems), minLength/maxLength/pattern on strings, anyOf/oneOf, allOf of
one schema, $ref into $defs/definitions or the root (recursive too), and free JSON (an object
without properties, an array without items, {} or true), which is also what response_format
{"type": "json_object"} asks for. Anything else is refused with its name, never silently
ignored.

What may nest without bound (free JSON, a $ref) is a group called by name, as PCRE writes
grammars: its definition goes once in a (?(DEFINE)...) block that leads the pattern, and
each use is a call, (?&name); driver/guided/regex.py bounds the calls in progress at once.
"""
from __future__ import annotations

import json
import re

WS = r"[ ]?"
STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))'
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
BOOLEAN = r"(?:true|false)"
NULL = "null"
MAX_COUNT = 256  # maxItems / maxLength larger than this count as unbounded

_IGNORED = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "format",
            "additionalProperties", "$defs", "definitions", "strict", "name", "minimum", "maximum",
            "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "readOnly", "writeOnly"}
_KNOWN = _IGNORED | {"type", "enum", "const", "properties", "required", "items", "prefixItems", "minItems",
                     "maxItems", "minLength", "maxLength", "pattern", "anyOf", "oneOf", "allOf", "$ref"}


class SchemaError(ValueError):
    pass


def schema_to_regex(schema: dict | bool | str) -> str:
    """The regex of the JSON texts `schema` allows (a JSON string is parsed first)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SchemaError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise SchemaError("a JSON schema must be an object")
    converter = _Converter(schema)
    return converter.with_definitions(converter.convert(schema))


def free_json_regex() -> str:
    """Any JSON object."""
    converter = _Converter({})
    return converter.with_definitions(converter.free("object"))


def _alt(options: list[str]) -> str:
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


def _literal(value) -> str:
    return re.escape(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _repeat(item: str, lo: int, hi: int | None) -> str:
    """lo..hi items joined by commas, in brackets' contents (no brackets)."""
    hi = None if hi is not None and hi > MAX_COUNT else hi
    if hi == 0:
        return ""
    more = f"(?:{WS},{WS}{item})"
    tail = f"{{{max(lo - 1, 0)},}}" if hi is None else f"{{{max(lo - 1, 0)},{hi - 1}}}"
    body = f"{item}{more}{tail}"
    return body if lo >= 1 else f"(?:{body})?"


class _Converter:
    def __init__(self, root):
        self.root = root
        self.groups: dict[str, str] = {}  # group name -> its regex, for (?(DEFINE)...)
        self.ref_groups: dict[str, str] = {}  # $ref -> its group's name

    def with_definitions(self, regex: str) -> str:
        if not self.groups:
            return regex
        return "(?(DEFINE)" + "".join(f"(?<{n}>{body})" for n, body in self.groups.items()) + ")" + regex

    def free(self, kind: str) -> str:
        """A call of free JSON's group for kind (value, object or array), defined at first use."""
        if "json_value" not in self.groups:
            member = f"{STRING}{WS}:{WS}(?&json_value)"
            self.groups["json_value"] = _alt([STRING, NUMBER, BOOLEAN, NULL, "(?&json_object)", "(?&json_array)"])
            self.groups["json_object"] = rf"\{{{WS}{_repeat(member, 0, None)}{WS}\}}"
            self.groups["json_array"] = rf"\[{WS}{_repeat('(?&json_value)', 0, None)}{WS}\]"
        return f"(?&json_{kind})"

    def convert(self, s) -> str:
        if s is True or s == {}:
            return self.free("value")
        if s is False:
            raise SchemaError("a schema of false allows nothing")
        if unknown := sorted(set(s) - _KNOWN):
            raise SchemaError(f"JSON schema keywords {unknown} are not supported")
        if "$ref" in s:
            return self.ref(s["$ref"])
        if "const" in s:
            return _literal(s["const"])
        if "enum" in s:
            return _alt([_literal(v) for v in s["enum"]])
        for key in ("anyOf", "oneOf"):
            if key in s:
                return _alt([self.convert(sub) for sub in s[key]])
        if "allOf" in s:
            if len(s["allOf"]) != 1:
                raise SchemaError("allOf is supported with one schema only")
            return self.convert(s["allOf"][0])
        types = s.get("type")
        if isinstance(types, list):
            return _alt([self.typed(dict(s, type=t), t) for t in types])
        if types is None:  # the type follows from the keywords, as validators read them
            types = ("object" if "properties" in s else "array" if "items" in s or "prefixItems" in s
                     else "string" if {"pattern", "minLength", "maxLength"} & set(s) else None)
            if types is None:
                return self.free("value")
        return self.typed(s, types)

    def typed(self, s: dict, t: str) -> str:
        if t == "object":
            return self.object(s)
        if t == "array":
            return self.array(s)
        if t == "string":
            if "pattern" in s:
                return '"' + s["pattern"].removeprefix("^").removesuffix("$") + '"'
            lo, hi = s.get("minLength", 0), s.get("maxLength")
            if hi is not None and hi < lo:
                raise SchemaError(f"maxLength ({hi}) is less than minLength ({lo})")
            if not lo and hi is None:
                return STRING
            hi = None if hi is not None and hi > MAX_COUNT else hi
            return f'"{STRING_CHAR}{{{lo},{"" if hi is None else hi}}}"'
        simple = {"integer": INTEGER, "number": NUMBER, "boolean": BOOLEAN, "null": NULL}
        if t not in simple:
            raise SchemaError(f"JSON schema type {t!r} is not supported")
        return simple[t]

    def object(self, s: dict) -> str:
        props, required = s.get("properties") or {}, set(s.get("required", []))
        if missing := sorted(required - set(props)):
            raise SchemaError(f"required properties {missing} are not in 'properties'")
        if not props:
            return self.free("object")
        members = [(f"{_literal(k)}{WS}:{WS}{self.convert(v)}", k in required)
                   for k, v in props.items()]
        return rf"\{{{WS}{_members(members)}{WS}\}}"

    def array(self, s: dict) -> str:
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if hi is not None and hi < lo:
            raise SchemaError(f"maxItems ({hi}) is less than minItems ({lo})")
        if "prefixItems" in s:
            items = [self.convert(sub) for sub in s["prefixItems"]]
            return rf"\[{WS}" + f"{WS},{WS}".join(items) + rf"{WS}\]"
        item = self.convert(s.get("items", {}))
        return rf"\[{WS}{_repeat(item, lo, hi)}{WS}\]"

    def ref(self, ref: str) -> str:
        """A call of the group of ref's target (defined at the first $ref to it, which a
        $ref inside it may call again)."""
        name = self.ref_groups.get(ref)
        if name is None:
            parts = [] if ref == "#" else ref[2:].split("/") if ref.startswith("#/") else [None]
            target = self.root
            for part in parts:
                if part is None or not isinstance(target, dict) or part not in target:
                    raise SchemaError(f"$ref {ref!r} does not point into this schema")
                target = target[part]
            name = self.ref_groups[ref] = f"ref{len(self.ref_groups)}"
            self.groups[name] = ""  # (taken now: the target may refer to itself)
            self.groups[name] = self.convert(target)
        return f"(?&{name})"


def _members(members: list[tuple[str, bool]]) -> str:
    """Properties in order, (regex, required) each: commas between the ones present."""
    after = ""  # the members from i on, when one came before (each with its comma)
    first = ""  # the members from i on, when none came before
    for regex, required in reversed(members):
        with_comma = f"{WS},{WS}{regex}"
        lead = regex + after
        first = lead if required else (f"(?:{lead}|{first})" if first else f"(?:{lead})?")
        after = (with_comma if required else f"(?:{with_comma})?") + after
    return first


__all__ = ["schema_to_regex", "free_json_regex", "SchemaError"]
