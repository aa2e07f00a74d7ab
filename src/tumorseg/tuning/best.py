"""The best trial's params (``tune.best_params_file``, DVC-tracked nested YAML of the searched keys;
``tune.best_params_file_2d`` for the 2-D study): written by ``tumorseg tune``, merged by ``train`` and the
flows. params.yaml < this file < ``-S``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tumorseg import yamlio
from tumorseg.config import apply_overrides
from tumorseg.data.manifest import atomic_write_text
from tumorseg.errors import ConfigError
from tumorseg.params import Params, as_params


def write_best_params(path: str | Path, overrides: dict[str, Any], header: str) -> Path:
    """Write the best overrides (dotted keys) as nested YAML, atomically, with a one-line header."""
    path = Path(path)
    nested = apply_overrides({}, overrides)
    text = f"# {header}\n" + yaml.safe_dump(nested, sort_keys=True, default_flow_style=None)
    atomic_write_text(path, text)
    return path


def read_best_params(path: str | Path) -> dict[str, Any]:
    """The best overrides as dotted keys ({} when the file does not exist)."""
    from tumorseg.tracking import flatten

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = yamlio.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML; rerun `tumorseg tune` or delete the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected params sections at the top level; rerun `tumorseg tune`")
    return flatten(data)


def best_params_overrides(
    params: Params | dict[str, Any], *, source: str = "params.yaml", dims: int = 3
) -> dict[str, Any]:
    """Overrides from the ``dims``-D study's best-params file when ``tune.apply_best`` is on and the file
    exists."""
    cfg = as_params(params, source).tune.for_dims(dims)
    return read_best_params(cfg.best_params_file) if cfg.apply_best else {}


def with_best_params(
    params: dict[str, Any],
    *,
    explicit: dict[str, Any] | None = None,
    source: str = "params.yaml",
    dims: int = 3,
) -> dict[str, Any]:
    """params.yaml, then the ``dims``-D best-params file, then ``explicit`` overrides (``-S``) on top."""
    params = as_params(params, source)
    best = best_params_overrides(params, source=source, dims=dims)
    return apply_overrides(apply_overrides(params, best), explicit)
