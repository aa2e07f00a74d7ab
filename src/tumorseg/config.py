"""params.yaml, loaded once into typed config objects: one pydantic model per section.

Unknown or ill-typed keys are a one-line :class:`~tumorseg.errors.ConfigError` naming the key
(``params.yaml: train.lr: Input should be a valid number``). Overrides (flows, tests, ``-S``) are
dotted keys, ``{"train.max_epochs": 1}``, applied before validation.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tumorseg import yamlio
from tumorseg.errors import ConfigError

DEFAULT_PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    """Base of every params.yaml section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


SYNTH_SOURCE = "synth"
DATA_FOLDER = "data"
"""Relative ``data.source`` paths are relative to this folder (the DVC stages' ``wdir``)."""
GENERATED_FOLDERS: dict[int, str] = {3: SYNTH_SOURCE, 2: "synth_2d"}
"""``data.source`` / ``data.source_2d`` values that select the generator, by dims, and its folder in ``data/``."""


class DataConfig(Section):
    """``data:`` which dataset the pipeline trains on.

    Attributes:
        source: ``synth`` (the embedded generator) or a dataset folder in any supported layout,
            absolute or relative to ``data/``. A folder is only read: DVC tracks it as a dependency
            of ``ingest``, never as an output.
        source_2d: the same for the ``@2d`` stages: ``synth_2d`` or a folder of ``.mat`` slices
            and/or Kaggle ``yes/`` + ``no/`` image folders.
    """

    source: str = Field(SYNTH_SOURCE, min_length=1)
    source_2d: str = Field(GENERATED_FOLDERS[2], min_length=1)

    @model_validator(mode="after")
    def _no_home_shorthand(self) -> DataConfig:
        for key in ("source", "source_2d"):
            if getattr(self, key).startswith("~"):
                # DVC would read the dependency path literally; tumorseg would expand it: they must agree
                raise ValueError(
                    f"{key}: {getattr(self, key)!r}: write the absolute path (DVC does not expand ~)"
                )
        return self

    def source_of(self, dims: int) -> str:
        return self.source if dims == 3 else self.source_2d

    def is_synth(self, dims: int = 3) -> bool:
        return self.source_of(dims) == GENERATED_FOLDERS[dims]

    def folder(self, project_root: str | Path = ".", dims: int = 3) -> Path:
        return self.folder_for(self.source_of(dims), project_root)

    @staticmethod
    def folder_for(source: str, project_root: str | Path = ".") -> Path:
        path = Path(source).expanduser()
        return path if path.is_absolute() else Path(project_root) / DATA_FOLDER / path


class PathsConfig(Section):
    """Where each stage reads and writes, relative to the project root."""

    ingested: str = "data/ingested"
    validated: str = "data/validated"
    preprocessed: str = "data/preprocessed"
    split: str = "data/split.json"
    ingested_2d: str = "data/ingested_2d"
    validated_2d: str = "data/validated_2d"
    preprocessed_2d: str = "data/preprocessed_2d"
    split_2d: str = "data/split_2d.json"
    reports: str = "reports"
    reports_2d: str = "reports/2d"
    mlruns: str = "mlruns"


def _known_convention(value: str) -> str:
    """``auto`` or a convention of :file:`tumorseg/data/label_sets.yaml`."""
    from tumorseg.data.conventions import LABEL_CONVENTIONS

    if value == "auto" or value in LABEL_CONVENTIONS:
        return value
    raise ValueError(f"unknown label convention {value!r}; use one of auto, {', '.join(LABEL_CONVENTIONS)}")


LabelConvention = Annotated[str, AfterValidator(_known_convention)]


DATASET_LAYOUTS = ("brats2021", "brats2023", "msd", "nnunet", "monai")
"""Layouts tumorseg reads and ``tumorseg synth`` writes (:mod:`tumorseg.data.layouts`)."""


