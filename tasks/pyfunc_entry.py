"""The Melos pyfunc, logged as MLflow "models from code": MLflow stores this file with the
model and runs it on load, instead of pickling a ``MelosFillMask`` instance (which made MLflow
warn about CloudPickle on every run). Loading needs Melos installed, as before."""

import mlflow.models

from tasks.pyfunc_model import MelosFillMask

mlflow.models.set_model(MelosFillMask())
