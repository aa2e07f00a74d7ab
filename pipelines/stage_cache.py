"""Prefect cache keys for pipeline stages, computed the way DVC decides a stage is up to date.

A stage's key hashes what its ``dvc.yaml`` entry lists (read from ``dvc.yaml`` itself): its params
keys and the *content* of its dependencies, ``src/`` code included. With Prefect's ``TASK_SOURCE`` a
rerun with nothing changed skips the stage, unlike ``INPUTS``, which would miss a changed file. A
cache hit is only honoured while the stage's outputs exist. File digests are memoised per process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

import tumorseg
from tumorseg.errors import ConfigError
from tumorseg.params import Params, as_params

_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """md5 of a file's bytes (memoised while its size, mtime and inode stay the same)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.md5()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def path_digest(path: Path) -> str:
    """Content digest of a file, or of a folder (relative paths and digests of every file in it)."""
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        digest = hashlib.md5()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{item.relative_to(path).as_posix()}\t{file_digest(item)}\n".encode())
        return digest.hexdigest()
    return "missing"


def dotted_value(params: Params | dict[str, Any], dotted: str) -> Any:
    # the values as written (a Params' raw mapping), as DVC hashes them
    node: Any = params if isinstance(params, dict) else params.raw
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


ROOT = Path(__file__).resolve().parents[1]  # the source checkout (pipelines/ beside dvc.yaml)
# Where ``dvc.yaml``'s ``src/tumorseg/...`` code dependencies are read: src/ or site-packages.
PACKAGE_PARENT = Path(tumorseg.__file__).resolve().parents[1]
PARAMS_FILES = {"params.yaml", "../params.yaml"}  # ``../`` from a stage run in ``data/``
_TEMPLATE = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def interpolate(text: str, params: dict[str, Any]) -> str:
    """``${paths.ingested}/manifest.csv`` with params' values (the overrides a flow run applies)."""

    def value(match: re.Match[str]) -> str:
        found = dotted_value(params, match.group(1))
        if found is None:
            raise ConfigError(f"dvc.yaml: ${{{match.group(1)}}}: not set in params.yaml; add the key")
        return str(found)

    return _TEMPLATE.sub(value, text)