class SynthConfig(Section):
    """``tumorseg synth``: the embedded default dataset, built on nilearn's MNI152 template.

    ``labels`` is the convention written (``auto``: the layout's own; nnunet and monai write
    brats2023 codes); ``brats2024-gli`` adds resection cavities, ``brats2024-ped`` cysts. The
    ``*_fraction`` keys are shares of cases (of tumours, for the tumour's own kinds); the rest set
    how far each case's look may stray from the typical one (params.yaml documents each key).
    """

    layout: Literal["brats2021", "brats2023", "msd", "nnunet", "monai"] = "brats2021"
    labels: LabelConvention = "auto"
    cases: int = Field(48, ge=1)
    seed: int = 42
    spacing_mm: float = Field(2.0, gt=0.2, le=4.0)
    tumour_free_fraction: float = Field(0.15, ge=0.0, le=1.0)
    no_necrosis_fraction: float = Field(0.25, ge=0.0, le=1.0)
    anisotropic_fraction: float = Field(0.0, ge=0.0, le=1.0)
    reoriented_fraction: float = Field(0.2, ge=0.0, le=1.0)
    noise_level: float = Field(0.03, ge=0.0, le=0.5)
    noise_jitter: float = Field(0.5, ge=0.0, le=1.5)
    bias_field_strength: float = Field(0.2, ge=0.0, le=1.0)
    multifocal_fraction: float = Field(0.2, ge=0.0, le=1.0)
    satellite_fraction: float = Field(0.25, ge=0.0, le=1.0)
    nodular_fraction: float = Field(0.25, ge=0.0, le=1.0)
    non_enhancing_fraction: float = Field(0.0, ge=0.0, le=1.0)
    enhancement_gap_max: float = Field(0.4, ge=0.0, le=0.9)
    oedema_fuzziness: float = Field(0.3, ge=0.0, le=0.6)
    contrast_jitter: float = Field(0.15, ge=0.0, le=0.2)
    net_contrast_min: float = Field(1.0, ge=0.1, le=1.0)
    partial_volume: bool = True
    low_resolution_fraction: float = Field(0.25, ge=0.0, le=1.0)
    artefact_fraction: float = Field(0.25, ge=0.0, le=1.0)


class IngestConfig(Section):
    """``tumorseg ingest``: layout detection, label convention and the manifest.

    ``labels`` names the convention of the ``seg`` files (``auto``: from the layout, the BraTS case
    prefix or ``dataset.json``; where that is ambiguous, ingest stops and asks for it).
    """

    layout: Literal["auto", "brats2021", "brats2023", "msd", "nnunet", "monai"] = "auto"
    labels: LabelConvention = "auto"
    hash_chunk_mb: int = Field(8, ge=1)
    workers: int = Field(2, ge=0)


class ValidateConfig(Section):
    """``tumorseg validate``: Great Expectations suites on the manifest and volume statistics."""

    max_invalid_fraction: float = Field(0.25, ge=0.0, le=1.0)
    spacing_min_mm: float = Field(0.3, gt=0.0)
    spacing_max_mm: float = Field(7.0, gt=0.0)
    min_brain_voxels: int = Field(1000, ge=1)
    affine_tolerance_mm: float = Field(1e-3, gt=0.0)

    @model_validator(mode="after")
    def _spacing_order(self) -> ValidateConfig:
        if self.spacing_min_mm >= self.spacing_max_mm:
            raise ValueError("spacing_min_mm must be below spacing_max_mm")
        return self


class PreprocessConfig(Section):
    """Reorient to RAS, resample, crop to the brain, z-score per channel."""

    target_spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    crop_margin_vox: int = Field(2, ge=0)
    storage_dtype: Literal["float16", "float32"] = "float16"
    image_interpolation_order: int = Field(1, ge=0, le=3)
    label_resampling: Literal["onehot_linear", "nearest"] = "onehot_linear"
    compress_npz: bool = False
    sample_locations: int = Field(10000, ge=1)
    workers: int = Field(2, ge=0)


class SplitConfig(Section):
    """Train/val/test split by patient (every scan of a patient, under any case id, in one part).

    ``method`` (rules in :mod:`tumorseg.data.split`): ``stratified`` (by tumour size); ``datalist``
    (a MONAI datalist's ``validation``/``testing`` lists or fold ``val_fold``; a missing part is held
    out stratified); ``file`` (``file``: JSON ``{"train": [...], "val": [...], "test": [...]}`` or CSV
    ``case_id,split``, relative to the project folder).
    """

    seed: int = 42
    train: float = Field(0.7, gt=0.0, lt=1.0)
    val: float = Field(0.15, gt=0.0, lt=1.0)
    test: float = Field(0.15, gt=0.0, lt=1.0)
    size_bins: int = Field(3, ge=1)
    method: Literal["stratified", "datalist", "file"] = "stratified"
    val_fold: int = Field(0, ge=0)
    file: str = ""

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0 (got {total:g})")
        return self

    @model_validator(mode="after")
    def _file_with_method_file(self) -> SplitConfig:
        if self.method == "file" and not self.file.strip():
            raise ValueError(
                "method: file needs file: the JSON or CSV split to use (relative to the project)"
            )
        if self.method != "file" and self.file.strip():
            raise ValueError(f"file: {self.file!r} is read only with method: file (method is {self.method})")
        return self


