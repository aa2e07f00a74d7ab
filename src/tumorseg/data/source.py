"""``data.source``: which dataset the pipeline reads, checked before any stage writes.

``data.source: synth`` (the default) is the embedded generator: ``tumorseg source`` (the first
DVC stage) writes its cases to ``data/synth``. Any other value is the path of a dataset folder
in a supported layout, absolute or relative to the project's ``data/`` folder. Such a folder is
only read, never written, moved or deleted: in ``dvc.yaml`` it is a dependency of ``ingest``, and
``tumorseg source`` only checks it (exists, not empty, one supported layout) so that a wrong path
fails with one line before any stage writes anything.

Relative paths resolve against the folder holding params.yaml (the project root), not the working
directory, so the DVC stages (which run in ``data/``), the Prefect flows and the CLI agree.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.config import SYNTH_SOURCE, DataConfig, section
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

LAYOUTS_LOOKED_FOR = (
    "BraTS 2020/21 case folders (BraTS2021_00001/BraTS2021_00001_t1.nii.gz), BraTS 2023+ case folders "
    "(BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz), an MSD Task01 folder (imagesTr/BRATS_001.nii.gz), "
    "Figshare .mat slices or Kaggle yes/ + no/ images"
)
SOURCE_HINT = "set data.source to `synth` or to a dataset folder (absolute, or relative to data/)"


@dataclass(frozen=True)
class SourceInfo:
    """What ``data.source`` points at.

    Attributes:
        folder: the dataset folder.
        synthetic: the folder is the embedded generator's output.
        layout: its layout (``brats2021``, ``brats2023`` or ``msd``).
        cases: cases found (without reading any image).
    """

    folder: Path
    synthetic: bool
    layout: str
    cases: int

    def one_line(self) -> str:
        kind = "generated" if self.synthetic else "read-only"
        return f"data.source: {self.folder} ({kind}, {self.layout}, {self.cases} cases)"


def project_root(params_path: str | Path) -> Path:
    """The folder relative paths of params.yaml resolve against: the file's own folder.

    Normalised (``data/..`` -> the project), symbolic links kept.
    """
    return Path(os.path.normpath(Path(params_path).absolute().parent))


def source_folder(params: dict[str, Any], params_path: str | Path = "params.yaml") -> Path:
    """The dataset folder ``data.source`` selects (``<root>/data/synth`` for the generator)."""
    cfg: DataConfig = section("data", params, source=params_path)
    return cfg.folder(project_root(params_path))


def inspect_source(
    folder: Path, *, synthetic: bool = False, layout: str | None = None, labels: str | None = None
) -> SourceInfo:
    """Check a dataset folder without reading any image.

    Raises:
        DataError: the folder does not exist, is a file, is empty, holds no supported layout, or
            mixes layouts (naming the layouts and the first file of each).
    """
    from tumorseg.data.layouts import discover_cases
    from tumorseg.data.planar_ingest import find_planar_files

    if not folder.exists():
        raise DataError(f"data.source: {folder} does not exist; {SOURCE_HINT} holding {LAYOUTS_LOOKED_FOR}")
    if not folder.is_dir():
        raise DataError(f"data.source: {folder} is a file, not a folder; {SOURCE_HINT}")
    if not any(not p.name.startswith(".") for p in folder.iterdir()):
        raise DataError(f"data.source: {folder} is empty; put {LAYOUTS_LOOKED_FOR} there, or {SOURCE_HINT}")
    if find_planar_files(folder):
        raise DataError(
            f"data.source: {folder} holds 2-D data (Figshare .mat / Kaggle images); the 3-D pipeline "
            "reads BraTS or MSD volumes: put 2-D data in paths.raw_2d (the *_2d stages)"
        )
    try:
        cases = discover_cases(folder, None if layout == "auto" else layout, labels)
    except DataError as exc:
        raise DataError(f"data.source: {exc}") from None
    return SourceInfo(folder, synthetic, cases[0].layout, len(cases))


def prepare_source(params: dict[str, Any], params_path: str | Path = "params.yaml") -> SourceInfo:
    """Make ``data.source`` ready for ``ingest``: generate the embedded data, or check the folder.

    With ``data.source: synth`` the generator writes ``synth:`` cases into ``data/synth``; with a
    folder nothing is written anywhere, the folder is only listed.

    Raises:
        DataError: the folder is missing, empty, of no supported layout or of several.
    """
    cfg: DataConfig = section("data", params, source=params_path)
    folder = cfg.folder(project_root(params_path))
    if cfg.is_synth:
        from tumorseg.data.synth import synthesize_dataset

        written = synthesize_dataset(folder, section("synth", params, source=params_path))
        return SourceInfo(folder, True, section("synth", params).layout, len(written))
    ingest_cfg = section("ingest", params, source=params_path)
    info = inspect_source(folder, layout=ingest_cfg.layout, labels=ingest_cfg.labels)
    # The DVC stage's output is the generator's folder; with a folder of one's own it stays empty.
    generated = cfg.folder_for(SYNTH_SOURCE, project_root(params_path))
    if generated != folder:
        generated.mkdir(parents=True, exist_ok=True)
    return info
