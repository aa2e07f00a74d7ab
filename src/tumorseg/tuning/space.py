"""The search space: one trial's params overrides from ``tune.space``. List-valued choices go to
Optuna (scalar categoricals only) as JSON text and are decoded back."""

from __future__ import annotations

import json
from typing import Any

from tumorseg.errors import ConfigError
from tumorseg.params import Params
from tumorseg.tuning.config import SearchDimension

SCALAR_TYPES = (str, int, float, bool, type(None))


def encode_choice(value: Any) -> Any:
    """A categorical choice as Optuna can store it (lists and mappings as JSON text)."""
    return value if isinstance(value, SCALAR_TYPES) else json.dumps(value)


def decode_choice(value: Any, choices: list[Any]) -> Any:
    for choice in choices:
        if encode_choice(choice) == value:
            return choice
    raise ValueError(f"{value!r} is not one of {choices}")


def base_value(params: Params | dict[str, Any], dotted: str, source: str) -> Any:
    """The params.yaml value at a dotted key (a strength knob scales it), as written (``Params.raw``)."""
    node: Any = params if isinstance(params, dict) else params.raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(
                f"{source}: tune.space: scales names {dotted!r}, which params.yaml does not set"
            )
        node = node[part]
    if not isinstance(node, int | float) or isinstance(node, bool):
        raise ConfigError(f"{source}: tune.space: {dotted} is {node!r}; a strength knob scales numbers only")
    return node


def suggest(trial: Any, name: str, dim: SearchDimension) -> Any:
    if dim.type == "categorical":
        raw = trial.suggest_categorical(name, [encode_choice(c) for c in dim.choices or []])
        return decode_choice(raw, dim.choices or [])
    if dim.type == "int":
        step = int(dim.step) if dim.step else 1
        return trial.suggest_int(name, int(dim.low), int(dim.high), step=step, log=dim.log)
    return trial.suggest_float(name, float(dim.low), float(dim.high), step=dim.step, log=dim.log)


def to_overrides(
    values: dict[str, Any], space: dict[str, SearchDimension], params: dict[str, Any], source: str
) -> dict[str, Any]:
    """Sampled values (by dimension) as dotted overrides; a strength knob sets each scaled key to
    ``base * factor``, clipped to ``[0, 1]`` for ``*_prob`` keys."""
    overrides: dict[str, Any] = {}
    for name, value in values.items():
        dim = space.get(name)
        if dim is None or not dim.scales:
            overrides[name] = value
            continue
        for key in dim.scales:
            scaled = base_value(params, key, source) * value
            overrides[key] = min(max(scaled, 0.0), 1.0) if key.endswith("_prob") else scaled
    return overrides


def sample_overrides(
    trial: Any, space: dict[str, SearchDimension], params: dict[str, Any], source: str = "params.yaml"
) -> dict[str, Any]:
    """One trial's overrides: every dimension suggested, then strength knobs expanded."""
    values = {name: suggest(trial, name, dim) for name, dim in space.items()}
    return to_overrides(values, space, params, source)


def decode_trial_params(trial_params: dict[str, Any], space: dict[str, SearchDimension]) -> dict[str, Any]:
    """A finished trial's stored ``params`` (Optuna's encoding) decoded into dimension values."""
    values: dict[str, Any] = {}
    for name, raw in trial_params.items():
        dim = space.get(name)
        values[name] = decode_choice(raw, dim.choices or []) if dim and dim.type == "categorical" else raw
    return values