class EvaluateConfig(Section):
    """``tumorseg evaluate``: each challenge's own metrics (rules and sources: docs/evaluation.md).

    ``labels`` is a convention of tumorseg/data/label_sets.yaml (regions, lesion rules, HD95 penalty);
    ``hd95_penalty_mm`` None takes the convention's (374; 337 for BraTS 2024 GLI); a case counts as
    "tumour present" when its predicted WT volume exceeds ``detection_min_volume_ml``.
    """

    labels: LabelConvention = "auto"
    hd95_penalty_mm: float | None = Field(None, gt=0.0)
    lesion_dilation_connectivity: Literal[6, 18, 26] = 18  # generate_binary_structure(3, 2)
    lesion_connectivity: Literal[6, 18, 26] = 26  # cc3d connectivity=26
    detection_min_volume_ml: float = Field(0.0, ge=0.0)
    bootstrap_resamples: int = Field(2000, ge=1)
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 42
    affine_tolerance_mm: float = Field(1e-3, gt=0.0)
    plots: bool = True


SECTION_MODELS: dict[str, str] = {
    # the data layer: this module
    "data": "tumorseg.config:DataConfig",
    "paths": "tumorseg.config:PathsConfig",
    "synth": "tumorseg.config:SynthConfig",
    "ingest": "tumorseg.config:IngestConfig",
    "validate": "tumorseg.config:ValidateConfig",
    "preprocess": "tumorseg.config:PreprocessConfig",
    "split": "tumorseg.config:SplitConfig",
    "evaluate": "tumorseg.config:EvaluateConfig",
    # each later section's model lives beside the code that reads it
    "data_loader": "tumorseg.data.transforms:DataLoaderConfig",
    "augment": "tumorseg.data.transforms:AugmentConfig",
    "model": "tumorseg.models.networks:ModelConfig",
    "loss": "tumorseg.models.config:LossConfig",
    "sliding_window": "tumorseg.models.config:SlidingWindowConfig",
    "train": "tumorseg.training.config:TrainConfig",
    "trainer": "tumorseg.training.config:TrainerConfig",
    "mlflow": "tumorseg.training.config:MlflowConfig",
    "predict": "tumorseg.models.config:PredictConfig",
    "registry": "tumorseg.registry.config:RegistryConfig",
    "tune": "tumorseg.tuning.config:TuneConfig",
    "flow": "tumorseg.pipeline_config:FlowConfig",
    "compress": "tumorseg.compression.config:CompressConfig",
    "compare": "tumorseg.comparison.config:CompareConfig",
    "serve": "tumorseg.serving.config:ServeConfig",
    "monitor": "tumorseg.monitoring.config:MonitorConfig",
    "synth_2d": "tumorseg.config:SynthPlanarConfig",
    "validate_2d": "tumorseg.config:PlanarValidateConfig",
    "preprocess_2d": "tumorseg.config:PlanarPreprocessConfig",
    "model_2d": "tumorseg.models.config:PlanarModelConfig",
    "train_2d": "tumorseg.training.config:PlanarTrainConfig",
    "predict_2d": "tumorseg.models.config:PredictPlanarConfig",
    "detect": "tumorseg.evaluation.config:DetectConfig",
    "evaluate_2d": "tumorseg.evaluation.config:EvaluatePlanarConfig",
    "generalise": "tumorseg.config:GeneraliseConfig",
    "dicom": "tumorseg.dicom.config:DicomConfig",
}
"""Every params.yaml section and its model, in params.yaml's order: a table, not import-time
registration, so a model is imported only when its section is read (``validate`` never loads torch)."""


