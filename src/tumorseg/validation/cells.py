"""Manifest cells (all text) as typed values, for the 3-D and 2-D case tables and duplicate detection."""

from __future__ import annotations

import math

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def parse_bool(text: str) -> bool | None:
    """``"True"``/``"1"``/``"yes"`` -> True, ``"False"``/``"0"``/``"no"`` -> False, else None."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def parse_float(text: str) -> float | None:
    """A finite float, or None for empty, non-numeric, NaN or infinite text."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def cell_text(value: object) -> str:
    """A manifest cell as stripped text ('' for missing), whatever dtype pandas chose."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()
