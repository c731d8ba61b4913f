"""The precision plan: how many bits each quantized layer gets.

A plan maps a layer, named by its NNCF graph node (``"layer1.0.conv1/conv2d/0"``, the names
:class:`nncf.IgnoredScope` uses), to the bit width of its weights and of its input activations.
It is plain data: it round-trips through JSON, later algorithms (bit allocation) write it, and
the export writes it beside the IR and checks the IR against it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Bit widths a weight quantizer may take.
WEIGHT_BITS = (2, 4, 8)
#: Bit widths an activation quantizer may take.
ACTIVATION_BITS = (4, 8)


@dataclass(frozen=True)
class LayerPrecision:
    """Bit widths of one layer: its weights and the activations at its input."""

    weight_bits: int
    activation_bits: int

    def __post_init__(self) -> None:
        if self.weight_bits not in WEIGHT_BITS:
            msg = f"weight_bits={self.weight_bits} is not supported; use one of {WEIGHT_BITS}."
            raise ValueError(msg)
        if self.activation_bits not in ACTIVATION_BITS:
            msg = f"activation_bits={self.activation_bits} is not supported; use one of {ACTIVATION_BITS}."
            raise ValueError(msg)

    def to_dict(self) -> dict[str, int]:
        return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits}

    @property
    def label(self) -> str:
        """Short form such as ``W4A8``."""
        return f"W{self.weight_bits}A{self.activation_bits}"


class PrecisionPlan(Mapping[str, LayerPrecision]):
    """An immutable mapping ``layer name -> LayerPrecision``, in execution order."""

    def __init__(self, layers: Mapping[str, LayerPrecision] | None = None) -> None:
        self._layers: dict[str, LayerPrecision] = dict(layers or {})
        for name, precision in self._layers.items():
            if not isinstance(precision, LayerPrecision):
                msg = f"Plan entry {name!r} must be a LayerPrecision, got {type(precision).__name__}."
                raise TypeError(msg)

    def __getitem__(self, name: str) -> LayerPrecision:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrecisionPlan) and self._layers == other._layers

    def __hash__(self) -> int:
        return hash(tuple(self._layers.items()))

    def __repr__(self) -> str:
        return f"PrecisionPlan({self.summary()})"

    def replace(self, updates: Mapping[str, LayerPrecision]) -> PrecisionPlan:
        """A new plan with some layers changed; unknown layer names are an error."""
        unknown = sorted(set(updates) - set(self._layers))
        if unknown:
            msg = f"Layers {unknown} are not in the plan; known layers: {sorted(self._layers)}."
            raise KeyError(msg)
        return PrecisionPlan({**self._layers, **updates})

    def summary(self) -> str:
        """Counts per precision, e.g. ``W4A4 x20, W8A8 x2``."""
        counts: dict[str, int] = {}
        for p in self._layers.values():
            counts[p.label] = counts.get(p.label, 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {name: p.to_dict() for name, p in self._layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionPlan:
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
            msg = 'A precision plan must be a mapping {"layers": {name: {"weight_bits": .., "activation_bits": ..}}}.'
            raise ValueError(msg)
        layers = {}
        for name, entry in data["layers"].items():
            try:
                layers[name] = LayerPrecision(int(entry["weight_bits"]), int(entry["activation_bits"]))
            except (KeyError, TypeError) as e:
                msg = f"Plan entry {name!r} needs integer 'weight_bits' and 'activation_bits': {e}"
                raise ValueError(msg) from e
        return cls(layers)

    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PrecisionPlan:
        """Read a plan from JSON text or from a file path."""
        p = Path(text_or_path)
        text = p.read_text() if not str(text_or_path).lstrip().startswith("{") and p.exists() else str(text_or_path)
        return cls.from_dict(json.loads(text))
