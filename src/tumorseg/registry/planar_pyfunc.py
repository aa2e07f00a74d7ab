"""The registered 2-D model: an MLflow pyfunc that segments, classifies and detects from image files.

Both registered names (``tumorseg-2d`` and ``tumorseg-detect``) store the same package
(:mod:`tumorseg.models.planar_package`: ``weights.pt``, ``config.json``, ``detector.json``) with their own
evidence (``evaluation.json``, ``model_card.md``); prediction goes through
:func:`tumorseg.models.planar_predictor.predict_planar`, the path ``tumorseg predict``/``detect`` take.

Input (DataFrame): ``image_path`` (string): a ``.mat`` or image file readable where the model runs.
Params: ``return_mask`` (bool, default true).
Output, one row per image: ``case_id``, ``probability``, ``label`` (``yes``/``no``), ``tumour_type``
(empty when ``no``), ``height``, ``width``, ``mask_png`` (base64 PNG, 0/255, the input's size;
empty when ``return_mask`` is false).
"""

from __future__ import annotations

import base64
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from tumorseg.errors import TumorsegError

OUTPUT_COLUMNS: tuple[str, ...] = (
    "case_id",
    "probability",
    "label",
    "tumour_type",
    "height",
    "width",
    "mask_png",
)
MODEL_CODE = Path(__file__).with_name("planar_model_code.py")
RUNTIME_PACKAGES: tuple[str, ...] = (
    "torch",
    "monai",
    "numpy",
    "scipy",
    "scikit-image",
    "h5py",
    "pillow",
    "pandas",
    "pydantic",
    "pyyaml",
    "mlflow",
)


def planar_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image_path")]),
        outputs=Schema(
            [
                ColSpec("string", "case_id"),
                ColSpec("double", "probability"),
                ColSpec("string", "label"),
                ColSpec("string", "tumour_type"),
                ColSpec("long", "height"),
                ColSpec("long", "width"),
                ColSpec("string", "mask_png"),
            ]
        ),
        params=ParamSchema([ParamSpec("return_mask", "boolean", True)]),
    )


class PlanarPyfuncModel(mlflow.pyfunc.PythonModel):
    """Preprocess, segment, classify and restore to the input size, as a pyfunc."""

    def load_context(self, context: Any) -> None:
        from tumorseg.models.planar_package import load_planar_package

        a = context.artifacts
        self._model = load_planar_package(a["weights"], a["config"], a["detector"], "registered 2-D model")

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row per image (see the module docstring); bad input is ``INVALID_PARAMETER_VALUE``."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from tumorseg.errors import DataError
        from tumorseg.models.planar_predictor import mask_png_bytes, predict_planar

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        with_mask = bool((params or {}).get("return_mask", True))
        rows = []
        try:
            if "image_path" not in frame.columns:
                raise DataError(f"input needs an 'image_path' column (got {list(frame.columns)})")
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
                        "mask_png": base64.b64encode(mask_png_bytes(p.mask)).decode("ascii")
                        if with_mask
                        else "",
                    }
                )
        except TumorsegError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def log_planar_model(
    package: dict[str, Path], *, name: str, extra_artifacts: dict[str, Path] | None = None
) -> Any:
    """Log the 2-D pyfunc (package files + extra artifacts) into the active MLflow run; return its ``ModelInfo``."""
    from tumorseg.tracking import model_pip_requirements

    artifacts = {key: str(path) for key, path in {**package, **(extra_artifacts or {})}.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts=artifacts,
            signature=planar_signature(),
            pip_requirements=model_pip_requirements(RUNTIME_PACKAGES),
        )