@dataclass(frozen=True)
class StageSpec:
    """What a stage reads and writes: its ``dvc.yaml`` entry.

    Paths are kept as ``dvc.yaml`` writes them (``${paths.ingested}``, relative to ``wdir``) and
    resolved against the params of each run, so a flow run with other paths keys on its own files.

    Attributes:
        params: params keys it reads (dotted keys or whole sections).
        deps: data files and folders, params files other than params.yaml, and code under ``src/``.
        outs: its outs, metrics and plots; a missing one forces the stage to run.
    """

    name: str
    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    wdir: str = "."

    def _resolve(self, template: str, params: dict[str, Any]) -> Path:
        first = _TEMPLATE.search(template)
        if first and Path(interpolate(first.group(0), params)).is_absolute():
            template = template[first.start() :]  # `../${paths.ingested}` with an absolute path is that path
        path = Path(interpolate(template, params))
        if path.is_absolute():
            return path
        relative = Path(os.path.normpath(Path(self.wdir) / path))
        # code is the installed package's; data paths are relative to the working folder, as the stages'
        return PACKAGE_PARENT / relative.relative_to("src") if relative.parts[:1] == ("src",) else relative

    def dep_paths(self, params: dict[str, Any]) -> list[Path]:
        return [self._resolve(t, params) for t in self.deps]

    def out_paths(self, params: dict[str, Any]) -> list[Path]:
        return [self._resolve(t, params) for t in self.outs]

    def key(self, params: dict[str, Any]) -> str:
        """The stage's cache key for these params (hash of params values and dependency contents)."""
        payload = {
            "stage": self.name,
            "params": {k: dotted_value(params, k) for k in self.params},
            "deps": {str(p): path_digest(p) for p in self.dep_paths(params)},
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return f"{self.name}-{hashlib.md5(text.encode()).hexdigest()}"

    def outputs_exist(self, params: dict[str, Any]) -> bool:
        return all(p.exists() for p in self.out_paths(params))


def _entries(items: list[Any]) -> list[str]:
    """Paths of a ``deps``/``outs`` list, whose entries are a path or ``{path: options}``."""
    return [item if isinstance(item, str) else next(iter(item)) for item in items or []]


def stage_spec(name: str, entry: dict[str, Any]) -> StageSpec:
    """One ``dvc.yaml`` stage as a :class:`StageSpec`."""
    keys: list[str] = []
    param_files: list[str] = []
    for item in entry.get("params") or []:
        if isinstance(item, str):
            keys.append(item)
            continue
        ((file, listed),) = item.items()
        if file in PARAMS_FILES:
            keys += listed or []
        else:  # another params file (tune's best params): its whole content counts
            param_files.append(file)
    outs = [p for kind in ("outs", "metrics", "plots") for p in _entries(entry.get(kind))]
    return StageSpec(
        name=name,
        params=tuple(keys),
        deps=(*_entries(entry.get("deps")), *param_files),
        outs=tuple(outs),
        wdir=entry.get("wdir", "."),
    )


def find_dvc_yaml() -> Path:
    """The project's ``dvc.yaml``: in the working folder (flows run in the project), else the checkout's."""
    for candidate in (Path.cwd() / "dvc.yaml", ROOT / "dvc.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"dvc.yaml: not found in {Path.cwd()}; run the flow from the project folder")


_ITEM = re.compile(r"\$\{(item\.[A-Za-z0-9_]+|key)\}")


def expand_item(node: Any, key: str, item: dict[str, Any]) -> Any:
    """A ``foreach`` stage's ``do`` body for one entry: ``${key}`` and ``${item.x}`` replaced, the
    other ``${...}`` left for :func:`interpolate` (an item's values may hold them, as DVC allows)."""
    if isinstance(node, dict):
        return {expand_item(k, key, item): expand_item(v, key, item) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_item(v, key, item) for v in node]
    if not isinstance(node, str):
        return node

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        return key if name == "key" else str(item[name.removeprefix("item.")])

    return _ITEM.sub(value, node)


@functools.cache
def _read_stage_specs(dvc_yaml: Path, mtime_ns: int) -> dict[str, StageSpec]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    specs: dict[str, StageSpec] = {}
    for name, entry in stages.items():
        if "foreach" not in entry:
            specs[name] = stage_spec(name, entry)
            continue
        for key, item in entry["foreach"].items():  # `train@3d`, `train@2d`: DVC's names
            specs[f"{name}@{key}"] = stage_spec(f"{name}@{key}", expand_item(entry["do"], key, item))
    return specs


def dvc_stage_specs(dvc_yaml: Path | None = None) -> dict[str, StageSpec]:
    """Every stage of ``dvc.yaml``, read when a flow runs (again when the file changes)."""
    path = (dvc_yaml or find_dvc_yaml()).resolve()
    return _read_stage_specs(path, path.stat().st_mtime_ns)


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache policy keyed on a stage's params and dependency contents (task arg ``params``)."""

    stage: StageSpec | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if self.stage is None or "params" not in inputs:
            return None
        return self.stage.key(inputs["params"])


def stage_policy(stage: StageSpec, key_storage: Path) -> CachePolicy:
    """The stage's key plus the task function's source, with records kept in ``key_storage``."""
    return (StageCachePolicy(stage=stage) + TASK_SOURCE).configure(key_storage=key_storage)


def cached_task(task_fn: Any, spec: StageSpec, params: Params | dict[str, Any]) -> Any:
    """``task_fn`` (taking the params dict as ``params``) with its stage's cache policy, keys kept in
    ``flow.cache_dir`` for ``flow.cache_days`` and results persisted; forced to run when an output is
    missing."""
    params = as_params(params)

    cfg = params.flow
    return task_fn.with_options(
        cache_policy=stage_policy(spec, Path(cfg.cache_dir).resolve()),
        cache_expiration=timedelta(days=cfg.cache_days) if cfg.cache_days else None,
        refresh_cache=not spec.outputs_exist(params),
        persist_result=True,
    )


def with_source_folder(spec: StageSpec, stage: str, source: Path | None, template: str) -> StageSpec:
    """``spec`` with the data folder ``template`` (``${data.source}``) as ``source``, resolved against
    the params file's folder rather than the working one: the ``source`` stage's output, a
    dependency of ``ingest``."""
    if source is not None and stage == "source":
        return replace(spec, outs=(str(source),))
    if source is not None and stage == "ingest":
        return replace(spec, deps=tuple(str(source) if d == template else d for d in spec.deps))
    return spec
