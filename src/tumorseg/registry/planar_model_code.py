"""MLflow "model from code" entry point of the 2-D models, copied into each and executed on load; the
stored model holds no pickled code (the logic lives in :mod:`tumorseg.registry.planar_pyfunc`)."""

from mlflow.models import set_model

from tumorseg.registry.planar_pyfunc import PlanarPyfuncModel

set_model(PlanarPyfuncModel())
