"""MLflow "model from code" entry point of the registered tumorseg model.

MLflow copies this file into every logged model and executes it when the model is loaded
(``mlflow.pyfunc.load_model``, ``mlflow models serve``); it is never imported by tumorseg itself.
The model's logic lives in the installed package (:mod:`tumorseg.registry.pyfunc`), so the
stored model holds no pickled code.
"""

from mlflow.models import set_model

from tumorseg.registry.pyfunc import TumorsegSegmentationModel

set_model(TumorsegSegmentationModel())
