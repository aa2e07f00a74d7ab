"""params.yaml as one typed object: :class:`Params`, every section validated together at load.

The CLI, the Prefect flows and the tests build one ``Params`` (:func:`load_params`) and hand it to
the stages, which read ``params.train``, ``params.paths`` ... Overrides (``-S train.lr=1e-3``, a
flow's smoke settings, an Optuna trial) are dotted keys applied to the raw mapping before validation,
so a bad value is the same one-line :class:`~tumorseg.errors.ConfigError` wherever it comes from.
Each section's model lives in its layer's light config module (none imports torch).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from tumorseg.comparison.config import CompareConfig
from tumorseg.compression.config import CompressConfig
from tumorseg.config import (
    DEFAULT_PARAMS_FILE,
    DataConfig,
    EvaluateConfig,
    GeneraliseConfig,
    IngestConfig,
    PathsConfig,
    PlanarPreprocessConfig,
    PlanarValidateConfig,
    PreprocessConfig,
    SplitConfig,
    SynthConfig,
    SynthPlanarConfig,
    ValidateConfig,
    apply_overrides,
    checked_section,
    one_line_error,
    read_params,
)
from tumorseg.data.transforms import AugmentConfig, DataLoaderConfig
from tumorseg.dicom.config import DicomConfig
from tumorseg.errors import ConfigError
from tumorseg.evaluation.config import DetectConfig, EvaluatePlanarConfig
from tumorseg.models.config import (
    LossConfig,
    PlanarModelConfig,
    PredictConfig,
    PredictPlanarConfig,
    SlidingWindowConfig,
)
from tumorseg.models.networks import ModelConfig
from tumorseg.monitoring.config import MonitorConfig
from tumorseg.pipeline_config import FlowConfig
from tumorseg.registry.config import RegistryConfig
from tumorseg.serving.config import ServeConfig
from tumorseg.training.config import MlflowConfig, PlanarTrainConfig, TrainConfig, TrainerConfig
from tumorseg.tuning.config import TuneConfig

# ``validate:`` is a section; the BaseModel method it shadows is pydantic v1's deprecated alias.
warnings.filterwarnings("ignore", message='Field name "validate" in "Params" shadows', category=UserWarning)


class Params(BaseModel):
    """Every params.yaml section, in the file's order; a missing section takes its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig = DataConfig()
    paths: PathsConfig = PathsConfig()
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    validate: ValidateConfig = ValidateConfig()  # type: ignore[assignment]
    preprocess: PreprocessConfig = PreprocessConfig()
    split: SplitConfig = SplitConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    data_loader: DataLoaderConfig = DataLoaderConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    sliding_window: SlidingWindowConfig = SlidingWindowConfig()
    train: TrainConfig = TrainConfig()
    trainer: TrainerConfig = TrainerConfig()
    mlflow: MlflowConfig = MlflowConfig()
    predict: PredictConfig = PredictConfig()
    registry: RegistryConfig = RegistryConfig()
    tune: TuneConfig = TuneConfig()
    flow: FlowConfig = FlowConfig()
    compress: CompressConfig = CompressConfig()
    compare: CompareConfig = CompareConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    synth_2d: SynthPlanarConfig = SynthPlanarConfig()
    validate_2d: PlanarValidateConfig = PlanarValidateConfig()
    preprocess_2d: PlanarPreprocessConfig = PlanarPreprocessConfig()
    model_2d: PlanarModelConfig = PlanarModelConfig()
    train_2d: PlanarTrainConfig = PlanarTrainConfig()
    predict_2d: PredictPlanarConfig = PredictPlanarConfig()
    detect: DetectConfig = DetectConfig()
    evaluate_2d: EvaluatePlanarConfig = EvaluatePlanarConfig()
    generalise: GeneraliseConfig = GeneraliseConfig()
    dicom: DicomConfig = DicomConfig()

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr(default=str(DEFAULT_PARAMS_FILE))

    @property
    def source(self) -> str:
        """Where the values came from (``params.yaml``, or the file ``--params`` names): errors name it."""
        return self._source

    @property
    def raw(self) -> dict[str, Any]:
        """A copy of the mapping as given (overrides applied, defaults not filled in): what DVC's
        ``params:`` keys, stage caches and Optuna's trial overrides work on."""
        return copy.deepcopy(self._raw)

    def section(self, name: str) -> Any:
        """Section ``name`` (its params.yaml key, e.g. ``validate``)."""
        if name not in SECTIONS:
            raise ConfigError(
                f"{self._source}: {name}: not a params.yaml section; known: {', '.join(SECTIONS)}"
            )
        return getattr(self, name)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> Params:
        """A new ``Params`` with dotted-key overrides (``{"train.max_epochs": 1}``) applied and validated."""
        if not overrides:
            return self
        return from_mapping(apply_overrides(self._raw, dict(overrides)), source=self._source)


SECTIONS: tuple[str, ...] = tuple(Params.model_fields)
"""Every params.yaml section, in the file's order."""


def from_mapping(raw: Mapping[str, Any], *, source: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Validate a params mapping (params.yaml's content, overrides applied) into :class:`Params`.

    Raises:
        ConfigError: one line naming ``source`` and the key, e.g. ``params.yaml: train.lr: ...``.
    """
    label = str(source)
    values: dict[str, Any] = {}
    for name, section in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{label}: {name}: not a params.yaml section; known: {', '.join(SECTIONS)}")
        if section is not None:
            values[name] = checked_section(label, name, section)
    try:
        params = Params.model_validate(values)
    except ValidationError as exc:
        raise one_line_error(label, exc) from None
    params._raw = copy.deepcopy(dict(raw))
    params._source = label
    return params


def load_params(path: str | Path = DEFAULT_PARAMS_FILE, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read params.yaml, apply dotted-key ``overrides`` and validate every section.

    Raises:
        ConfigError: a missing or malformed file, or the first invalid key.
    """
    return from_mapping(apply_overrides(read_params(path), dict(overrides or {})), source=path)


def as_params(params: Params | Mapping[str, Any], source: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """``params`` itself, or a params mapping validated into :class:`Params` (stage entry points take either)."""
    return params if isinstance(params, Params) else from_mapping(params, source=source)
