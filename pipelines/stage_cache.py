"""Prefect cache keys for pipeline stages, computed the way DVC decides a stage is up to date.

A stage's key hashes what its ``dvc.yaml`` entry lists: the params keys it reads, the **content**
of its dependency files and folders, and the source of the tumorseg modules that implement it.
Combined with Prefect's ``TASK_SOURCE`` (the task function's own code), a rerun with nothing
changed skips the stage, and any change to data, params or code reruns it, unlike Prefect's
``INPUTS`` policy, which sees only the params dict and would miss a changed file.

A cache hit is only honoured while the stage's outputs exist: the flow passes
``refresh_cache=True`` when an output is missing (deleted by hand, or another workspace).

Hashing a file reads it once per process: digests are memoised on (path, size, mtime, inode).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

PathsFn = Callable[[dict[str, Any]], Sequence[Path]]

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


def module_paths(module: str) -> list[Path]:
    """Source files of a module or package (``tumorseg.validation`` -> every ``.py`` in it)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ValueError(f"no module {module!r}")
    if spec.submodule_search_locations:
        return sorted(p for folder in spec.submodule_search_locations for p in Path(folder).rglob("*.py"))
    return [Path(spec.origin)] if spec.origin else []


def dotted_value(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


@dataclass(frozen=True)
class StageSpec:
    """What a stage reads and writes (mirrors its ``dvc.yaml`` entry).

    Attributes:
        name: stage name (``dvc.yaml`` key, Prefect task name).
        params: params keys it reads (dotted keys or whole sections).
        deps: its dependency files and folders, from params (``lambda p: [Path(p["paths"]["ingested"])]``).
        code: tumorseg modules or packages that implement it.
        outs: its outputs, from params; a missing one forces the stage to run.
    """

    name: str
    params: tuple[str, ...]
    deps: PathsFn
    code: tuple[str, ...]
    outs: PathsFn

    def key(self, params: dict[str, Any]) -> str:
        """The stage's cache key for these params (hash of params values, deps and code)."""
        payload = {
            "stage": self.name,
            "params": {k: dotted_value(params, k) for k in self.params},
            "deps": {str(p): path_digest(p) for p in self.deps(params)},
            "code": {str(p.name): file_digest(p) for m in self.code for p in module_paths(m)},
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return f"{self.name}-{hashlib.md5(text.encode()).hexdigest()}"

    def outputs_exist(self, params: dict[str, Any]) -> bool:
        return all(p.exists() for p in self.outs(params))


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache policy keyed on a stage's params, dependency contents and code.

    The task must take the params dict as its ``params`` argument.
    """

    stage: StageSpec | None = None

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        if self.stage is None or "params" not in inputs:
            return None
        return self.stage.key(inputs["params"])


def stage_policy(stage: StageSpec, key_storage: Path) -> CachePolicy:
    """The stage's key plus the task function's source, with records kept in ``key_storage``."""
    return (StageCachePolicy(stage=stage) + TASK_SOURCE).configure(key_storage=key_storage)


def cached_task(task_fn: Any, spec: StageSpec, params: dict[str, Any]) -> Any:
    """The task with its stage's cache policy; forced to run when an output is missing.

    Every flow caches its stages the same way (``flow.cache_dir`` and ``flow.cache_days`` from
    params.yaml, results persisted so a later run can skip the stage), so they all call this.

    Args:
        task_fn: the Prefect task; it must take the params dict as its ``params`` argument.
        spec: the stage it runs (its ``dvc.yaml`` entry).
        params: params.yaml with the flow's overrides applied.

    Returns:
        ``task_fn`` with the cache options set, ready to be called with ``params``.
    """
    import tumorseg.pipeline_config  # noqa: F401  (registers flow:)
    from tumorseg.config import section

    cfg = section("flow", params)
    return task_fn.with_options(
        cache_policy=stage_policy(spec, Path(cfg.cache_dir).resolve()),
        cache_expiration=timedelta(days=cfg.cache_days) if cfg.cache_days else None,
        refresh_cache=not spec.outputs_exist(params),
        persist_result=True,
    )
