"""Training recipes: named sets of params.yaml values, switched with one command.

``presets.yaml`` (beside this module) maps each name to a ``summary``, the ``expected`` cost, its
``sources`` and ``set:`` (dotted params.yaml keys -> values); every preset sets the same keys.
``tumorseg preset apply NAME`` rewrites those keys with ruamel.yaml's round-trip mode: every other
line, comment and value spelling stays byte for byte (``brats-gpu`` then ``demo-cpu`` gives back the
committed file), and the result is validated before params.yaml is replaced atomically.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tumorseg import yamlio
from tumorseg.config import DEFAULT_PARAMS_FILE, section
from tumorseg.errors import ConfigError

PRESETS_FILE = Path(__file__).with_name("presets.yaml")

CROSS_SECTION_INPUTS = ("preprocess", "data_loader", "model", "loss")
"""Sections the cross-section rules of ``load_training_config`` read (patch size, loss vs. output)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expected(_Strict):
    """What a run of the recipe costs; each text names the hardware and how the figure was obtained."""

    time: str = Field(min_length=1)
    memory: str = Field(min_length=1)
    how: str = Field(min_length=1)


class PresetSpec(_Strict):
    """One entry of presets.yaml."""

    summary: str = Field(min_length=1)
    expected: Expected
    sources: tuple[str, ...] = Field(min_length=1)
    values: dict[str, Any] = Field(alias="set", min_length=1)


@dataclass(frozen=True)
class Preset:
    """A validated preset; ``values`` keeps the preset file's YAML nodes (and so their spelling)."""

    name: str
    summary: str
    expected: Expected
    sources: tuple[str, ...]
    values: dict[str, Any]

    @property
    def sections(self) -> set[str]:
        return {key.split(".", 1)[0] for key in self.values}


@dataclass(frozen=True)
class KeyChange:
    """One params.yaml key a preset sets: its current and its preset value."""

    key: str
    old: Any
    new: Any

    @property
    def changed(self) -> bool:
        return not same_value(self.old, self.new)

    def __str__(self) -> str:
        return f"{self.key}: {format_value(self.old)} -> {format_value(self.new)}"


def round_trip_yaml() -> Any:
    """ruamel.yaml in round-trip mode, set up to reproduce params.yaml's own spelling."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    # ruamel writes None as an empty value; params.yaml spells it `null`.
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return yaml


def load_presets(path: str | Path = PRESETS_FILE) -> dict[str, Preset]:
    """Read and check presets.yaml; :class:`ConfigError` names a bad entry by preset and field."""
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    try:
        data = round_trip_yaml().load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of preset names to presets")
    presets = {}
    for name, entry in data.items():
        try:
            spec = PresetSpec.model_validate(entry)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in (name, *err["loc"]))
            raise ConfigError(f"{path}: {loc}: {err['msg']}") from None
        presets[str(name)] = Preset(str(name), spec.summary, spec.expected, spec.sources, spec.values)
    return presets


def get_preset(name: str, presets: dict[str, Preset] | None = None) -> Preset:
    """The preset called ``name``; an unknown name is a one-line error listing the known ones."""
    presets = load_presets() if presets is None else presets
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(presets))}")
    return presets[name]


def compare(preset: Preset, params_path: str | Path = DEFAULT_PARAMS_FILE) -> list[KeyChange]:
    """Every key the preset sets, with its value in ``params_path`` (unchanged keys included);
    :class:`ConfigError` when params.yaml is missing, malformed or lacks one of the keys."""
    document = _read_document(Path(params_path), for_rewrite=False)
    return [change for _, _, change in _key_changes(document, preset, params_path)]


def apply_preset(preset: Preset, params_path: str | Path = DEFAULT_PARAMS_FILE) -> list[KeyChange]:
    """Write the preset's values into ``params_path`` (nothing when none changes); return the changes.

    Raises:
        ConfigError: a key the preset sets is missing, the rewrite would reformat lines the preset
            does not touch, or the result would not validate; the file is then left untouched.
    """
    from tumorseg.data.manifest import atomic_write_text

    params_path = Path(params_path)
    document = _read_document(params_path, for_rewrite=True)
    changes = []
    for parent, leaf, change in _key_changes(document, preset, params_path):
        if change.changed:
            parent[leaf] = _styled_like(change.new, parent[leaf])
            changes.append(change)
    if not changes:
        return []
    text = _dump(document)
    _validate(text, preset, params_path)
    atomic_write_text(params_path, text)
    return changes


def _read_document(path: Path, *, for_rewrite: bool) -> Any:
    """params.yaml as a ruamel round-trip document; with ``for_rewrite``, a file that dumping would
    not reproduce byte for byte (hand-made spellings such as ``[1,2]``) is refused."""
    from ruamel.yaml.error import YAMLError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root or pass --params") from None
    try:
        document = round_trip_yaml().load(text)
    except YAMLError:
        raise ConfigError(f"{path}: is not valid YAML; fix the syntax") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    dumped = _dump(document) if for_rewrite else text
    if dumped != text:
        lines = itertools.zip_longest(text.splitlines(), dumped.splitlines())
        line = next((number for number, (a, b) in enumerate(lines, 1) if a != b), len(text.splitlines()))
        raise ConfigError(
            f"{path}: line {line}: a rewrite would reformat lines a preset does not touch; "
            "set the preset's keys by hand (`tumorseg preset show NAME` lists them)"
        )
    return document


def _dump(document: Any) -> str:
    buffer = io.StringIO()
    round_trip_yaml().dump(document, buffer)
    return buffer.getvalue()


def _key_changes(
    document: Any, preset: Preset, params_path: str | Path
) -> Iterator[tuple[Any, str, KeyChange]]:
    """Per key the preset sets: the mapping holding its last part, that part (``model.unet.channels``:
    model.unet, channels) and the change. Lazy, so a caller may write each key before the next is read."""
    for key, new in preset.values.items():
        *parents, leaf = key.split(".")
        node = document
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(
                f"{params_path}: {key} (set by preset {preset.name}) is not in this file; "
                "add it or bring params.yaml up to date with this version of tumorseg"
            )
        yield node, leaf, KeyChange(key, node[leaf], new)


def _styled_like(new: Any, old: Any) -> Any:
    """``new`` as a ruamel node in ``old``'s collection style (flow or block); scalars keep their spelling."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(new, (list, tuple)):
        node = CommentedSeq(_styled_like(item, None) for item in new)
    elif isinstance(new, dict):
        node = CommentedMap((k, _styled_like(v, None)) for k, v in new.items())
    else:
        return new
    if not isinstance(old, (CommentedSeq, CommentedMap)) or old.fa.flow_style():
        node.fa.set_flow_style()
    else:
        node.fa.set_block_style()
    return node


