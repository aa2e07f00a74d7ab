"""The registered model: an MLflow pyfunc that segments whole cases from their NIfTI files.

Serving must include the preprocessing and its exact inverse, so the pyfunc runs ``tumorseg predict``'s
:class:`~tumorseg.models.predictor.SegmentationPredictor` rather than the bare network. It is a "model
from code" (``model_code.py``), nothing pickled; loading needs the tumorseg package installed. Input:
``case_dir`` (a case or dataset folder on the serving machine) and optional ``out_dir``; output: one row
per case (:data:`OUTPUT_SCHEMA`). Every label set has WT/TC/ET, so the first eight columns mean the same
for any model; ``volumes_ml`` (JSON, every train region in ml) carries the extra regions. REST, after
``mlflow models serve -m models:/tumorseg@champion --env-manager local``::

    curl -X POST localhost:5000/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_records": [{"case_dir": "/data/BraTS2021_00001"}], "params": {"tta": true}}'
"""

from __future__ import annotations

import base64
import gzip
import json
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
"""Output columns and their MLflow types; the last two came with label sets and are optional."""
OUTPUT_COLUMNS: tuple[str, ...] = tuple(name for name, _ in OUTPUT_SCHEMA)
PREDICT_SETTINGS_FILE = "predict.json"
MODEL_CODE = Path(__file__).with_name("model_code.py")
"""The "model from code" file MLflow stores with the model and executes on load."""

RUNTIME_PACKAGES: tuple[str, ...] = (
    "torch",
    "monai",
    "numpy",
    "scipy",
    "scikit-image",
    "nibabel",
    "pandas",
    "pydantic",
    "pyyaml",
    "mlflow",
)
"""Distributions the served model imports (pinned to the installed versions in requirements.txt)."""


def model_signature(tta: bool, min_component_mm3: float) -> Any:
    """The declared signature: case-folder DataFrame in, one row per case out, three inference params."""
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


class TumorsegSegmentationModel(mlflow.pyfunc.PythonModel):
    """Preprocessing + sliding-window inference + restoration to the source geometry, as a pyfunc."""

    def load_context(self, context: Any) -> None:
        """Rebuild the network (weights or compressed program + ``config.json``) and the predict settings."""
        from tumorseg.models.package import load_artifacts
        from tumorseg.models.predictor import PredictConfig

        self._trained = load_artifacts(context.artifacts)
        settings = json.loads(Path(context.artifacts["predict"]).read_text())
        self._settings = PredictConfig.model_validate(settings)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Segment the cases named in ``model_input`` (columns: see the module docstring)."""
        with invalid_input():
            return self._predict(model_input, params or {})

    def _predict(self, model_input: Any, params: dict[str, Any]) -> pd.DataFrame:
        from tumorseg.models.predictor import (
            SegmentationPredictor,
            nifti_like,
            plan_cases,
            reference_header,
            write_prediction,
        )

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "case_dir" not in frame.columns:
            raise DataError(f"input needs a 'case_dir' column (got {list(frame.columns)})")
        updates = {key: params[key] for key in ("tta", "min_component_mm3") if params.get(key) is not None}
        predictor = SegmentationPredictor(self._trained, self._settings.model_copy(update=updates))
        with_segmentation = bool(params.get("return_segmentation", True))
        rows: list[dict[str, Any]] = []
        for record in frame.to_dict(orient="records"):
            out_dir = record.get("out_dir")
            out_dir = str(out_dir) if isinstance(out_dir, str) and out_dir else None
            for case in plan_cases(Path(str(record["case_dir"]))):
                prediction = predictor.predict_case(case)
                header = reference_header(case)
                volumes = prediction.volumes_ml
                output_path = str(write_prediction(prediction, out_dir, header)[0]) if out_dir else ""
                segmentation = ""
                if with_segmentation:
                    segmentation = encode_segmentation(
                        nifti_like(prediction.labels, prediction.affine, header, np.uint8)
                    )
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
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def log_segmentation_model(
    trained: Any,
    predict_settings: dict[str, Any],
    *,
    name: str = "model",
    extra_artifacts: dict[str, Path] | None = None,
) -> Any:
    """Log the pyfunc (``predict_settings`` as ``predict.json``, ``extra_artifacts``) into the active run."""
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
