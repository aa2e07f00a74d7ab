"""MLflow "model from code" entry point of the registered 2-D models (``tumorseg-2d``, ``tumorseg-detect``).

MLflow copies this file into every logged 2-D model and executes it on load; tumorseg never imports
it. The logic lives in :mod:`tumorseg.registry.planar_pyfunc`, so the stored model holds no pickled code.
"""

from mlflow.models import set_model

from tumorseg.registry.planar_pyfunc import PlanarPyfuncModel

set_model(PlanarPyfuncModel())
