"""The registered model: an MLflow pyfunc that segments whole cases from their NIfTI files.

Why a pyfunc around the network rather than the bare ``mlflow.pytorch`` network: a served
segmentation must include the preprocessing (reorient, resample to the training spacing, crop,
z-score) and its exact inverse, or clients would have to re-implement them. This model takes case
folders and returns segmentations in each case's own geometry and label convention, the same code
path as ``tumorseg predict`` (:class:`~tumorseg.models.predictor.SegmentationPredictor`).

Stored as an MLflow "model from code" (``model_code.py`` calls ``mlflow.models.set_model``), with
small artifacts: ``weights.pt`` (state_dict, loaded with ``weights_only=True``; a compressed
variant stores ``model.onnx`` instead, run by ONNX Runtime, or a bfloat16 ``model.pt2`` program run
by PyTorch), ``config.json`` (the resolved training
sections) and ``predict.json`` (the ``predict`` settings the model was evaluated with), plus, for
versions the evaluate stage registers, ``evaluation.json`` and ``model_card.md``
(:mod:`tumorseg.registry.register`). Nothing is pickled. Loading needs the tumorseg package
installed (the project's environment or Docker image; ``mlflow models serve --env-manager local``).

Input (signature, DataFrame columns):

- ``case_dir`` (string, required): a case folder, or a dataset folder in any supported layout
  (every case in it is segmented), readable on the machine that runs the model.
- ``out_dir`` (string, optional): when given, ``<out_dir>/<case_id>.nii.gz`` is written there too.

Inference params: ``tta`` (bool), ``min_component_mm3`` (float), ``return_segmentation`` (bool).

Output (one row per case): ``case_id``, ``label_convention`` (the convention the segmentation is
written in), ``shape`` (``240x240x155``), ``volume_wt_ml``, ``volume_tc_ml``, ``volume_et_ml``,
``output_path`` (empty without ``out_dir``), ``segmentation``: the label map as a gzip-compressed
NIfTI-1 file, base64-encoded (decode it with :func:`decode_segmentation`; empty when
``return_segmentation`` is false), then ``label_set`` and ``volumes_ml``.

Label sets (:mod:`tumorseg.data.conventions`) and backward compatibility: every label set has WT, TC
and ET train regions, so the three fixed ``volume_*_ml`` columns keep their names, types, order and
meaning for any model. A label set with more regions (``glioma_post``: RC, the resection cavity;
``pediatric``: CC, the cyst) reports *all* its regions in the two columns appended after
``segmentation`` (optional in the signature, so a client that reads the first eight columns by name or
position sees nothing new):

- ``label_set`` (string): ``glioma``, ``glioma_post`` or ``pediatric``;
- ``volumes_ml`` (string): a JSON object of every train region's volume in ml, in the network's
  order, e.g. ``{"WT": 45.2, "TC": 20.1, "ET": 10.3, "RC": 3.4}`` (``json.loads`` it). One string
  column rather than a column per extra region keeps the output schema the same for every label set.

REST (``mlflow models serve -m models:/tumorseg@champion --env-manager local``)::

    curl -X POST localhost:5000/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_records": [{"case_dir": "/data/BraTS2021_00001"}], "params": {"tta": true}}'
"""

from __future__ import annotations

import base64
import gzip
import json
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from tumorseg.errors import TumorsegError

INPUT_COLUMNS: tuple[str, ...] = ("case_dir", "out_dir")
OUTPUT_COLUMNS: tuple[str, ...] = (
    "case_id",
    "label_convention",
    "shape",
    "volume_wt_ml",
    "volume_tc_ml",
    "volume_et_ml",
    "output_path",
    "segmentation",
    "label_set",
    "volumes_ml",
)
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
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "case_dir"), ColSpec("string", "out_dir", required=False)])
    outputs = Schema(
        [
            ColSpec("string", "case_id"),
            ColSpec("string", "label_convention"),
            ColSpec("string", "shape"),
            ColSpec("double", "volume_wt_ml"),
            ColSpec("double", "volume_tc_ml"),
            ColSpec("double", "volume_et_ml"),
            ColSpec("string", "output_path"),
            ColSpec("string", "segmentation"),
            # Added with label sets; optional, after the original columns (see the module docstring).
            ColSpec("string", "label_set", required=False),
            ColSpec("string", "volumes_ml", required=False),
        ]
    )
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


class TumorsegSegmentationModel(mlflow.pyfunc.PythonModel):
    """Preprocessing + sliding-window inference + restoration to the source geometry, as a pyfunc."""

    def load_context(self, context: Any) -> None:
        """Rebuild the network (``weights.pt``, ``model.onnx`` or ``model.pt2``, + ``config.json``); read the predict settings."""
        from tumorseg.models.package import load_artifacts
        from tumorseg.models.predictor import PredictConfig

        self._trained = load_artifacts(context.artifacts)
        settings = json.loads(Path(context.artifacts["predict"]).read_text())
        self._settings = PredictConfig.model_validate(settings)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Segment the cases named in ``model_input`` (see the module docstring for the columns).

        Raises:
            MlflowException: ``INVALID_PARAMETER_VALUE`` (HTTP 400 when served) for bad input: a
                missing column, a folder without cases, a missing modality, an unreadable file.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self._predict(model_input, params or {})
        except TumorsegError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    def _predict(self, model_input: Any, params: dict[str, Any]) -> pd.DataFrame:
        from tumorseg.errors import DataError
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
                output_path = ""
                if out_dir is not None:
                    output_path = str(write_prediction(prediction, out_dir, header)[0])
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
                        "volume_wt_ml": prediction.volumes_ml["WT"],
                        "volume_tc_ml": prediction.volumes_ml["TC"],
                        "volume_et_ml": prediction.volumes_ml["ET"],
                        "output_path": output_path,
                        "segmentation": segmentation,
                        "label_set": predictor.label_set.name,
                        "volumes_ml": json.dumps(
                            {region: float(ml) for region, ml in prediction.volumes_ml.items()}
                        ),
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
    """Log the pyfunc into the active MLflow run.

    Args:
        trained: :class:`~tumorseg.models.checkpoint.TrainedNetwork`.
        predict_settings: the ``predict`` section to store (``predict.json``).
        name: the logged model's name within the run.
        extra_artifacts: more files to store with the model (model card, evaluation), by name.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` registers it).
    """
    import tempfile

    from tumorseg.models.package import save_package
    from tumorseg.tracking import model_pip_requirements

    with tempfile.TemporaryDirectory(prefix="tumorseg-model-") as tmp:
        artifacts = {key: str(path) for key, path in save_package(trained, tmp).items()}
        settings = Path(tmp) / PREDICT_SETTINGS_FILE
        settings.write_text(json.dumps(predict_settings, indent=1, sort_keys=True) + "\n")
        artifacts["predict"] = str(settings)
        artifacts.update({key: str(path) for key, path in (extra_artifacts or {}).items()})
        with warnings.catch_warnings():
            # No input example on purpose: the input names folders on the serving machine.
            warnings.filterwarnings(
                "ignore", message=".*input example was not provided.*", category=UserWarning
            )
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                signature=model_signature(
                    bool(predict_settings.get("tta", False)),
                    float(predict_settings.get("min_component_mm3", 0.0)),
                ),
                pip_requirements=model_pip_requirements(RUNTIME_PACKAGES),
            )
