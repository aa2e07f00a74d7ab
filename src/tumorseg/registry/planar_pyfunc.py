"""The registered 2-D model (``tumorseg-2d``, ``tumorseg-detect``): an MLflow pyfunc over image files.

Both names store the same package (:mod:`tumorseg.models.planar_package`); prediction is
:func:`~tumorseg.models.planar_predictor.predict_planar`, as in ``tumorseg predict``/``detect``. Input:
``image_path``; output, one row per image: ``label`` is ``yes``/``no``, ``tumour_type`` empty for ``no``,
``mask_png`` a base64 0/255 PNG of the input's size (empty with ``return_mask`` false).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from tumorseg.errors import DataError
from tumorseg.models.planar_package import load_planar_package
from tumorseg.models.planar_predictor import mask_png_bytes, predict_planar
from tumorseg.registry.pyfunc import invalid_input, log_code_model

OUTPUT_SCHEMA: tuple[tuple[str, str], ...] = (
    ("case_id", "string"),
    ("probability", "double"),
    ("label", "string"),
    ("tumour_type", "string"),
    ("height", "long"),
    ("width", "long"),
    ("mask_png", "string"),
)
OUTPUT_COLUMNS: tuple[str, ...] = tuple(name for name, _ in OUTPUT_SCHEMA)
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
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image_path")]),
        outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUT_SCHEMA]),
        params=ParamSchema([ParamSpec("return_mask", "boolean", True)]),
    )


class PlanarPyfuncModel(mlflow.pyfunc.PythonModel):
    """Preprocess, segment, classify and restore to the input size, as a pyfunc."""

    def load_context(self, context: Any) -> None:
        a = context.artifacts
        self._model = load_planar_package(a["weights"], a["config"], a["detector"], "registered 2-D model")

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row per image (see the module docstring); bad input is ``INVALID_PARAMETER_VALUE``."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        with_mask = bool((params or {}).get("return_mask", True))
        rows = []
        with invalid_input():
            if "image_path" not in frame.columns:
                raise DataError(f"input needs an 'image_path' column (got {list(frame.columns)})")
            for path in frame["image_path"].astype(str):
                p = predict_planar(Path(path), self._model)
                mask_png = base64.b64encode(mask_png_bytes(p.mask)).decode("ascii") if with_mask else ""
                rows.append(
                    {
                        "case_id": p.case_id,
                        "probability": p.probability,
                        "label": "yes" if p.label else "no",
                        "tumour_type": p.tumour_type or "",
                        "height": int(p.mask.shape[0]),
                        "width": int(p.mask.shape[1]),
                        "mask_png": mask_png,
                    }
                )
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def log_planar_model(
    package: dict[str, Path], *, name: str, extra_artifacts: dict[str, Path] | None = None
) -> Any:
    """Log the 2-D pyfunc (package files + extra artifacts) into the active run; return its ``ModelInfo``."""
    artifacts = {key: str(path) for key, path in {**package, **(extra_artifacts or {})}.items()}
    return log_code_model(name, MODEL_CODE, artifacts, planar_signature(), RUNTIME_PACKAGES)
