"""YAML reading through libyaml's parser where PyYAML was built with it.

``yaml.safe_load`` parses in pure Python: label_sets.yaml and params.yaml cost ~50 ms of a cold
``tumorseg predict`` that way. :data:`LOADER` keeps PyYAML's safe constructor and resolver, so the
values (and the ``yaml.YAMLError`` raised on bad input) are the same; only the parser is C.
"""

from __future__ import annotations

from typing import IO, Any

import yaml

LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(stream: str | bytes | IO[str] | IO[bytes]) -> Any:
    """``yaml.safe_load`` with :data:`LOADER`."""
    return yaml.load(stream, Loader=LOADER)  # noqa: S506 - a safe loader (SafeConstructor)
