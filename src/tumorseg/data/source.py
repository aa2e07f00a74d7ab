"""``data.source``: which dataset the pipeline reads, checked before any stage writes.

``synth`` (the default): ``tumorseg source`` generates cases into ``data/synth``; any other value is
a dataset folder, only ever read. Relative paths resolve against the folder of params.yaml.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.config import GENERATED_FOLDERS, DataConfig
from tumorseg.errors import DataError
from tumorseg.params import Params, as_params

LAYOUTS_LOOKED_FOR = (
    "BraTS 2020/21 case folders (BraTS2021_00001/BraTS2021_00001_t1.nii.gz), BraTS 2023+ case folders "
    "(BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz), an MSD Task01 folder (imagesTr/BRATS_001.nii.gz), "
    "Figshare .mat slices or Kaggle yes/ + no/ images"
)
SOURCE_HINT = "set data.source to `synth` or to a dataset folder (absolute, or relative to data/)"


@dataclass(frozen=True)
class SourceInfo:
    """What ``data.source`` points at: the folder, whether the generator wrote it, its layout and cases."""

    folder: Path
    synthetic: bool
    layout: str
    cases: int

    def one_line(self) -> str:
        kind = "generated" if self.synthetic else "read-only"
        return f"data.source: {self.folder} ({kind}, {self.layout}, {self.cases} cases)"


def project_root(params_path: str | Path) -> Path:
    """The folder of params.yaml, against which its relative paths resolve (normalised, links kept)."""
    return Path(os.path.normpath(Path(params_path).absolute().parent))


def source_folder(
    params: Params | dict[str, Any], params_path: str | Path = "params.yaml", dims: int = 3
) -> Path:
    """The dataset folder ``data.source`` (``data.source_2d`` for ``dims`` 2) selects."""
    params = as_params(params, params_path)
    cfg: DataConfig = params.data
    return cfg.folder(project_root(params_path), dims)


def inspect_source(
    folder: Path,
    *,
    synthetic: bool = False,
    layout: str | None = None,
    labels: str | None = None,
    dims: int = 3,
) -> SourceInfo:
    """Check a dataset folder without reading any image; a one-line DataError when it is missing, a
    file, empty, of the other dimensionality, or of no (or several) supported layouts."""
    from tumorseg.data.layouts import discover_cases
    from tumorseg.data.readers import IMAGE, VOLUME, folder_dims

    key = "data.source" if dims == VOLUME else "data.source_2d"
    if not folder.exists():
        raise DataError(f"{key}: {folder} does not exist; {SOURCE_HINT} holding {LAYOUTS_LOOKED_FOR}")
    if not folder.is_dir():
        raise DataError(f"{key}: {folder} is a file, not a folder; {SOURCE_HINT}")
    if not any(not p.name.startswith(".") for p in folder.iterdir()):
        raise DataError(f"{key}: {folder} is empty; put {LAYOUTS_LOOKED_FOR} there, or {SOURCE_HINT}")
    found = folder_dims(folder)
    if found != dims:
        raise DataError(
            f"data.source: {folder} holds 2-D data (Figshare .mat / Kaggle images); set data.source_2d "
            "to it (the @2d stages) and data.source to BraTS or MSD volumes"
            if found == IMAGE
            else f"data.source_2d: {folder} holds no Figshare .mat files and no Kaggle yes/ + no/ image "
            "folders; set it to such a folder, or to synth"
        )
    if dims == IMAGE:
        from tumorseg.data.readers import find_planar_files

        files = find_planar_files(folder)
        layouts = "+".join(sorted({f.layout for f in files}))
        return SourceInfo(folder, synthetic, layouts, len(files))
    try:
        cases = discover_cases(folder, None if layout == "auto" else layout, labels)
    except DataError as exc:
        raise DataError(f"data.source: {exc}") from None
    return SourceInfo(folder, synthetic, cases[0].layout, len(cases))


def prepare_source(
    params: Params | dict[str, Any], params_path: str | Path = "params.yaml", dims: int = 3
) -> SourceInfo:
    """Make ``data.source`` (``data.source_2d`` for ``dims`` 2) ready for ``ingest``: generate the
    embedded data, or check the folder (:func:`inspect_source`)."""
    params = as_params(params, params_path)
    cfg: DataConfig = params.data
    root = project_root(params_path)
    folder = cfg.folder(root, dims)
    if cfg.is_synth(dims):
        return _generate(folder, params, params_path, dims)
    ingest_cfg = params.ingest
    info = inspect_source(folder, layout=ingest_cfg.layout, labels=ingest_cfg.labels, dims=dims)
    # The DVC stage's output is the generator's folder; with a folder of one's own it stays empty.
    generated = cfg.folder_for(GENERATED_FOLDERS[dims], root)
    if generated != folder:
        generated.mkdir(parents=True, exist_ok=True)
    return info


def _generate(folder: Path, params: Params, params_path: str | Path, dims: int) -> SourceInfo:
    """The embedded data: ``synth:`` volumes, or ``synth_2d:`` Figshare and Kaggle images."""
    if dims == 3:
        from tumorseg.data.synth import synthesize_dataset

        cfg = params.synth
        return SourceInfo(folder, True, cfg.layout, len(synthesize_dataset(folder, cfg)))
    from tumorseg.data.planar_synth import synthesize_planar_dataset
    from tumorseg.data.readers import IMAGE_LAYOUTS

    cfg = params.synth_2d
    written = [synthesize_planar_dataset(folder / layout, layout, cfg) for layout in IMAGE_LAYOUTS]
    return SourceInfo(folder, True, "+".join(IMAGE_LAYOUTS), sum(len(w) for w in written))
