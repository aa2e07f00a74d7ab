"""One MLflow pyfunc for every registered model, volumes (``tumorseg``) and images (``tumorseg-2d``,
``tumorseg-detect``): a "model from code" (``model_code.py``, nothing pickled) running what ``tumorseg
predict`` runs, preprocessing and its inverse included. A ``detector`` artifact (the 2-D package) picks
the image strategy. Volumes: ``case_dir`` (and optional ``out_dir``) in, a row per case out
(:data:`OUTPUT_SCHEMA`); images: ``image_path`` in, a row per image out (``mask_png``: base64 0/255 PNG
of the input's size). REST, after ``mlflow models serve -m models:/tumorseg@champion``::

    curl -X POST localhost:5000/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_records": [{"case_dir": "/data/BraTS2021_00001"}], "params": {"tta": true}}'
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from tumorseg.errors import DataError, TumorsegError
from tumorseg.tracking import model_pip_requirements

log = logging.getLogger(__name__)

OUTPUT_SCHEMA: tuple[tuple[str, str], ...] = (
    ("case_id", "string"),
    ("label_convention", "string"),
    ("shape", "string"),
    ("volume_wt_ml", "double"),
    ("volume_tc_ml", "double"),
    ("volume_et_ml", "double"),
    ("output_path", "string"),
    ("segmentation", "string"),
    ("label_set", "string"),
    ("volumes_ml", "string"),
)
"""Volume output columns and MLflow types; ``label_set`` and ``volumes_ml`` (JSON, ml) are optional."""
OUTPUT_COLUMNS: tuple[str, ...] = tuple(name for name, _ in OUTPUT_SCHEMA)
PLANAR_OUTPUT_SCHEMA: tuple[tuple[str, str], ...] = (
    ("case_id", "string"),
    ("probability", "double"),
    ("label", "string"),
    ("tumour_type", "string"),
    ("height", "long"),
    ("width", "long"),
    ("mask_png", "string"),
)
PREDICT_SETTINGS_FILE = "predict.json"
MODEL_CODE = Path(__file__).with_name("model_code.py")
"""The "model from code" file MLflow stores with the model and executes on load."""
PLANAR_MODEL_CODE_NAME = "planar_model_code.py"
"""The name the 2-D models store :data:`MODEL_CODE` under (their artifact layout predates the merge)."""

_SERVING_PACKAGES = ("pandas", "pydantic", "pyyaml", "mlflow")
RUNTIME_PACKAGES = ("torch", "monai", "numpy", "scipy", "scikit-image", "nibabel", *_SERVING_PACKAGES)
"""Distributions the served model imports (pinned to the installed versions in requirements.txt)."""
PLANAR_RUNTIME_PACKAGES = (
    "torch",
    "monai",
    "numpy",
    "scipy",
    "scikit-image",
    "h5py",
    "pillow",
    *_SERVING_PACKAGES,
)


def model_signature(tta: bool, min_component_mm3: float) -> Any:
    """The volume model's signature: case folders in, one row per case out, three inference params."""
    inputs = Schema([ColSpec("string", "case_dir"), ColSpec("string", "out_dir", required=False)])
    optional = ("label_set", "volumes_ml")
    outputs = Schema([ColSpec(kind, name, required=name not in optional) for name, kind in OUTPUT_SCHEMA])
    params = ParamSchema(
        [
            ParamSpec("tta", "boolean", bool(tta)),
            ParamSpec("min_component_mm3", "double", float(min_component_mm3)),
            ParamSpec("return_segmentation", "boolean", True),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def planar_signature() -> Any:
    """The image model's signature: image paths in, one row per image out, ``return_mask``."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image_path")]),
        outputs=Schema([ColSpec(kind, name) for name, kind in PLANAR_OUTPUT_SCHEMA]),
        params=ParamSchema([ParamSpec("return_mask", "boolean", True)]),
    )


def encode_segmentation(image: Any) -> str:
    """A NIfTI image as base64 text of its gzip-compressed ``.nii`` bytes (the ``segmentation`` column)."""
    return base64.b64encode(gzip.compress(image.to_bytes(), compresslevel=1)).decode("ascii")


def decode_segmentation(text: str) -> Any:
    """Inverse of :func:`encode_segmentation`: a ``nibabel.Nifti1Image`` (``get_fdata()``, ``.affine``)."""
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(text)))


@contextmanager
def invalid_input() -> Iterator[None]:
    """Bad input (a :class:`TumorsegError`) as MLflow's ``INVALID_PARAMETER_VALUE``: HTTP 400 when served."""
    try:
        yield
    except TumorsegError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


class VolumeStrategy:
    """Preprocessing + sliding-window inference + restoration to the source geometry of NIfTI cases."""

    column = "case_dir"
    output_columns = OUTPUT_COLUMNS

    def __init__(self, trained: Any, settings: Any, drift_profile: Any = None) -> None:
        self._trained = trained
        self._settings = settings
        self._monitor = None
        if drift_profile is not None:
            from tumorseg.monitoring.config import MonitorConfig
            from tumorseg.monitoring.drift import DriftMonitor

            # the model carries no monitor settings: params.yaml's defaults (MonitorConfig's)
            self._monitor = DriftMonitor.from_params(drift_profile, MonitorConfig())

    @classmethod
    def from_artifacts(cls, artifacts: dict[str, str]) -> VolumeStrategy:
        """The network (weights or compressed program + ``config.json``), ``predict.json`` and the
        training profile (``drift_profile``) when the model was registered with one."""
        from tumorseg.models.config import PredictConfig
        from tumorseg.models.package import load_artifacts
        from tumorseg.monitoring.drift import load_profile

        trained = load_artifacts(artifacts)
        settings = json.loads(Path(artifacts["predict"]).read_text())
        profile = load_profile({key: Path(value) for key, value in artifacts.items()})
        return cls(trained, PredictConfig.model_validate(settings), profile)

    def predict(self, predictor: Any, case: Any) -> Any:
        """The case's prediction. With a component-confidence threshold and a training profile the case
        is read whole once, checked, and not given the threshold when the profile flags it by more than
        its grid, as ``tumorseg predict`` does (decision record 0030)."""
        if self._monitor is None or predictor.min_confidence <= 0:
            return predictor.predict_case(case)
        from tumorseg.models.predictor import read_volumes
        from tumorseg.monitoring.drift import component_threshold, try_check, volume_features

        volumes, _ = read_volumes(case)
        check = try_check(self._monitor, lambda: volume_features(case.case_id, volumes), case.case_id)
        threshold = component_threshold(check)
        if threshold is not None:
            log.warning(
                "drift: %s outside the model's training profile (%s); no component dropped for low confidence",
                case.case_id,
                "; ".join(check.outside),
            )
        return predictor.predict_volumes(volumes, min_confidence=threshold)

    def rows(self, frame: pd.DataFrame, params: dict[str, Any]) -> list[dict[str, Any]]:
        from tumorseg.models.predictor import (
            SegmentationPredictor,
            nifti_like,
            plan_cases,
            reference_header,
            write_prediction,
        )

        updates = {key: params[key] for key in ("tta", "min_component_mm3") if params.get(key) is not None}
        predictor = SegmentationPredictor(self._trained, self._settings.model_copy(update=updates))
        with_segmentation = bool(params.get("return_segmentation", True))
        rows: list[dict[str, Any]] = []
        for record in frame.to_dict(orient="records"):
            out_dir = record.get("out_dir")
            out_dir = str(out_dir) if isinstance(out_dir, str) and out_dir else None
            for case in plan_cases(Path(str(record["case_dir"]))):
                prediction = self.predict(predictor, case)
                header = reference_header(case)
                volumes = prediction.volumes_ml
                output_path = str(write_prediction(prediction, out_dir, header)[0]) if out_dir else ""
                segmentation = ""
                if with_segmentation:
                    labels = nifti_like(prediction.labels, prediction.affine, header, np.uint8)
                    segmentation = encode_segmentation(labels)
                rows.append(
                    {
                        "case_id": case.case_id,
                        "label_convention": prediction.label_convention,
                        "shape": "x".join(str(n) for n in prediction.labels.shape),
                        "volume_wt_ml": volumes["WT"],
                        "volume_tc_ml": volumes["TC"],
                        "volume_et_ml": volumes["ET"],
                        "output_path": output_path,
                        "segmentation": segmentation,
                        "label_set": predictor.label_set.name,
                        "volumes_ml": json.dumps({region: float(ml) for region, ml in volumes.items()}),
                    }
                )
        return rows


class ImageStrategy:
    """Preprocess, segment, classify and restore to the input size, as ``tumorseg predict --dims 2``."""

    column = "image_path"
    output_columns = tuple(name for name, _ in PLANAR_OUTPUT_SCHEMA)

    def __init__(self, model: Any) -> None:
        self._model = model

    @classmethod
    def from_artifacts(cls, artifacts: dict[str, str]) -> ImageStrategy:
        """The 2-D package (``weights``, ``config``, ``detector``) or its compressed edge variant."""
        from tumorseg.models.package import load_planar_artifacts

        paths = {key: Path(value) for key, value in artifacts.items()}
        return cls(load_planar_artifacts(paths, "registered 2-D model"))

    def rows(self, frame: pd.DataFrame, params: dict[str, Any]) -> list[dict[str, Any]]:
        from tumorseg.models.predictor import mask_png_bytes, predict_planar

        with_mask = bool(params.get("return_mask", True))
        rows = []
        for path in frame["image_path"].astype(str):
            p = predict_planar(Path(path), self._model)
            rows.append(
                {
                    "case_id": p.case_id,
                    "probability": p.probability,
                    "label": "yes" if p.label else "no",
                    "tumour_type": p.tumour_type or "",
                    "height": int(p.mask.shape[0]),
                    "width": int(p.mask.shape[1]),
                    "mask_png": base64.b64encode(mask_png_bytes(p.mask)).decode("ascii") if with_mask else "",
                }
            )
        return rows


class TumorsegSegmentationModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of every tumorseg model; its artifacts choose volumes or images (module docstring)."""

    def load_context(self, context: Any) -> None:
        """Rebuild the network and its settings with the strategy its artifacts call for."""
        strategy = ImageStrategy if "detector" in context.artifacts else VolumeStrategy
        self._strategy = strategy.from_artifacts(context.artifacts)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row per case or image; bad input is ``INVALID_PARAMETER_VALUE``."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        strategy = self._strategy
        with invalid_input():
            if strategy.column not in frame.columns:
                raise DataError(f"input needs a '{strategy.column}' column (got {list(frame.columns)})")
            rows = strategy.rows(frame, params or {})
        return pd.DataFrame(rows, columns=list(strategy.output_columns))


def log_code_model(
    name: str, model_code: Path, artifacts: dict[str, str], signature: Any, packages: Any
) -> Any:
    """``mlflow.pyfunc.log_model`` of a "model from code" into the active run; returns its ``ModelInfo``."""
    with warnings.catch_warnings():
        # No input example on purpose: the input names files on the serving machine.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_code),
            artifacts=artifacts,
            signature=signature,
            pip_requirements=model_pip_requirements(packages),
        )


def log_segmentation_model(
    trained: Any,
    predict_settings: dict[str, Any],
    *,
    name: str = "model",
    extra_artifacts: dict[str, Path] | None = None,
) -> Any:
    """Log the volume pyfunc (``predict_settings`` as ``predict.json``, ``extra_artifacts``) into the active run."""
    from tumorseg.models.package import save_package

    with tempfile.TemporaryDirectory(prefix="tumorseg-model-") as tmp:
        artifacts = {key: str(path) for key, path in save_package(trained, tmp).items()}
        settings = Path(tmp) / PREDICT_SETTINGS_FILE
        settings.write_text(json.dumps(predict_settings, indent=1, sort_keys=True) + "\n")
        artifacts["predict"] = str(settings)
        artifacts.update({key: str(path) for key, path in (extra_artifacts or {}).items()})
        signature = model_signature(
            bool(predict_settings.get("tta", False)), float(predict_settings.get("min_component_mm3", 0.0))
        )
        return log_code_model(name, MODEL_CODE, artifacts, signature, RUNTIME_PACKAGES)


def log_planar_model(
    package: dict[str, Path], *, name: str, extra_artifacts: dict[str, Path] | None = None
) -> Any:
    """Log the image pyfunc (package files + extra artifacts) into the active run; return its ``ModelInfo``."""
    artifacts = {key: str(path) for key, path in {**package, **(extra_artifacts or {})}.items()}
    with tempfile.TemporaryDirectory(prefix="tumorseg-model-") as tmp:
        code = shutil.copyfile(MODEL_CODE, Path(tmp) / PLANAR_MODEL_CODE_NAME)
        return log_code_model(name, code, artifacts, planar_signature(), PLANAR_RUNTIME_PACKAGES)