def section_model(name: str, *, source: str = str(DEFAULT_PARAMS_FILE)) -> type[Section]:
    """The model class of one section, imported on first use (a ConfigError for an unknown name)."""
    target = SECTION_MODELS.get(name)
    if target is None:
        raise ConfigError(f"{source}: {name}: not a params.yaml section; known: {', '.join(SECTION_MODELS)}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


RETIRED_KEYS: dict[str, str] = {
    "paths.raw": "the dataset is data.source now (synth, or your folder)",
    "paths.raw_2d": "the 2-D dataset is data.source_2d now (synth_2d, or your folder)",
    "flow.generate_data": "data.source: synth generates the data; a folder is only read",
    "data_loader.cache_num_workers": "patches are read out of core now; data_loader.cache_mb sets an in-memory budget",
    "evaluate.lesion_dilation_iterations": "per region in tumorseg/data/label_sets.yaml, as each challenge's metrics code",
    "evaluate.lesion_min_volume_mm3": "per region in tumorseg/data/label_sets.yaml, as each challenge's metrics code",
}
"""Retired params.yaml keys and what replaced them."""


def without_retired(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """A stored section (a registered model's config) without the keys :data:`RETIRED_KEYS` lists."""
    return {k: v for k, v in values.items() if f"{name}.{k}" not in RETIRED_KEYS}


def read_params(path: str | Path = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml as a plain dict (a missing or malformed file is a ConfigError)."""
    path = Path(path)
    try:
        data = yamlio.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root or pass --params") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def apply_overrides(params: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Return a copy of ``params`` with dotted-key overrides applied (``{"train.lr": 1e-3}``)."""
    if not isinstance(params, dict):  # a validated tumorseg.params.Params
        return params.with_overrides(overrides)
    result = copy.deepcopy(params)
    for dotted, value in (overrides or {}).items():
        node = result
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value
    return result


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML: numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    key, raw = text.split("=", 1)
    value = yamlio.safe_load(raw)
    if isinstance(value, str):
        # YAML 1.1 reads "1e-3" as text; users mean a number.
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip(), value


def section(
    name: str,
    params: dict[str, Any] | None = None,
    *,
    path: str | Path = DEFAULT_PARAMS_FILE,
    source: str | Path | None = None,
) -> Any:
    """Validate section ``name`` of ``params`` (read from ``path`` when None) into its typed model.

    Raises:
        ConfigError: naming the key and ``source`` (default ``path``): ``params.yaml: split.train: ...``.
    """
    if params is None:
        params = read_params(path)
    elif not isinstance(params, dict):  # a validated tumorseg.params.Params
        return params.section(name)
    label = str(source or path)
    model = section_model(name, source=label)
    raw = checked_section(label, name, params.get(name, {}) or {})
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise one_line_error(label, exc, name) from None


def checked_section(label: str, name: str, raw: Any) -> dict[str, Any]:
    """``raw`` if it is a mapping without retired keys (:data:`RETIRED_KEYS`), else a ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: {name}: expected a mapping")
    for key in raw:
        if f"{name}.{key}" in RETIRED_KEYS:
            raise ConfigError(
                f"{label}: {name}.{key}: retired; {RETIRED_KEYS[f'{name}.{key}']}; remove the key"
            )
    return raw


def one_line_error(label: str, exc: ValidationError, *prefix: str) -> ConfigError:
    """pydantic's first error as ``<label>: <dotted key>: <message>`` (``prefix``: the section name
    when ``exc`` comes from one section's model)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in (*prefix, *err["loc"]) if p != "__root__")
    return ConfigError(f"{label}: {loc}: {err['msg'].removeprefix('Value error, ')}")


class SynthPlanarConfig(Section):
    """``synth_2d:``: the embedded 2-D datasets.

    Attributes:
        figshare_mask_region: ``TC`` (tumour core, as Figshare masks outline on T1ce) or ``WT``.
        type_fractions: share of patients per tumour type (Figshare: 708 meningioma, 1426 glioma,
            930 pituitary slices).
        kaggle_tumour_fraction: share of the images in ``yes/``.
        kaggle_sequences: share of the images per sequence: the Kaggle set mixes T1ce, T2 and FLAIR.
        spacing_mm: voxel size of the 3-D cases the slices are cut from (2 mm: 120 x 120 slices).
        noise_level: Rician noise added at the output resolution, relative to white matter.
        glioma_non_enhancing_fraction, net_contrast_min: the gliomas' share without enhancement
            and their non-enhancing tumour's contrast to oedema (``synth:`` keys of the 3-D cases).
    """

    figshare_patients: int = Field(12, ge=1)
    slices_per_patient: int = Field(4, ge=1, le=40)
    figshare_mask_region: Literal["TC", "WT"] = "TC"
    type_fractions: dict[Literal["meningioma", "glioma", "pituitary"], float] = Field(
        default_factory=lambda: {"meningioma": 0.23, "glioma": 0.47, "pituitary": 0.30}
    )
    kaggle_images: int = Field(24, ge=1)
    kaggle_tumour_fraction: float = Field(0.6, ge=0.0, le=1.0)
    kaggle_min_side_px: int = Field(200, ge=32)
    kaggle_max_side_px: int = Field(700, ge=32, le=4096)
    kaggle_rgb_fraction: float = Field(0.5, ge=0.0, le=1.0)
    kaggle_png_fraction: float = Field(0.3, ge=0.0, le=1.0)
    kaggle_sequences: dict[Literal["t1", "t1ce", "t2", "flair"], float] = Field(
        default_factory=lambda: {"t1ce": 0.5, "t2": 0.25, "flair": 0.25}
    )
    spacing_mm: float = Field(2.0, ge=1.0, le=4.0)
    noise_level: float = Field(0.02, ge=0.0, le=0.3)
    glioma_non_enhancing_fraction: float = Field(0.0, ge=0.0, le=1.0)
    net_contrast_min: float = Field(1.0, ge=0.1, le=1.0)
    seed: int = 42

    @model_validator(mode="after")
    def _shares(self) -> SynthPlanarConfig:
        for name in ("type_fractions", "kaggle_sequences"):
            shares = getattr(self, name).values()
            if any(v < 0 for v in shares) or sum(shares) <= 0:
                raise ValueError(f"{name}: shares must be >= 0 with a positive sum")
        return self


class PlanarPreprocessConfig(Section):
    """``preprocess_2d:``: how a 2-D image becomes the ``(size, size)`` network input.

    Attributes:
        otsu_crop: crop to the largest Otsu-foreground component (the head), ``crop_margin_px`` around.
        denoise: ``median`` (``median_size`` px) or ``gaussian`` (``gaussian_sigma`` px), applied at
            the input's resolution before cropping.
        normalise: ``zscore`` (over the output), ``minmax`` (0..1) or ``percentile`` (clip to
            ``percentile_low``..``percentile_high``, then 0..1).
    """

    otsu_crop: bool = True
    crop_margin_px: int = Field(8, ge=0)
    denoise: Literal["none", "median", "gaussian"] = "none"
    median_size: int = Field(3, ge=1, le=15)
    gaussian_sigma: float = Field(1.0, gt=0.0, le=10.0)
    size: int = Field(256, ge=16, le=2048)
    normalise: Literal["zscore", "minmax", "percentile"] = "zscore"
    percentile_low: float = Field(0.5, ge=0.0, lt=50.0)
    percentile_high: float = Field(99.5, gt=50.0, le=100.0)

    @model_validator(mode="after")
    def _percentiles_ordered(self) -> PlanarPreprocessConfig:
        if self.percentile_low >= self.percentile_high:
            raise ValueError("percentile_low must be below percentile_high")
        return self


class PlanarValidateConfig(Section):
    """``validate_2d:``: limits of the 2-D checks (the quarantine share is ``validate.max_invalid_fraction``).

    Attributes:
        min_side_px: smallest image side accepted (thumbnails carry too little detail).
        max_side_px: largest image side accepted (guards against mislabelled mosaics/scans).
        min_tumour_pixels: a slice labelled tumour needs at least this many mask pixels.
    """

    min_side_px: int = Field(64, ge=1)
    max_side_px: int = Field(4096, ge=1)
    min_tumour_pixels: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _sides_ordered(self) -> PlanarValidateConfig:
        if self.min_side_px > self.max_side_px:
            raise ValueError("min_side_px must not exceed max_side_px")
        return self


class GeneraliseConfig(Section):
    """``generalise:``: the independent set (:mod:`tumorseg.data.independent`) and where it lives.

    Attributes:
        data, data_2d: dataset folders scored by ``tumorseg generalise --dims 3|2`` (any folder works;
            these defaults are where ``tumorseg synth --generator independent`` writes).
        cases: 3-D cases, spread over three layouts; ``spacing_mm`` 1.0 is BraTS's 240 x 240 x 155.
        figshare_patients, kaggle_images: 2-D slices' patients and yes/no images.
        seed: its own seed, so the set never shares a case with the training generator's draws.
    """

    data: str = "data/independent"
    data_2d: str = "data/independent_2d"
    cases: int = Field(12, ge=1)
    spacing_mm: float = Field(1.0, ge=0.5, le=4.0)
    figshare_patients: int = Field(12, ge=1)
    kaggle_images: int = Field(24, ge=1)
    seed: int = 2026
