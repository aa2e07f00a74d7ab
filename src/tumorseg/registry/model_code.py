"""MLflow "model from code" entry point, copied into every logged model (the 2-D ones as
``planar_model_code.py``) and run on load: the logic lives in :mod:`tumorseg.registry.pyfunc`."""

from mlflow.models import set_model

from tumorseg.registry.pyfunc import TumorsegSegmentationModel

set_model(TumorsegSegmentationModel())
