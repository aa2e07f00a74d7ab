"""MLflow "model from code" entry point: copied into every logged model and run when it is loaded, so the
stored model holds no pickled code (the logic lives in :mod:`tumorseg.registry.pyfunc`)."""

from mlflow.models import set_model

from tumorseg.registry.pyfunc import TumorsegSegmentationModel

set_model(TumorsegSegmentationModel())
