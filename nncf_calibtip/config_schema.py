"""JSON Schema of the recipe files (``configs/*.json``), built from the config dataclasses.

The dataclasses stay the single source of truth (types, defaults, docstrings); this module
turns them into a JSON Schema so that a JSON config is checked, with every problem and its
place in the file named, before anything is built from it. ``python -m nncf_calibtip.config_schema``
prints the schema (for editors that complete and check JSON).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

import jsonschema


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        options = [_type_schema(a) for a in typing.get_args(tp)]
        return {"anyOf": options}
    if origin is dict:
        _, value = typing.get_args(tp)
        return {"type": "object", "additionalProperties": _type_schema(value)}
    if origin in (tuple, list):
        return {"type": "array"}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    return {}


def dataclass_schema(cls: type, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object schema with one property per field of ``cls`` (none required: all have defaults)."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = dict(extra or {})
    required = []
    for f in dataclasses.fields(cls):
        properties[f.name] = _type_schema(hints[f.name])
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def quantization_config_schema() -> dict[str, Any]:
    """The schema of a :class:`~nncf_calibtip.api.QuantizationConfig` JSON file."""
    from nncf_calibtip.api import ALGORITHM_CONFIGS
    from nncf_calibtip.placement import PrecisionConfig

    algorithms = []
    for name, cls in ALGORITHM_CONFIGS.items():
        item = dataclass_schema(cls, {"type": {"const": name}})
        item["required"] = ["type"]
        algorithms.append(item)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "nncf_calibtip QuantizationConfig",
        "type": "object",
        "properties": {
            "precision": dataclass_schema(PrecisionConfig),
            "algorithms": {"type": "array", "items": {"oneOf": algorithms}},
            "subset_size": {"type": "integer", "minimum": 1},
        },
        "additionalProperties": False,
    }


def validate_quantization_config(data: Any) -> None:
    """Check a recipe against the schema.

    :raises ValueError: naming every problem and where it is (``algorithms/1: ...``).
    """
    from nncf_calibtip.api import ALGORITHM_CONFIGS

    names = list(ALGORITHM_CONFIGS)
    validator = jsonschema.Draft202012Validator(quantization_config_schema())
    problems = []
    for error in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        if error.validator == "oneOf" and isinstance(error.instance, dict):
            # Report the complaints of the algorithm the entry names, not "valid under none of".
            kind = error.instance.get("type")
            if kind not in names:
                problems.append(f"{where}: type {kind!r} is not one of {names}")
                continue
            option = names.index(kind)
            inner = sorted({e.message for e in error.context if e.relative_schema_path[0] == option})
            problems.append(f"{where} ({kind}): {'; '.join(inner)}")
        else:
            problems.append(f"{where}: {error.message}")
    if problems:
        msg = "Invalid quantization config:\n  " + "\n  ".join(problems)
        raise ValueError(msg)


if __name__ == "__main__":
    print(json.dumps(quantization_config_schema(), indent=2))
