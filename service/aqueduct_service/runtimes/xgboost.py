"""``runtime: xgboost``: an XGBoost booster saved as JSON or UBJSON (``Booster.save_model``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..settings import TensorSpec
from .base import ModelMetadata, ModelRuntime, quiet_openmp, worker_threads

INPUT = "input"
OUTPUT = "predict"


class XGBoostRuntime(ModelRuntime):
    """Serves an XGBoost ``Booster`` (``.json`` or ``.ubj``) with ``inplace_predict``.

    The input ``input`` is ``[-1, num_features]`` FP32; the output ``predict`` is FP32, ``[-1]`` or
    ``[-1, num_class]`` (what the objective predicts: probabilities for ``multi:softprob``).
    ``threads``: the booster's threads (default: the worker's share of the pod's CPUs).
    """

    name = "xgboost"
    packages = ("xgboost",)
    read_in_child = True

    def __init__(self, model: str, threads: int | None = None) -> None:
        super().__init__(model)
        if threads is not None and (type(threads) is not int or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads
        self._booster: Any = None

    def read_metadata(self) -> ModelMetadata:
        import xgboost

        booster = xgboost.Booster(model_file=self.model_path)
        booster.set_param({"nthread": 1})
        features = booster.num_features()
        probe = booster.inplace_predict(np.zeros((1, features), np.float32))
        return ModelMetadata(
            inputs=(TensorSpec(INPUT, "FP32", (-1, features)),),
            outputs=(TensorSpec(OUTPUT, "FP32", (-1, *probe.shape[1:])),),
            batched=True,
        )

    def load(self) -> None:
        quiet_openmp()
        import xgboost

        self._booster = xgboost.Booster(model_file=self.model_path)
        self._booster.set_param({"nthread": self.threads or worker_threads()})

    def run(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        result = self._booster.inplace_predict(inputs[INPUT])
        return {OUTPUT: np.asarray(result, np.float32)}