def _validate(text: str, preset: Preset, params_path: Path) -> None:
    """Validate the sections the preset touches as the stages read them (PyYAML, typed sections), with
    the training config's cross-section inputs; problems elsewhere are for their stage to report."""
    import tumorseg.training.config as training

    params = yamlio.safe_load(text)
    try:
        for name in sorted(preset.sections):
            section(name, params, source=params_path)
        if preset.sections & set(training.TRAINING_SECTIONS):
            subset = {
                name: params[name]
                for name in training.TRAINING_SECTIONS
                if name in params and (name in preset.sections or name in CROSS_SECTION_INPUTS)
            }
            training.load_training_config(subset, source=str(params_path))
    except ConfigError as exc:
        raise ConfigError(
            f"preset {preset.name}: the result would be invalid: {exc}; {params_path} left unchanged"
        ) from None


def same_value(a: Any, b: Any) -> bool:
    """YAML-level equality: ``2 == 2.0`` and ``[1, 2] == (1, 2)``, but ``true != 1``."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def format_value(value: Any) -> str:
    """A value in YAML flow style, on one line: ``[1.0, 1.0, 1.0]``, ``true``, ``null``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        # ruamel keeps a loaded float's spelling (1.0e-5 stays 1.0e-5); repr() would give 1e-05
        return round_trip_yaml().representer.represent_data(value).value
    return str(value)


def list_lines(presets: dict[str, Preset]) -> list[str]:
    """``tumorseg preset list``: one line per preset (name, summary, expected time; memory)."""
    width = max(len(name) for name in presets)
    return [
        f"{name:<{width}}  {p.summary} [{p.expected.time}; {p.expected.memory}]"
        for name, p in sorted(presets.items())
    ]


def show_lines(preset: Preset, params_path: str | Path = DEFAULT_PARAMS_FILE) -> list[str]:
    """``tumorseg preset show``: the recipe, its cost and sources, and each key against params.yaml."""
    lines = [
        f"{preset.name}: {preset.summary}",
        f"expected time: {preset.expected.time}",
        f"expected memory: {preset.expected.memory}",
        f"how obtained: {preset.expected.how}",
        "sources:",
        *(f"  - {source}" for source in preset.sources),
    ]
    if not Path(params_path).is_file():
        lines.append(f"sets ({params_path} not found, nothing to compare):")
        return lines + [f"  {key}: {format_value(value)}" for key, value in preset.values.items()]
    changes = compare(preset, params_path)
    differ = sum(change.changed for change in changes)
    lines.append(
        f"sets ({differ} of {len(changes)} differ from {params_path}, marked *, current value after '<-'):"
    )
    for change in changes:
        mark, current = ("*", f"  <- {format_value(change.old)}") if change.changed else (" ", "")
        lines.append(f"{mark} {change.key}: {format_value(change.new)}{current}")
    return lines
